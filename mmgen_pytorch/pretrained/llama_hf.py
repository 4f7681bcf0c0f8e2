"""Hugging Face LLaMA (``LlamaForCausalLM``) checkpoints -> MonoFormer: the block key map (fused qkv and
gate|up, rotary rows permuted to adjacent pairs), ``LlamaConfig`` -> backbone settings, and loading the
backbone, text embeddings and ``lm_head`` (:meth:`~mmgen_pytorch.monoformer.MonoFormer.from_llama`).
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from einops import rearrange
from torch import Tensor

from .._utils import check, describe
from ..files import CheckpointMismatchError, StateDict, load_strict, read_json_file
from .common import block_rules, load_checkpoint, merge_pairs, rename_keys

# the blocks

BLOCK_NAMES = {
    "self_attn.o_proj.weight": "attn.to_out.weight",
    "mlp.down_proj.weight": "ff.proj_out.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "self_attn.to_qkv.weight": "attn.to_qkv.weight",  # q | k | v, fused before renaming
    "ff.proj_in.weight": "ff.proj_in.weight",  # gate | up, fused before renaming
}
HF_LLAMA_BLOCK_RULES = {**block_rules(BLOCK_NAMES, theirs="model.layers."), r"model\.norm\.weight": "norm.weight"}


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


# config and files

LLAMA_KEYS = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")


def llama_transformer_config(config: Mapping) -> dict:
    """Backbone settings of a HF ``LlamaConfig`` (dict); unsupported variants raise ValueError."""
    check(config.get("hidden_act", "silu") == "silu", f"only SiLU LLaMAs are supported, got {config.get('hidden_act')}")
    check(not config.get("attention_bias", False) and not config.get("mlp_bias", False),
          "LLaMA checkpoints with attention or MLP biases are not supported")
    check(config.get("rope_scaling") is None, f"RoPE scaling is not supported, got {config.get('rope_scaling')}")
    heads = config["num_attention_heads"]
    return dict(dim=config["hidden_size"], depth=config["num_hidden_layers"], heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                dim_head=config.get("head_dim") or config["hidden_size"] // heads,
                ff_hidden=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                rotary_base=config.get("rope_theta", 10000.0))


def read_llama_state_dict(source) -> dict:
    """A HF LLaMA state dict from a mapping or file; rotary ``inv_freq`` buffers are dropped and any key
    outside ``model.*`` / ``lm_head`` raises :class:`CheckpointMismatchError`."""
    state = {k: v for k, v in load_checkpoint(source).items() if not k.endswith("rotary_emb.inv_freq")}
    unexpected = sorted(k for k in state if k not in LLAMA_KEYS and not k.startswith("model.layers."))
    if unexpected or "model.embed_tokens.weight" not in state:
        raise CheckpointMismatchError(f"not a LlamaForCausalLM state dict: unexpected keys {unexpected[:20]}"
                                      + ("" if "model.embed_tokens.weight" in state else
                                         ", `model.embed_tokens.weight` missing"))
    return state


def read_llama_config(config) -> dict:
    """A HF ``LlamaConfig`` from a dict or a ``config.json`` path (read by :func:`~mmgen_pytorch.files.read_json_file`)."""
    if isinstance(config, (str, os.PathLike)):
        return read_json_file(config)
    check(isinstance(config, Mapping), f"`config` must be a dict or a config.json path, got {describe(config)}")
    return dict(config)


# loading a model

def from_llama(cls, source, config, **kwargs):
    """``MonoFormer.from_llama``: the file read and checked before ``cls`` is built, then loaded."""
    config = read_llama_config(config)
    state = read_llama_state_dict(source)  # a broken file is named before the model is built
    transformer = {**llama_transformer_config(config), **kwargs.pop("transformer", {})}
    model = cls(num_text_tokens=config["vocab_size"], transformer=transformer, **kwargs)
    load_llama(model, state, init_std=config.get("initializer_range", 0.02))
    return model


def load_llama(model, source, *, init_std: float = 0.02) -> None:
    """Load a HF LLaMA state dict into ``model``'s backbone, ``token_emb`` and ``to_text_logits`` rows
    ``[0, num_text_tokens)``; the rows after them are re-drawn from normal(init_std)."""
    state = read_llama_state_dict(source)
    embed = state["model.embed_tokens.weight"]
    head = state.get("lm_head.weight", embed)  # tied embeddings have no lm_head
    size = model.vocab.num_text_tokens
    for name, weight in (("model.embed_tokens.weight", embed), ("lm_head.weight", head)):
        check(tuple(weight.shape) == (size, model.dim),
              f"`{name}` is {tuple(weight.shape)}, the model expects ({size}, {model.dim})",
              CheckpointMismatchError)
    load_strict(model.transformer, hf_llama_backbone_state_dict(state, dim_head=model.transformer.dim_head),
                source="LLaMA checkpoint")
    with torch.no_grad():
        for table, weight in ((model.token_emb.weight, embed), (model.to_text_logits.weight, head)):
            table[:size].copy_(weight)
            table[size:].normal_(std=init_std)
