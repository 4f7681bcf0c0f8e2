"""Official checkpoints -> our state dicts: one small key map per upstream, plus strict loading.

The maps only rename (and, where layouts differ, concatenate or permute) tensors; loading never needs
the upstream code and always goes through :func:`load_strict`, which names every missing and
unexpected key.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ._utils import check

StateDict = Dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model, or it cannot be loaded safely."""


class CheckpointFileError(CheckpointMismatchError):
    """A file that cannot be read as what it should hold: empty, truncated, not valid JSON, or no checkpoint
    at all (an HTML error page saved by a failed download). The message names the file."""


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a readable diff of missing, unexpected and misshapen keys."""
    check_state_dict(module.state_dict(), state_dict, target=type(module).__name__, source=source)
    module.load_state_dict(state_dict, strict=True)


def check_state_dict(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], *, target: str,
                     source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, unexpected and misshapen key of
    ``state_dict`` against ``expected`` (e.g. a model's state dict in the upstream key names)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(f"{k}: model {tuple(expected[k].shape)} vs {source} {tuple(state_dict[k].shape)}"
                       for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or misshapen:
        lines = [f"the {source} does not fit {target}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))


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


# LlamaGen (FoundationVision/LlamaGen gpt.py) blocks -> backbone

LLAMAGEN_BLOCK_RULES = {
    r"layers\.(\d+)\.attention\.wqkv\.weight": r"layers.\1.attn.to_qkv.weight",
    r"layers\.(\d+)\.attention\.wo\.weight": r"layers.\1.attn.to_out.weight",
    r"layers\.(\d+)\.feed_forward\.w2\.weight": r"layers.\1.ff.proj_out.weight",
    r"layers\.(\d+)\.attention_norm\.weight": r"layers.\1.attn_norm.weight",
    r"layers\.(\d+)\.ffn_norm\.weight": r"layers.\1.ff_norm.weight",
}


def llamagen_backbone_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> StateDict:
    """LlamaGen's ``layers.*`` and ``norm.weight`` as our :class:`Transformer` keys (w1|w3 fused)."""
    blocks = {k: v for k, v in state_dict.items() if k.startswith("layers.") or k == "norm.weight"}
    blocks = merge_pairs(blocks, ".feed_forward.w1.weight", ".feed_forward.w3.weight", ".ff.proj_in.weight")
    return {prefix + k: v for k, v in rename_keys(blocks, LLAMAGEN_BLOCK_RULES).items()}


LLAMAGEN_BLOCK_RULES_INVERSE = {
    r"layers\.(\d+)\.attn\.to_qkv\.weight": r"layers.\1.attention.wqkv.weight",
    r"layers\.(\d+)\.attn\.to_out\.weight": r"layers.\1.attention.wo.weight",
    r"layers\.(\d+)\.ff\.proj_out\.weight": r"layers.\1.feed_forward.w2.weight",
    r"layers\.(\d+)\.attn_norm\.weight": r"layers.\1.attention_norm.weight",
    r"layers\.(\d+)\.ff_norm\.weight": r"layers.\1.ffn_norm.weight",
}


def llamagen_backbone_to_official(state_dict: Mapping[str, Tensor], prefix: str = "") -> StateDict:
    """The inverse of :func:`llamagen_backbone_state_dict`: our ``{prefix}layers.*`` and ``{prefix}norm.weight``
    as LlamaGen keys (``proj_in`` split back into ``w1`` | ``w3``); keys outside ``prefix`` are left out."""
    blocks = {k[len(prefix):]: v for k, v in state_dict.items()
              if k.startswith(prefix + "layers.") or k == prefix + "norm.weight"}
    for key in [k for k in blocks if k.endswith(".ff.proj_in.weight")]:
        stem = key[: -len("ff.proj_in.weight")]
        blocks[stem + "feed_forward.w1.weight"], blocks[stem + "feed_forward.w3.weight"] = blocks.pop(key).chunk(2)
    return rename_keys(blocks, LLAMAGEN_BLOCK_RULES_INVERSE)


# Hugging Face LLaMA (LlamaForCausalLM) blocks -> backbone

HF_LLAMA_BLOCK_RULES = {
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"layers.\1.attn.to_out.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": r"layers.\1.ff.proj_out.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"layers.\1.attn_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"layers.\1.ff_norm.weight",
    r"model\.norm\.weight": r"norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.to_qkv\.weight": r"layers.\1.attn.to_qkv.weight",
    r"model\.layers\.(\d+)\.ff\.proj_in\.weight": r"layers.\1.ff.proj_in.weight",
}


