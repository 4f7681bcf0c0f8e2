"""What every upstream loader shares: reading a checkpoint (path or mapping) and unwrapping its state
dict, naming a checkpoint of the wrong kind, renaming keys, and the tokenizers' load pipeline."""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

from .._utils import check
from ..files import CheckpointMismatchError, StateDict, load_strict, read_tensor_file

# Which upstream a state dict comes from, by keys only that upstream has: a checkpoint of the wrong
# kind is named as such instead of failing with hundreds of missing keys. Checked in this order.
_GPT_BLOCK = re.compile(r"layers\.\d+\.attention\.wqkv\.weight")


def _is_variational_kl(state_dict: Mapping[str, Tensor]) -> bool:
    """LDM's KL head: ``quant_conv`` makes [mean | logvar] for ``post_quant_conv``'s channels."""
    moments, latent = state_dict.get("quant_conv.weight"), state_dict.get("post_quant_conv.weight")
    return moments is not None and latent is not None and moments.shape[0] == 2 * latent.shape[1]


CHECKPOINT_KINDS: Dict[str, tuple] = {
    "mar": ("a MAR checkpoint", "MAR.from_official",
            lambda sd: any(k.startswith(("diffloss.net.", "encoder_blocks.", "decoder_blocks.")) for k in sd)),
    "llamagen_gpt": ("a LlamaGen / DnD GPT checkpoint", "LlamaGen.from_official or DnDTransformer.from_official",
                     lambda sd: "tok_embeddings.weight" in sd or any(map(_GPT_BLOCK.fullmatch, sd))),
    "hf_llama": ("a Hugging Face LLaMA checkpoint", "MonoFormer.from_llama",
                 lambda sd: "model.embed_tokens.weight" in sd),
    "vq": ("a LlamaGen VQ tokenizer checkpoint", "VQVAE.from_official",
           lambda sd: "quantize.embedding.weight" in sd),
    "rq": ("an RQ-VAE checkpoint", "RQVAE.from_official",
           lambda sd: "quantizer.codebook" in sd or any(k.startswith("quantizer.codebooks.") for k in sd)),
    "kl": ("a KL autoencoder checkpoint", "AutoencoderKL.from_official", _is_variational_kl),
    "llamagen_ours": ("an mmgen_pytorch LlamaGen / DnD state dict (our key names, not upstream's)",
                      "`load_state_dict` on a model built with the same arguments",
                      lambda sd: "token_embed.weight" in sd),
}


