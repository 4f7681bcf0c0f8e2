"""Small helpers shared by every module."""

from __future__ import annotations

import contextlib
import math
import numbers
from pathlib import Path
from typing import Any, Iterator, Optional, TypeVar, Union

import torch
from beartype import BeartypeConf, beartype
from jaxtyping import jaxtyped
from torch import Tensor, nn

T = TypeVar("T")
GeneratorLike = Union[torch.Generator, int, None]  # what every public `generator=` argument takes


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


def check_has_data(name: str, tensor: Tensor) -> None:
    """Value checks need values: a meta tensor (a shape without data) is refused by name up front."""
    check(tensor.device.type != "meta",
          f"`{name}` is a meta tensor (a shape without values); give a tensor with data on a real device")


def check_finite(name: str, tensor: Tensor) -> None:
    """Skipped under ``torch.compile`` (as :func:`check_index_range`): a value check would break the graph."""
    if torch.compiler.is_compiling():
        return
    check_has_data(name, tensor)
    check(bool(torch.isfinite(tensor).all()), f"`{name}` contains NaN or inf values")


def check_value_range(name: str, tensor: Tensor, low: float, high: float, *, expected: str, hint: str = "") -> None:
    """Finite values in ``[low, high]`` (``expected`` says so in words), from one min/max reduction (one
    host sync); NaN or inf are reported as by :func:`check_finite`. Skipped under ``torch.compile``."""
    if tensor.numel() == 0 or torch.compiler.is_compiling():
        return
    check_has_data(name, tensor)
    lowest, highest = (float(v) for v in torch.aminmax(tensor))
    check(math.isfinite(lowest) and math.isfinite(highest), f"`{name}` contains NaN or inf values")
    check(low <= lowest and highest <= high,
          f"`{name}` must be {expected}, got values in [{lowest:.4g}, {highest:.4g}]{hint}")


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
    check_has_data(name, ids)
    low, high = (int(v) for v in torch.aminmax(ids))
    check(0 <= low and high < upper, f"`{name}` must be {what + ' ' if what else ''}in [0, {upper})"
                                     f"{f' ({bound})' if bound else ''}, got values in [{low}, {high}]")


def check_finite_number(name: str, value: Any, *, minimum: Optional[float] = None,
                        maximum: Optional[float] = None, strict: bool = False) -> None:
    """A real, finite scalar option (a guidance scale, a temperature), optionally ``>= minimum`` (``>``
    with ``strict``) and ``<= maximum``."""
    number = value.item() if isinstance(value, Tensor) and value.numel() == 1 and value.device.type != "meta" else value
    valid = isinstance(number, numbers.Real) and not isinstance(number, bool) and math.isfinite(number)
    if valid and minimum is not None:
        valid = number > minimum if strict else number >= minimum
    if valid and maximum is not None:
        valid = number <= maximum
    check(valid, f"`{name}` must be a finite number{_bounds(minimum, maximum, strict)}, got {value!r}")


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    """A boolean option (``None`` too with ``optional``); TypeError naming it otherwise."""
    expected = "a bool or None" if optional else "a bool"
    check(isinstance(value, bool) or (optional and value is None), f"`{name}` must be {expected}, got {value!r}",
          error=TypeError)


def _bounds(minimum: Optional[float], maximum: Optional[float], strict: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if strict else '['}{minimum}, {maximum}]"
    if minimum is not None:
        return f" {'>' if strict else '>='} {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def as_enum(enum: type, value: Any, name: str):
    """``value`` as a member of ``enum`` (a member, or its value such as ``"flat"``); ValueError naming
    ``name`` and the allowed values otherwise."""
    try:
        return enum(value)
    except ValueError:
        allowed = [member.value for member in enum]
        raise ValueError(f"`{name}` must be one of {allowed} (or {enum.__name__}.*), got {value!r}") from None


def as_int(value: Any) -> Optional[int]:
    """A Python int from an int, a NumPy integer or a 0-dim integer tensor; None for anything else
    (bools, floats, tensors with more than one value or without data)."""
    if isinstance(value, Tensor):
        usable = value.ndim == 0 and is_index_tensor(value) and value.device.type != "meta"
        return int(value) if usable else None
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def as_generator(generator: GeneratorLike, device: Union[torch.device, str, None] = None, *,
                 name: str = "generator") -> Optional[torch.Generator]:
    """The ``generator=`` of every public entry point: None, a ``torch.Generator`` (kept as it is), or an
    int seed, which becomes a new Generator on ``device`` (where the caller draws) seeded with it."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    seed = as_int(generator)
    check(seed is not None and 0 <= seed < 2 ** 64,
          f"`{name}` must be a torch.Generator or an int seed in [0, 2**64), got {describe(generator)}")
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)


def like_parameters(tensor: Tensor, module: nn.Module) -> Tensor:
    """A float input moved to the device and dtype of ``module``'s parameters, as the models take
    inputs of another precision (float64 / float16 images into a float32 tokenizer)."""
    reference = next(module.parameters(), None)
    return tensor if reference is None else tensor.to(device=reference.device, dtype=reference.dtype)


def pick_alias(name: str, value: Any, alias: str, alias_value: Any, fallback: Any) -> Any:
    """One option under two names (ours and transfusion-pytorch's): whichever is given; both only if equal."""
    check(value is None or alias_value is None or value == alias_value,
          f"`{name}` ({value!r}) and its alias `{alias}` ({alias_value!r}) disagree: give one of them")
    return default(value, default(alias_value, fallback))


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """A count or size option (a resolution, a length) as a Python int ``>= minimum`` (default 1): TypeError
    naming ``name`` for anything but an int (bools refused), ValueError below ``minimum``."""
    number = as_int(value)
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    check(number is not None, f"`{name}` must be {expected}, got {describe(value)}", error=TypeError)
    check(number >= minimum, f"`{name}` must be {expected}, got {number}")
    return number


@contextlib.contextmanager
def recompile_limit_at_least(limit: int) -> Iterator[None]:
    """Inside, dynamo compiles up to ``limit`` variants of one function (its default, 8, is a handful of
    shapes) before it gives up: the compiled kernels and steps of this library set their own."""
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, limit)):
        yield


def install_hint(extra: str) -> str:
    """The command that installs the optional dependencies ``extra`` (setup.py's extras_require): in a checkout
    of the repository (setup.py beside the package, e.g. an editable install) ``pip install -e ".[extra]"`` run
    there, else ``pip install "mmgen-pytorch[extra]"`` (quoted: shells such as zsh expand brackets)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "setup.py").is_file():
        return f'pip install -e ".[{extra}]" (in {root})'
    return f'pip install "mmgen-pytorch[{extra}]"'