def half_split_to_interleaved(weight: Tensor, dim_head: int) -> Tensor:
    """Permute q/k projection rows from HF's half-split rotary layout (dim i pairs with i + d/2) to
    adjacent pairs (2i, 2i+1), so the same rotation applies to the same feature pairs."""
    return rearrange(weight, "(h two half) d -> (h half two) d", two=2, half=dim_head // 2)


def hf_llama_backbone_state_dict(state_dict: Mapping[str, Tensor], *, dim_head: int, prefix: str = "") -> StateDict:
    """``model.layers.*`` / ``model.norm`` of a HF LLaMA as our :class:`Transformer` keys."""
    blocks = {k: v for k, v in state_dict.items() if k.startswith("model.layers.") or k == "model.norm.weight"}
    for key in [k for k in blocks if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        blocks[key] = half_split_to_interleaved(blocks[key], dim_head)
    blocks = merge_pairs(blocks, ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".ff.proj_in.weight")
    for key in [k for k in blocks if k.endswith(".self_attn.q_proj.weight")]:
        stem = key[: -len("q_proj.weight")]
        fused = torch.cat((blocks.pop(key), blocks.pop(stem + "k_proj.weight"), blocks.pop(stem + "v_proj.weight")))
        blocks[stem + "to_qkv.weight"] = fused
    blocks = rename_keys(blocks, HF_LLAMA_BLOCK_RULES)
    return {prefix + k: v for k, v in blocks.items()}


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


# Reading files: what a file is comes from its first bytes, so an empty, truncated or foreign file (an
# HTML error page saved as .pth) is named as such instead of failing deep inside torch or safetensors.

TORCH_ZIP_MAGIC = b"PK\x03\x04"         # torch.save's default zip archive
PICKLE_PROTOCOLS = range(2, 6)          # legacy torch.save: b"\x80" + protocol byte
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors refuses larger JSON headers
FILE_FORMATS = {"torch": "torch.save output (a zip archive or a legacy pickle)", "safetensors": "safetensors"}


def checkpoint_format(path, *, expected: Optional[str] = None) -> str:
    """``"torch"`` or ``"safetensors"``, read off the first bytes of the file ``path``. Raises
    :class:`CheckpointFileError` naming the file when it is empty, truncated or not a checkpoint at all,
    or (with ``expected``, a :data:`FILE_FORMATS` key) of the other format; ``FileNotFoundError`` when absent."""
    path = Path(path)
    check(path.exists(), f"checkpoint file {str(path)!r} does not exist", error=FileNotFoundError)
    check(path.is_file(), f"{str(path)!r} is a folder, not a checkpoint file", error=CheckpointFileError)
    size = path.stat().st_size
    check(size > 0, f"{str(path)!r} is empty (0 bytes), not a checkpoint: the save or download did not "
                    f"complete", error=CheckpointFileError)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(TORCH_ZIP_MAGIC):
        check(zipfile.is_zipfile(path), f"{str(path)!r} is truncated: it starts as a torch.save zip archive but "
                                        f"ends after {size} bytes, before the archive's end record",
              error=CheckpointFileError)
        found = "torch"
    elif head[:1] == b"\x80" and len(head) > 1 and head[1] in PICKLE_PROTOCOLS:
        found = "torch"
    elif _safetensors_header_size(head):
        _check_safetensors_complete(path, _safetensors_header_size(head), size)
        found = "safetensors"
    else:
        raise CheckpointFileError(
            f"{str(path)!r} is not a checkpoint: it is {_describe_content(head)}, while torch.save output starts "
            f"with {TORCH_ZIP_MAGIC!r} (zip) or b'\\x80' and a pickle protocol byte, and a safetensors file with an "
            f"8-byte header length and '{{'")
    check(expected is None or found == expected,
          f"{str(path)!r} is {FILE_FORMATS[found]}, expected {FILE_FORMATS[expected or found]}",
          error=CheckpointFileError)
    return found


def _safetensors_header_size(head: bytes) -> Optional[int]:
    """The JSON header length of a safetensors file starting with ``head``, or None if it does not look like one."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    size = int.from_bytes(head[:8], "little")
    return size if 2 <= size <= SAFETENSORS_HEADER_LIMIT else None


def _check_safetensors_complete(path: Path, header_size: int, size: int) -> None:
    """The header and every tensor's bytes lie inside the file (a cut-off download fails here, by name)."""
    check(8 + header_size <= size, f"{str(path)!r} is truncated: its safetensors header alone should take "
                                   f"{8 + header_size} bytes, the file has {size}", error=CheckpointFileError)
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(header_size))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise CheckpointFileError(f"{str(path)!r} is not a valid safetensors file: its header is corrupt "
                                      f"({error})") from None
    expected = 8 + header_size + max(ends, default=0)
    check(size >= expected, f"{str(path)!r} is truncated: its safetensors header promises {expected} bytes, the "
                            f"file has {size}", error=CheckpointFileError)


def _describe_content(head: bytes) -> str:
    """What the first bytes of a file that is no checkpoint look like, for the error message."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return f"an HTML / XML page (starting {head[:32]!r}), e.g. the error page of a failed download"
    decoded = head.decode("utf-8", "replace").rstrip("\ufffd")  # the 64 bytes may end inside a character
    if "\ufffd" not in decoded and all(c.isprintable() or c.isspace() for c in decoded):
        return f"a text file starting {decoded[:32]!r}"
    return f"binary data starting {head[:8]!r}"


def read_tensor_file(path, *, expected: Optional[str] = None, safe_globals: Sequence[Any] = ()) -> Any:
    """What the checkpoint file ``path`` holds, never unpickling arbitrary objects: ``torch.save`` output
    through ``torch.load(weights_only=True)`` (``safe_globals`` allow-listed for this call only), safetensors
    as a state dict. The format is checked first (:func:`checkpoint_format`); every failure names the file."""
    found = checkpoint_format(path, expected=expected)
    try:
        if found == "safetensors":
            return load_file(path)
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, error, safe_globals)
        if not unsafe:
            raise _unreadable(path, found, error) from error
        raise CheckpointMismatchError(
            f"{str(path)!r} is a PyTorch checkpoint that holds objects torch.load(weights_only=True) does not "
            f"load, because loading them would run their code: {', '.join(unsafe)}. If you trust these classes, "
            f"allow-list them with torch.serialization.add_safe_globals([...]) (or the safe_globals context "
            f"manager) and load again; or, only for a file from a source you trust, read it yourself with "
            f"torch.load(path, weights_only=False) and pass the dict") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, SafetensorError) as error:
        raise _unreadable(path, found, error) from error


def _unreadable(path, found: str, error: Exception) -> CheckpointFileError:
    reason = str(error).strip().splitlines()[-1:] or [""]
    return CheckpointFileError(f"{str(path)!r} starts as {FILE_FORMATS[found]} but cannot be read: it is "
                               f"truncated or corrupt ({type(error).__name__}: {reason[0][:200]})")


def _unsafe_globals(path, error: Exception, allowed: Sequence[Any]) -> list:
    """The globals of a torch checkpoint that weights-only loading refuses (all of them for a zip archive,
    the first one torch reports for a legacy file)."""
    found = re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError):
            pass
    names = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in allowed}
    return sorted(set(found) - names)


def read_json_file(path) -> Any:
    """The parsed JSON file ``path``; an empty, non-UTF-8 or malformed (e.g. truncated) file raises
    :class:`CheckpointFileError` naming the file, the line and the column."""
    path = Path(path)
    check(path.is_file(), f"JSON file {str(path)!r} does not exist", error=FileNotFoundError)
    raw = path.read_bytes()
    check(raw.strip(), f"{str(path)!r} is empty, not JSON: the save or download did not complete",
          error=CheckpointFileError)
    try:
        text = raw.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise CheckpointFileError(f"{str(path)!r} is not valid JSON: it is not UTF-8 text (it starts "
                                  f"{raw[:16]!r})") from None
    except json.JSONDecodeError as error:
        cut = " where the text ends, so the file is probably truncated" if error.pos >= len(text.rstrip()) else ""
        raise CheckpointFileError(f"{str(path)!r} is not valid JSON at line {error.lineno}, column {error.colno}"
                                  f"{cut}: {error.msg}") from None


# Image tokenizers (mmgen_pytorch.tokenizers): our encoder/decoder layout is LlamaGen's
# (`conv_blocks.{k}.res/attn/downsample|upsample`, `mid.{0,1,2}`, decoder levels lowest resolution
# first); the taming/LDM layout of MAR's KL-16 and DnD's RQ-VAE is renamed onto it.

LDM_AUTOENCODER_RULES = {
    r"(encoder|decoder)\.mid\.block_1\.(.+)": r"\1.mid.0.\2",
    r"(encoder|decoder)\.mid\.attn_1\.(.+)": r"\1.mid.1.\2",
    r"(encoder|decoder)\.mid\.block_2\.(.+)": r"\1.mid.2.\2",
    r"encoder\.down\.(\d+)\.block\.(.+)": r"encoder.conv_blocks.\1.res.\2",
    r"encoder\.down\.(\d+)\.(attn|downsample)\.(.+)": r"encoder.conv_blocks.\1.\2.\3",
}
_LDM_UP = re.compile(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.(.+)")


def ldm_autoencoder_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """LDM/taming ``encoder.*`` / ``decoder.*`` keys in our layout. LDM's ``decoder.up.{i}`` counts
    levels from full resolution; ours (``decoder.conv_blocks.{k}``) in processing order, so
    ``k = num_levels - 1 - i``. Other keys pass through unchanged."""
    renamed = rename_keys(state_dict, LDM_AUTOENCODER_RULES)
    up_levels = [int(m.group(1)) for m in map(_LDM_UP.fullmatch, renamed) if m]
    last = max(up_levels, default=0)

    def up(match: re.Match) -> str:
        part = "res" if match.group(2) == "block" else match.group(2)
        return f"decoder.conv_blocks.{last - int(match.group(1))}.{part}.{match.group(3)}"

    return {_LDM_UP.sub(up, key): value for key, value in renamed.items()}


def llamagen_vq_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """LlamaGen ``VQModel`` keys are already ours (``quantize.embedding.weight`` is stored un-normalised,
    ``quantize.codebook_used`` is the usage log)."""
    return dict(state_dict)


def mar_vae_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """MAR's ``AutoencoderKL`` (LDM layout) as :class:`~mmgen_pytorch.tokenizers.AutoencoderKL` keys."""
    return ldm_autoencoder_state_dict(state_dict)


_RQ_CODEBOOK = re.compile(r"quantizer\.codebooks\.(\d+)\.(weight|embed_ema|cluster_size_ema)")


def dnd_rqvae_state_dict(state_dict: Mapping[str, Tensor], *, depth: Optional[int] = None) -> StateDict:
    """DnD's RQ-VAE (kakaobrain layout) as :class:`~mmgen_pytorch.tokenizers.RQVAE` keys.

    The shared codebook is saved once per depth (``quantizer.codebooks.{d}.*``, ``weight`` with a
    never-selected padding row). The copies must be identical and, when ``depth`` is given, exactly
    ``depth`` of them; they become one table ``quantizer.codebook`` (padding row dropped),
    ``quantizer.embed_ema`` and ``quantizer.cluster_size_ema``.
    """
    copies: Dict[int, Dict[str, Tensor]] = {}
    rest = {}
    for key, value in state_dict.items():
        match = _RQ_CODEBOOK.fullmatch(key)
        if match:
            copies.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            rest[key] = value
    found = sorted(copies)
    if not found:
        raise CheckpointMismatchError("the checkpoint has no `quantizer.codebooks.{d}.weight` keys (RQ-VAE codebook)")
    if found != list(range(len(found))) or (depth is not None and len(found) != depth):
        wanted = range(depth if depth is not None else len(found))
        extra = [f"quantizer.codebooks.{d}.*" for d in found if d not in wanted]
        absent = [f"quantizer.codebooks.{d}.*" for d in wanted if d not in copies]
        raise CheckpointMismatchError(
            f"the checkpoint has codebook copies for depths {found} but the model quantizes "
            f"{len(wanted)} depths: unexpected {extra or 'none'}, missing {absent or 'none'}")
    first = copies[0]
    for d in found[1:]:
        for name in sorted(set(first) | set(copies[d])):
            if name not in first or name not in copies[d] or not torch.equal(first[name], copies[d][name]):
                raise CheckpointMismatchError(
                    f"`quantizer.codebooks.{d}.{name}` differs from `quantizer.codebooks.0.{name}`: the codebook "
                    f"is not shared across depths (only shared_codebook=True checkpoints are supported)")
    if "weight" not in first:
        raise CheckpointMismatchError("`quantizer.codebooks.0.weight` is missing")
    rest["quantizer.codebook"] = first["weight"][:-1]  # the last row is the padding index
    for name in ("embed_ema", "cluster_size_ema"):
        if name in first:
            rest[f"quantizer.{name}"] = first[name]
    return ldm_autoencoder_state_dict(rest)


# MAR (LTH14/mar): timm Blocks in `encoder_blocks` / `decoder_blocks` -> backbone `encoder` / `decoder`

TIMM_BLOCK_RENAMES = {
    "norm1": "attn_norm", "attn.qkv": "attn.to_qkv", "attn.proj": "attn.to_out",
    "norm2": "ff_norm", "mlp.fc1": "ff.proj_in", "mlp.fc2": "ff.proj_out",
}

MAR_RULES = {
    **{rf"(encoder|decoder)_blocks\.(\d+)\.{re.escape(timm)}\.(weight|bias)": rf"\1.layers.\2.{ours}.\3"
       for timm, ours in TIMM_BLOCK_RENAMES.items()},
    r"(encoder|decoder)_norm\.(weight|bias)": r"\1.norm.\2",
}


def mar_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """An official MAR state dict with its timm blocks and final norms renamed for our backbone;
    every other key (embeddings, ``z_proj``, ``decoder_embed``, ``diffloss.net.*``) is unchanged."""
    return rename_keys(state_dict, MAR_RULES)
