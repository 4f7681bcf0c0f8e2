"""LlamaGen (FoundationVision/LlamaGen ``autoregressive/models/gpt.py``) GPT checkpoints, which DnD's
share: the block key map both ways, the keys outside the blocks (one output layer, or DnD's depth
heads), ``ModelArgs`` / training ``args`` -> :class:`~mmgen_pytorch.llamagen.LlamaGen` constructor
arguments, and the strict load.

Reading order: presets -> block keys -> the other keys -> loading a model -> config translation.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Callable, Dict, Mapping, Tuple, Union

from torch import Tensor

from .._utils import check
from ..files import CheckpointMismatchError, StateDict, check_state_dict, load_strict
from .common import (block_rules, check_checkpoint_kind, inverted, merge_pairs, read_checkpoint, rename_keys,
                     unwrap_checkpoint)

# upstream GPT_models: name -> (dim, n_layer, n_head); FFN hidden = find_multiple(int(8 * dim / 3), 256)
PRESETS: Dict[str, Tuple[int, int, int]] = {
    "GPT-B": (768, 12, 12),
    "GPT-L": (1024, 24, 16),
    "GPT-XL": (1280, 36, 20),
    "GPT-XXL": (1536, 48, 24),
    "GPT-XXXL": (2560, 48, 40),
    "GPT-1B": (2048, 22, 32),
    "GPT-3B": (3200, 24, 32),  # head_dim 100
    "GPT-7B": (4096, 32, 32),
}


# the transformer blocks -> backbone

BLOCK_NAMES = {
    "attention.wqkv.weight": "attn.to_qkv.weight",
    "attention.wo.weight": "attn.to_out.weight",
    "feed_forward.w2.weight": "ff.proj_out.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ff_norm.weight",
}  # w1 | w3 are fused into ff.proj_in
LLAMAGEN_BLOCK_RULES = block_rules(BLOCK_NAMES)
LLAMAGEN_BLOCK_RULES_INVERSE = block_rules(inverted(BLOCK_NAMES))


def llamagen_backbone_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> StateDict:
    """LlamaGen's ``layers.*`` and ``norm.weight`` as our :class:`Transformer` keys (w1|w3 fused)."""
    blocks = {k: v for k, v in state_dict.items() if k.startswith("layers.") or k == "norm.weight"}
    blocks = merge_pairs(blocks, ".feed_forward.w1.weight", ".feed_forward.w3.weight", ".ff.proj_in.weight")
    return {prefix + k: v for k, v in rename_keys(blocks, LLAMAGEN_BLOCK_RULES).items()}


def llamagen_backbone_to_official(state_dict: Mapping[str, Tensor], prefix: str = "") -> StateDict:
    """The inverse of :func:`llamagen_backbone_state_dict`: our ``{prefix}layers.*`` and ``{prefix}norm.weight``
    as LlamaGen keys (``proj_in`` split back into ``w1`` | ``w3``); keys outside ``prefix`` are left out."""
    blocks = {k[len(prefix):]: v for k, v in state_dict.items()
              if k.startswith(prefix + "layers.") or k == prefix + "norm.weight"}
    for key in [k for k in blocks if k.endswith(".ff.proj_in.weight")]:
        stem = key[: -len("ff.proj_in.weight")]
        blocks[stem + "feed_forward.w1.weight"], blocks[stem + "feed_forward.w3.weight"] = blocks.pop(key).chunk(2)
    return rename_keys(blocks, LLAMAGEN_BLOCK_RULES_INVERSE)


# the keys outside the blocks: upstream key -> ours

OFFICIAL_KEYS = {
    "tok_embeddings.weight": "token_embed.weight",
    "cls_embedding.embedding_table.weight": "prefix_embed.table.weight",
    "cls_embedding.uncond_embedding": "prefix_embed.uncond_embedding",
    "cls_embedding.cap_proj.fc1.weight": "prefix_embed.fc1.weight",
    "cls_embedding.cap_proj.fc2.weight": "prefix_embed.fc2.weight",
    "output.weight": "code_heads.to_logits.weight",
}


def official_keys(model) -> Dict[str, str]:
    """Upstream key -> ours outside the transformer blocks of ``model``: :data:`OFFICIAL_KEYS`, or, for a
    model with depth heads (DnD), ``norm.{k}`` / ``output.{k}`` for ``code_heads.depths.{k}`` in place of
    the output layer."""
    depth = _depth_heads(model)
    if not depth:
        return OFFICIAL_KEYS
    keys = {theirs: ours for theirs, ours in OFFICIAL_KEYS.items() if theirs != "output.weight"}
    for k in range(depth):
        keys[f"norm.{k}.weight"] = f"code_heads.depths.{k}.norm.weight"
        keys[f"output.{k}.weight"] = f"code_heads.depths.{k}.to_logits.weight"
    return keys


