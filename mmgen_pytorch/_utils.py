"""Small helpers shared by every module."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator, Optional, TypeVar

import torch
from beartype import BeartypeConf, beartype
from jaxtyping import jaxtyped
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


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a block in eval mode and restore the module's training flag afterwards, also on errors."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def typechecked(function):
    """Check a function's arguments against its jaxtyping / typing annotations at call time (beartype),
    ints accepted where floats are annotated; a mismatch raises a ``TypeError`` naming the argument.
    For small public helpers whose inputs come straight from users, not for per-layer hot paths."""
    return jaxtyped(typechecker=beartype(conf=BeartypeConf(is_pep484_tower=True)))(function)


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
    """Skipped under ``torch.compile`` (as :func:`check_index_range`): a value check would break the graph."""
    if torch.compiler.is_compiling():
        return
    check(bool(torch.isfinite(tensor).all()), f"`{name}` contains NaN or inf values")


def is_index_tensor(value: Any) -> bool:
    """An integer tensor that can index an embedding: not float, complex or bool."""
    return (isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex()
            and value.dtype != torch.bool)


def check_index_range(name: str, ids: Tensor, upper: int, *, what: str = "", bound: Optional[str] = None) -> None:
    """``ids`` must lie in ``[0, upper)``; ``bound`` names the setting behind ``upper`` (e.g. ``"vocab_size"``).

    One min/max reduction (a host sync); an empty tensor passes. Skipped under ``torch.compile``,
    where the host sync would break the graph (the compiled embedding lookups bounds-check)."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    check(0 <= low and high < upper, f"`{name}` must be {what + ' ' if what else ''}in [0, {upper})"
                                     f"{f' ({bound})' if bound else ''}, got values in [{low}, {high}]")


def check_finite_number(name: str, value: Any, *, minimum: Optional[float] = None) -> None:
    """A real, finite scalar option (a guidance scale, a temperature), optionally ``>= minimum``."""
    number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    check(isinstance(number, numbers.Real) and not isinstance(number, bool) and math.isfinite(number)
          and (minimum is None or number >= minimum),
          f"`{name}` must be a finite number{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