def checkpoint_kind(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """The :data:`CHECKPOINT_KINDS` key of the upstream whose keys ``state_dict`` has, or None."""
    return next((kind for kind, (_, _, matches) in CHECKPOINT_KINDS.items() if matches(state_dict)), None)


def check_checkpoint_kind(state_dict: Mapping[str, Tensor], expected: str) -> None:
    """Raise :class:`CheckpointMismatchError` when ``state_dict`` is empty or recognisably another kind
    of checkpoint than ``expected`` (unrecognised ones are left to the strict key check)."""
    if not state_dict:
        raise CheckpointMismatchError(f"the checkpoint holds no weights, expected {CHECKPOINT_KINDS[expected][0]}")
    found = checkpoint_kind(state_dict)
    if found is not None and found != expected:
        what, loader, _ = CHECKPOINT_KINDS[found]
        raise CheckpointMismatchError(f"the checkpoint looks like {what}, not {CHECKPOINT_KINDS[expected][0]}; "
                                      f"load it with {loader}")


def rename_keys(state_dict: Mapping[str, Tensor], rules: Mapping[str, str]) -> StateDict:
    """Apply the first matching regex rule to every key; keys that no rule matches are kept."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules.items():
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        renamed[key] = value
    return renamed


def merge_pairs(state_dict: StateDict, first: str, second: str, merged: str,
                combine: Callable[[Tensor, Tensor], Tensor] = lambda a, b: torch.cat((a, b))) -> StateDict:
    """Replace every ``...{first}`` / ``...{second}`` key pair by one ``...{merged}`` key."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(first)]:
        prefix = key[: -len(first)]
        if prefix + second in out:
            out[prefix + merged] = combine(out.pop(key), out.pop(prefix + second))
    return out


def block_rules(names: Mapping[str, str], *, theirs: str = "layers.", ours: str = "layers.") -> Dict[str, str]:
    """Regex rules for :func:`rename_keys` from one table of parameter names inside a block:
    ``{theirs}{i}.{name}`` -> ``{ours}{i}.{names[name]}`` for every block index ``i``."""
    return {rf"{re.escape(theirs)}(\d+)\.{re.escape(name)}": rf"{ours}\1.{mine}" for name, mine in names.items()}


def inverted(names: Mapping[str, str]) -> Dict[str, str]:
    """``names`` read the other way round (ours -> theirs)."""
    return {mine: name for name, mine in names.items()}


WRAPPER_KEYS = ("model", "module", "state_dict", "ema", "model_ema", "state_dict_ema")


def unwrap_checkpoint(checkpoint: Mapping, keys=WRAPPER_KEYS, prefer: Optional[str] = None) -> StateDict:
    """The state dict inside a training checkpoint (``{"model": ...}`` etc.) or the dict itself; the raw
    weights before EMA ones unless ``prefer`` names the EMA key (a checkpoint of EMA weights alone unwraps too)."""
    if prefer is not None and prefer in checkpoint:
        return dict(checkpoint[prefer])
    for key in keys:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


# Checkpoint files

def load_checkpoint(source, *, prefer: Optional[str] = None) -> StateDict:
    """A state dict from a path or an in-memory checkpoint, unwrapped from ``{"model"/"state_dict"/...}``.

    Files are read by :func:`read_checkpoint`: ``torch.load(weights_only=True)`` with ``argparse.Namespace``
    (the ``"args"`` entry of LlamaGen/MAR training checkpoints) allow-listed for that call only, or
    safetensors. ``prefer`` picks a wrapper key first when present (e.g. ``"ema"``, ``"model_ema"``,
    ``"state_dict_ema"``). A DDP ``module.`` prefix on every key is dropped.
    """
    state_dict = unwrap_checkpoint(read_checkpoint(source), prefer=prefer)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def read_checkpoint(source) -> Mapping:
    """The whole checkpoint mapping (wrappers and ``"args"`` included) from a path, or ``source`` itself.

    Files are read by :func:`read_tensor_file`: ``torch.save`` output with ``torch.load(weights_only=True)``,
    ``argparse.Namespace`` allow-listed for that call, or safetensors.
    """
    if isinstance(source, (str, os.PathLike)):
        loaded = read_tensor_file(source, safe_globals=[argparse.Namespace])
        check(isinstance(loaded, Mapping), f"{str(source)!r} holds a {type(loaded).__name__}, not a state dict or "
                                           f"checkpoint mapping", error=CheckpointMismatchError)
        return loaded
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a path or a state dict / checkpoint mapping, got {type(source).__name__}")
    return source



def load_official(cls, source, config, *, kind: str, to_ours, infer, prefer: Optional[str]):
    """Build ``cls`` from an official checkpoint (path, wrapped checkpoint or raw state dict):
    ``to_ours(official, config)`` maps the keys; with ``config=None``, ``infer(official)`` reads the
    architecture off the weights; ``kind``: the :data:`CHECKPOINT_KINDS` key."""
    official = load_checkpoint(source, prefer=prefer)
    check_checkpoint_kind(official, kind)
    if config is None:
        try:
            config = infer(official)
        except KeyError as error:
            raise CheckpointMismatchError(f"cannot read the {cls.__name__} architecture off the checkpoint: it has no "
                                          f"{error} key; pass `config=` explicitly") from None
    model = cls(config)
    load_strict(model, to_ours(official, config), source=f"official {cls.__name__} checkpoint (after key mapping)")
    return model