def _depth_heads(model) -> int:
    """The number of depth heads of ``model`` (0: one output layer)."""
    return model.code_heads.code_depth or 0


def _check_depth_heads(model, state_dict: Mapping[str, Tensor]) -> None:
    """A checkpoint with another number of depth heads is an error naming the head keys (upstream loads
    with ``strict=False`` and leaves a head untrained)."""
    found = {k for k in state_dict if k.startswith(("norm.", "output."))}
    expected = {k for k in official_keys(model) if k.startswith(("norm.", "output."))}
    if found != expected:
        heads = sum(re.fullmatch(r"output\.\d+\.weight", k) is not None for k in found)
        raise CheckpointMismatchError(
            f"the official checkpoint has {heads} prediction heads but the model has {_depth_heads(model)} "
            f"({model.code_heads.describe()}): missing {', '.join(sorted(expected - found)) or 'none'}; "
            f"unexpected {', '.join(sorted(found - expected)) or 'none'}. Set `num_pred_heads` and "
            f"`pred_head_positions` in `config` to the checkpoint's (ImageNet: 2 heads after blocks [39, 47])")


# loading a model

def from_official(cls, checkpoint, *, config, use_ema: bool, translate: Callable[..., Dict[str, Any]], **kwargs):
    """``cls.from_official``: read the checkpoint, ``translate(config, args)`` to constructor arguments,
    build ``cls(**arguments, **kwargs)`` and load the weights strictly; in eval mode."""
    raw = read_checkpoint(checkpoint)
    arguments = translate(config, raw.get("args"))
    weights = official_weights(raw, use_ema)
    check_checkpoint_kind(weights, "llamagen_gpt")
    model = cls(**arguments, **kwargs)
    model.load_official_state_dict(weights)
    return model.eval()


def load_official_state_dict(model, state_dict: Mapping[str, Tensor], *, target: str) -> None:
    """Load upstream-named weights into ``model`` strictly; a mismatch names the upstream keys and
    ``target`` (the model's summary)."""
    if _depth_heads(model):
        _check_depth_heads(model, state_dict)
    state_dict = {k: v for k, v in state_dict.items() if k != "freqs_cis"}
    check_state_dict(official_state_dict(model), state_dict, target=target, source="official checkpoint")
    ours = llamagen_backbone_state_dict(state_dict, prefix="backbone.")
    keys = official_keys(model)
    ours.update({keys[k]: v for k, v in state_dict.items() if k in keys})
    if model.caption_encoder is not None:
        ours.update({f"caption_encoder.{k}": v for k, v in model.caption_encoder.state_dict().items()})
    load_strict(model, ours, source="official checkpoint")


def official_state_dict(model) -> Dict[str, Tensor]:
    """``model``'s weights under upstream's key names (without the caption encoder, which upstream lacks)."""
    ours = model.state_dict()
    official = llamagen_backbone_to_official(ours, prefix="backbone.")
    official.update({theirs: ours[mine] for theirs, mine in official_keys(model).items() if mine in ours})
    return official


# config translation: ModelArgs of autoregressive/models/gpt.py and the training args

OFFICIAL_DEFAULTS: Dict[str, Any] = dict(
    dim=4096, n_layer=32, n_head=32, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None, rope_base=10000,
    norm_eps=1e-5, initializer_range=0.02, token_dropout_p=0.1, attn_dropout_p=0.0, resid_dropout_p=0.1,
    ffn_dropout_p=0.1, drop_path_rate=0.0, num_classes=1000, caption_dim=2048, class_dropout_prob=0.1,
    model_type="c2i", vocab_size=16384, cls_token_num=1, block_size=256, max_batch_size=32, max_seq_len=2048,
)
OFFICIAL_EXTRAS = ("gpt_model", "image_size", "downsample_size")
# training-script argument -> config field (train_c2i.py / sample_c2i.py names)
TRAINING_ARGS = {"gpt_model": "gpt_model", "gpt_type": "model_type", "vocab_size": "vocab_size",
                 "cls_token_num": "cls_token_num", "num_classes": "num_classes", "image_size": "image_size",
                 "downsample_size": "downsample_size"}


