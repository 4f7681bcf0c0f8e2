"""LlamaGen's VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py``) checkpoints: its keys are already
ours (our encoder / decoder layout is LlamaGen's)."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..files import StateDict


def llamagen_vq_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """LlamaGen ``VQModel`` keys are already ours (``quantize.embedding.weight`` is stored un-normalised,
    ``quantize.codebook_used`` is the usage log)."""
    return dict(state_dict)
