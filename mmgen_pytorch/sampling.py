"""Token sampling helpers shared by every autoregressive model: logit filters and the draw
(classifier-free guidance lives in :mod:`mmgen_pytorch.guidance`)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ._utils import GeneratorLike, as_generator, check, check_finite_number, typechecked


@typechecked
def top_k_filter(logits: Float[Tensor, "*batch vocab"], k: int) -> Float[Tensor, "*batch vocab"]:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@typechecked
def top_p_filter(logits: Float[Tensor, "*batch vocab"], p: float) -> Float[Tensor, "*batch vocab"]:
    """Nucleus filtering; the most likely token is always kept (HF's shift-right rule)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


@typechecked
def min_p_filter(logits: Float[Tensor, "*batch vocab"], min_p: float) -> Float[Tensor, "*batch vocab"]:
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < limit, float("-inf"))


def check_sampling_options(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                           prefix: str = "") -> None:
    """Validate token-sampling options before any work; ``prefix`` is the arguments' prefix in the
    caller's signature (Transfusion's ``text_``)."""
    check_finite_number(f"{prefix}temperature", temperature, minimum=0)
    check(isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 0,
          f"`{prefix}top_k` must be an int >= 0 (0: off), got {top_k!r}")
    check(0.0 < top_p <= 1.0, f"`{prefix}top_p` must be in (0, 1] (1: off), got {top_p}")
    check(0.0 <= min_p < 1.0, f"`{prefix}min_p` must be in [0, 1) (0: off), got {min_p}")


@typechecked
def filter_logits(logits: Float[Tensor, "*batch vocab"], *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> Float[Tensor, "*batch vocab"]:
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = logits.float() / max(temperature, 1e-5)
    return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)


@typechecked
def sample_from_logits(logits: Float[Tensor, "*batch vocab"], *, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, min_p: float = 0.0, greedy: bool = False,
                       generator: GeneratorLike = None) -> Int[Tensor, "*batch"]:
    """One token id per row of ``logits [..., vocab]``; ``greedy`` (or temperature 0) takes the argmax.
    ``generator``: a ``torch.Generator`` on the logits' device or an int seed."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    generator = as_generator(generator, logits.device)
    probs = F.softmax(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
