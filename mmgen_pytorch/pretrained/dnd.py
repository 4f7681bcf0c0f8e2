"""DnD-Transformer (chenllliang/DnD-Transformer) checkpoints: the GPT's ``ModelArgs`` (LlamaGen's plus
the prediction-head fields) -> :class:`~mmgen_pytorch.dnd.DnDTransformer` arguments, and the RQ-VAE
(kakaobrain layout) keys. The GPT weights themselves, depth heads included, are LlamaGen's format
(:mod:`mmgen_pytorch.pretrained.llamagen`).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .._utils import check
from ..files import CheckpointMismatchError, StateDict
from .ldm import ldm_autoencoder_state_dict
from .llamagen import config_dict, official_config

# DnD's GPT_models that were released: name -> (dim, n_layer, n_head). DnD's XXXL is not LlamaGen's.
PRESETS: Dict[str, Tuple[int, int, int]] = {
    "GPT-XXL": (1536, 48, 24),
    "GPT-XXXL": (2048, 48, 32),
}
IMAGENET_HEAD_POSITIONS = (39, 47)  # ImageNet 256, 16x16x2 codes (both released checkpoints)
ARXIV_HEAD_POSITIONS = (26, 29, 32, 35, 38, 41, 44, 47)  # arXiv images, 16x16x8 codes

# upstream ModelArgs fields beyond LlamaGen's, with their defaults
OFFICIAL_HEAD_DEFAULTS: Dict[str, Any] = dict(num_pred_heads=2, pred_head_positions=list(IMAGENET_HEAD_POSITIONS),
                                              share_prediction_heads=0)


# the GPT's ModelArgs (LlamaGen's + the head fields)

def official_config_dnd(config: Union[Mapping[str, Any], str, None], args: Any = None) -> Dict[str, Any]:
    """Upstream DnD ``ModelArgs`` fields (LlamaGen's, plus ``num_pred_heads``, ``pred_head_positions`` and
    ``share_prediction_heads``; ``gpt_model`` names from :data:`PRESETS`) -> constructor arguments."""
    given = config_dict(config)
    heads = {field: given.pop(field, value) for field, value in OFFICIAL_HEAD_DEFAULTS.items()}
    check(not heads["share_prediction_heads"],
          "`config['share_prediction_heads']` is set: one output layer shared by all depths is not supported "
          "(no released checkpoint uses it)")
    positions = list(heads["pred_head_positions"])
    check(heads["num_pred_heads"] == len(positions),
          f"`config['num_pred_heads']` is {heads['num_pred_heads']} but `pred_head_positions` lists "
          f"{len(positions)} blocks {positions}")
    kwargs = official_config(given, args, presets=PRESETS)
    check(kwargs.pop("model_type") == "c2i",
          "DnDTransformer is class-conditional: `config['model_type']` must be 'c2i'")
    del kwargs["caption_dim"]
    return {**kwargs, "head_positions": positions}


# the RQ-VAE

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
