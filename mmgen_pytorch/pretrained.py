"""Official checkpoints -> our state dicts: one small key map per upstream, plus strict loading.

The maps only rename (and, where layouts differ, concatenate or permute) tensors; loading never needs
the upstream code and always goes through :func:`load_strict`, which names every missing and
unexpected key.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Mapping, Optional

import torch
from einops import rearrange
from torch import Tensor, nn

StateDict = Dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model."""


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a readable diff of missing, unexpected and misshapen keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(f"{k}: model {tuple(expected[k].shape)} vs {source} {tuple(state_dict[k].shape)}"
                       for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or misshapen:
        lines = [f"the {source} does not fit {type(module).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


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


def unwrap_checkpoint(checkpoint: Mapping, keys=("model", "module", "state_dict"), prefer: Optional[str] = None) -> StateDict:
    """The state dict inside a training checkpoint (``{"model": ...}`` etc.) or the dict itself."""
    if prefer is not None and prefer in checkpoint:
        return dict(checkpoint[prefer])
    for key in keys:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)
