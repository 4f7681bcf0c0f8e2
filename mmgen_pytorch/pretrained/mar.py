"""MAR (LTH14/mar) checkpoints: the timm blocks of ``encoder_blocks`` / ``decoder_blocks`` -> our backbone
``encoder`` / ``decoder``, its KL-16 VAE (LDM layout), and the training ``args`` / presets ->
:class:`~mmgen_pytorch.mar.MAR` constructor arguments (the DiffLoss size read off the weights).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Dict, Mapping

from torch import Tensor

from .._utils import check
from ..files import StateDict, load_strict
from .common import check_checkpoint_kind, read_checkpoint, rename_keys, unwrap_checkpoint
from .ldm import ldm_autoencoder_state_dict

# upstream factory dims; the DiffLoss sizes are those of the released checkpoints
PRESETS: Dict[str, Dict[str, int]] = {
    "mar_base": dict(encoder_dim=768, encoder_depth=12, encoder_heads=12, decoder_dim=768, decoder_depth=12,
                     decoder_heads=12, diffloss_depth=6, diffloss_width=1024),
    "mar_large": dict(encoder_dim=1024, encoder_depth=16, encoder_heads=16, decoder_dim=1024, decoder_depth=16,
                      decoder_heads=16, diffloss_depth=8, diffloss_width=1280),
    "mar_huge": dict(encoder_dim=1280, encoder_depth=20, encoder_heads=16, decoder_dim=1280, decoder_depth=20,
                     decoder_heads=16, diffloss_depth=12, diffloss_width=1536),
}


# keys

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


def mar_vae_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """MAR's ``AutoencoderKL`` (LDM layout) as :class:`~mmgen_pytorch.tokenizers.AutoencoderKL` keys."""
    return ldm_autoencoder_state_dict(state_dict)


# loading a model

def from_official(cls, checkpoint, *, config, use_ema: bool, **overrides):
    """``MAR.from_official``: the checkpoint read, its config translated, ``cls`` built and loaded strictly."""
    raw = read_checkpoint(checkpoint)
    state = unwrap_checkpoint(raw, prefer="model_ema" if use_ema else "model")
    kwargs = official_config(config, raw.get("args"), cls=cls)
    check_checkpoint_kind(state, "mar")
    kwargs.update(_diffloss_size(state, kwargs))
    kwargs.update(overrides)
    model = cls(**kwargs)
    load_strict(model, mar_state_dict(state), source="MAR checkpoint")
    return model.eval()


# config translation

OFFICIAL_NAMES = {"encoder_embed_dim": "encoder_dim", "encoder_num_heads": "encoder_heads",
                  "decoder_embed_dim": "decoder_dim", "decoder_num_heads": "decoder_heads",
                  "class_num": "num_classes", "diffloss_d": "diffloss_depth", "diffloss_w": "diffloss_width"}
SHARED_NAMES = ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "encoder_depth", "decoder_depth", "mlp_ratio",
                "mask_ratio_min", "label_drop_prob", "attn_dropout", "proj_dropout", "buffer_size",
                "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing")


def official_config(config, args, *, cls) -> Dict[str, Any]:
    """``cls`` (MAR) constructor kwargs from a preset name, a dict (ours or official names) or the
    checkpoint's training ``args``."""
    if config is None and args is not None:
        config = vars(args) if not isinstance(args, Mapping) else dict(args)
    check(config is not None, "`config` is required (a preset name such as 'mar_base' or a dict) when the "
                              "checkpoint carries no `args`")
    if isinstance(config, str):
        check(config in PRESETS, f"`config` must be one of {sorted(PRESETS)} or a dict, got {config!r}")
        return _transformer_dims(config)
    check(isinstance(config, Mapping), f"`config` must be a preset name or a dict, got {type(config).__name__}")
    ours = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = _transformer_dims(str(config.get("model")))  # upstream args name the factory
    for key, value in config.items():
        if key == "norm_layer":
            eps = re.search(r"eps=([0-9.eE+-]+)", str(value))
            if eps:
                kwargs["norm_eps"] = float(eps.group(1))
        elif key in OFFICIAL_NAMES:
            kwargs[OFFICIAL_NAMES[key]] = value
        elif key in ours or key in SHARED_NAMES:
            kwargs[key] = value
    return kwargs


def _transformer_dims(preset: str) -> Dict[str, Any]:
    """A preset's transformer sizes; its DiffLoss size is left to the weights."""
    return {k: v for k, v in PRESETS.get(preset, {}).items() if not k.startswith("diffloss_")}


def _diffloss_size(state: Mapping[str, Tensor], kwargs: Mapping[str, Any]) -> Dict[str, int]:
    """DiffLoss depth / width from the weights, for whichever of the two the config leaves open."""
    inferred = {}
    if "diffloss_width" not in kwargs and "diffloss.net.input_proj.weight" in state:
        inferred["diffloss_width"] = state["diffloss.net.input_proj.weight"].shape[0]
    if "diffloss_depth" not in kwargs:
        pattern = re.compile(r"diffloss\.net\.res_blocks\.(\d+)\..+")
        blocks = {int(m.group(1)) for m in map(pattern.fullmatch, state) if m}
        if blocks:
            inferred["diffloss_depth"] = max(blocks) + 1
    return inferred