def official_config(config: Union[Mapping[str, Any], str, None], args: Any = None, *,
                    presets: Mapping[str, Tuple[int, int, int]] = PRESETS) -> Dict[str, Any]:
    """Upstream ``ModelArgs`` fields (+ ``gpt_model`` / ``image_size`` / ``downsample_size`` and the
    checkpoint's training ``args``) -> :class:`~mmgen_pytorch.llamagen.LlamaGen` constructor arguments. ``presets``: the
    ``gpt_model`` names (upstream's ``GPT_models``)."""
    given = config_dict(config)
    unknown = sorted(set(given) - set(OFFICIAL_DEFAULTS) - set(OFFICIAL_EXTRAS))
    check(not unknown, f"`config` has unknown fields {unknown}; expected upstream ModelArgs names "
                       f"{sorted(OFFICIAL_DEFAULTS)} or {list(OFFICIAL_EXTRAS)}")
    given = _with_training_args(given, args)
    given = _with_preset(given, presets)
    grid = _official_grid(given)
    if given.get("model_type") == "t2i":
        given.setdefault("cls_token_num", 120)  # upstream t2i runs only with 120 caption tokens
    m = {**OFFICIAL_DEFAULTS, **given}
    if m["drop_path_rate"]:
        warnings.warn(f"drop_path_rate={m['drop_path_rate']} is ignored: stochastic depth is not implemented "
                      f"(inference is unaffected)")
    return dict(dim=m["dim"], depth=m["n_layer"], heads=m["n_head"], kv_heads=m["n_kv_head"],
                ff_multiple_of=m["multiple_of"], ff_dim_multiplier=m["ffn_dim_multiplier"], rope_base=m["rope_base"],
                norm_eps=m["norm_eps"], initializer_range=m["initializer_range"], token_dropout=m["token_dropout_p"],
                attn_dropout=m["attn_dropout_p"], resid_dropout=m["resid_dropout_p"], ff_dropout=m["ffn_dropout_p"],
                num_classes=m["num_classes"], caption_dim=m["caption_dim"],
                class_dropout_prob=m["class_dropout_prob"], model_type=m["model_type"], vocab_size=m["vocab_size"],
                cls_token_num=m["cls_token_num"], grid_size=grid)


def config_dict(config) -> Dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, str):
        return {"gpt_model": config}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    check(hasattr(config, "__dict__"), f"`config` must be a mapping, a dataclass, a namespace or a preset name, "
                                       f"got {type(config).__name__}")
    return dict(vars(config))


def _with_training_args(given: Dict[str, Any], args: Any) -> Dict[str, Any]:
    """Fill from the checkpoint's training ``args``; a field given both ways must agree."""
    if args is None:
        return given
    args = args if isinstance(args, Mapping) else vars(args)
    given = dict(given)
    for arg, field in TRAINING_ARGS.items():
        if args.get(arg) is None:
            continue
        check(given.get(field, args[arg]) == args[arg],
              f"`config['{field}']` is {given.get(field)!r} but the checkpoint was trained with {arg}={args[arg]!r}")
        given[field] = args[arg]
    return given


def _with_preset(given: Dict[str, Any], presets: Mapping[str, Tuple[int, int, int]]) -> Dict[str, Any]:
    name = given.pop("gpt_model", None)
    if name is None:
        return given
    check(name in presets, f"`gpt_model` must be one of {list(presets)}, got {name!r}")
    for field, value in zip(("dim", "n_layer", "n_head"), presets[name]):
        check(given.get(field, value) == value,
              f"`config['{field}']` is {given.get(field)!r} but gpt_model {name} has {field}={value}")
        given[field] = value
    return given


def _official_grid(given: Mapping[str, Any]) -> int:
    """The image-token grid side from ``block_size`` and/or ``image_size / downsample_size``."""
    block, image = given.get("block_size"), given.get("image_size")
    down = given.get("downsample_size") or 16
    check(block is not None or image is not None,
          "`config` must give `block_size` (grid_size ** 2) or `image_size` (+ `downsample_size`, default 16): "
          "checkpoints do not store the 2-D RoPE grid, and a wrong one loads silently "
          "(256 px: block_size 256; 384 px: block_size 576)")
    grid_block = math.isqrt(block) if block is not None else None
    check(block is None or grid_block * grid_block == block,
          f"`block_size` must be a square number (grid_size ** 2), got {block}")
    if image is None:
        return grid_block
    check(image % down == 0, f"`image_size` ({image}) must be divisible by `downsample_size` ({down})")
    grid_image = image // down
    check(grid_block in (None, grid_image),
          f"`block_size`={block} is a {grid_block}x{grid_block} grid but `image_size`={image} / `downsample_size`="
          f"{down} is {grid_image}x{grid_image} (block_size {grid_image ** 2}); the checkpoint would load without "
          f"error and generate with wrong 2-D positions")
    return grid_image


def official_weights(raw: Mapping, use_ema: bool) -> Dict[str, Tensor]:
    """The state dict of a read checkpoint: the raw weights, or the ``"ema"`` ones with ``use_ema``."""
    wrappers = ("model", "module", "state_dict", "ema")
    check(not use_ema or isinstance(raw.get("ema"), Mapping),
          f"`use_ema=True` but the checkpoint has no 'ema' entry (top-level keys: {sorted(raw)[:10]})")
    return unwrap_checkpoint(raw, keys=wrappers, prefer="ema" if use_ema else None)
