"""Small helpers shared by every module."""

from __future__ import annotations

from typing import Any, Optional, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def exists(value: Any) -> bool:
    return value is not None


def default(value: Optional[T], fallback: T) -> T:
    return value if value is not None else fallback


def divisible_by(numerator: int, denominator: int) -> bool:
    return denominator != 0 and numerator % denominator == 0


def round_up_to_multiple(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def check(condition: bool, message: str, error: type = ValueError) -> None:
    """Raise ``error(message)`` when ``condition`` is false: the one way inputs are validated."""
    if not condition:
        raise error(message)


def describe(tensor: Any) -> str:
    """A short description of a received value for error messages."""
    if isinstance(tensor, Tensor):
        return f"Tensor(shape={tuple(tensor.shape)}, dtype={tensor.dtype})"
    return f"{type(tensor).__name__}({tensor!r})" if not isinstance(tensor, (list, tuple)) else f"{type(tensor).__name__} of length {len(tensor)}"


def check_finite(name: str, tensor: Tensor) -> None:
    check(bool(torch.isfinite(tensor).all()), f"`{name}` contains NaN or inf values")
