"""Classifier-free guidance: the one combine behind every model's CFG, and its per-step schedules.

A guided batch is doubled along dim 0, conditional rows first and their unconditional twins after
(as LlamaGen, MAR and the Transfusion sampler lay it out). Guidance mixes the two halves as
``uncond + scale · (cond − uncond)``; a scale of 1 is the conditional prediction, 0 the
unconditional one. Where only some features are a guidable prediction (ε next to learned variance
values, MonoFormer's 3-of-4 channels), ``features`` limits the mix and every later feature keeps its
own half's value.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from ._utils import check, check_finite_number, typechecked

CFG_SCHEDULES = ("linear", "constant")


def check_cfg_scale(cfg_scale: float, name: str = "cfg_scale") -> None:
    """A guidance scale: finite and >= 0 (1: no guidance, 0: the unconditional prediction)."""
    check_finite_number(name, cfg_scale, minimum=0)


@typechecked
def cfg_combine(cond: Float[Tensor, "*shape"], uncond: Float[Tensor, "*shape"], scale: float) -> Float[Tensor, "*shape"]:
    """``uncond + scale · (cond − uncond)``."""
    return uncond + (cond - uncond) * scale


def guide(doubled: Tensor, scale: float, *, features: Optional[int] = None, feature_dim: int = -1) -> Tensor:
    """The guided conditional half of a doubled batch ``[cond; uncond]``.

    ``features``: only the first ``features`` entries along ``feature_dim`` are guided (default all);
    the rest are the conditional half's own.
    """
    cond, uncond = _halves(doubled)
    if features is None:
        return cfg_combine(cond, uncond, scale)
    guided = cfg_combine(cond.narrow(feature_dim, 0, features), uncond.narrow(feature_dim, 0, features), scale)
    return torch.cat((guided, _rest(cond, features, feature_dim)), dim=feature_dim)


def guide_both_halves(doubled: Tensor, scale: float, *, features: int, feature_dim: int = -1) -> Tensor:
    """ADM's form: both halves get the guided first ``features`` entries, each keeps its own rest."""
    cond, uncond = _halves(doubled)
    guided = guide(doubled, scale, features=features, feature_dim=feature_dim).narrow(feature_dim, 0, features)
    return torch.cat((torch.cat((guided, _rest(cond, features, feature_dim)), dim=feature_dim),
                      torch.cat((guided, _rest(uncond, features, feature_dim)), dim=feature_dim)))


def check_cfg_schedule(schedule: str) -> str:
    """``schedule`` if it is one of :data:`CFG_SCHEDULES`, else a :class:`ValueError` naming `cfg_schedule`."""
    check(schedule in CFG_SCHEDULES, f"`cfg_schedule` must be one of {CFG_SCHEDULES}, got {schedule!r}")
    return schedule


def scheduled_cfg_scale(cfg_scale: float, schedule: str, *, known: int, total: int) -> float:
    """The scale of a step at which ``known`` of ``total`` tokens are known: ``cfg_scale`` ("constant")
    or ``1 + (cfg_scale − 1) · known / total`` ("linear", MAR's schedule)."""
    check_cfg_schedule(schedule)
    return cfg_scale if schedule == "constant" else 1.0 + (cfg_scale - 1.0) * known / total


def _halves(doubled: Tensor):
    check(doubled.shape[0] % 2 == 0, f"a guided batch has conditional and unconditional rows (an even count), "
                                     f"got {doubled.shape[0]}")
    return doubled.chunk(2, dim=0)


def _rest(half: Tensor, features: int, feature_dim: int) -> Tensor:
    return half.narrow(feature_dim, features, half.shape[feature_dim] - features)
