"""Training resumed bit-identically: model, EMA, optimizer, scheduler, grad scaler, step and RNG states.

Loading never unpickles: weights are safetensors and the training state loads with
``torch.load(weights_only=True)``. A :class:`~mmgen_pytorch.saving.Checkpointable` model is saved as its
folder (``config.json`` + ``model.safetensors``, :mod:`mmgen_pytorch.saving`), so ``Model.load(folder)``
also works on a training checkpoint.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ._utils import check, describe
from .files import CheckpointFileError, CheckpointMismatchError, check_state_dict, read_tensor_file
from .saving import FORMAT, WEIGHTS_FILE, Checkpointable, PathLike, read_module_weights, save_weights, write_atomically

EMA_WEIGHTS_FILE = "ema.safetensors"
TRAINING_STATE_FILE = "training_state.pt"

# training state


class TrainedPart(NamedTuple):
    """A second module trained alongside the model with its own optimizer (a tokenizer's discriminator)."""
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None


def save_training_state(folder: PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        ema: Optional[nn.Module] = None, scheduler: Any = None, grad_scaler: Any = None,
                        parts: Mapping[str, TrainedPart] = {}) -> Path:
    """Everything needed to continue training exactly where it stopped, in ``folder``:

    - ``model.safetensors`` (+ ``config.json`` for a :class:`Checkpointable` model, so
      ``Model.load(folder)`` also works) and, with ``ema`` (an ``ema_pytorch.EMA``), ``ema.safetensors``;
    - ``training_state.pt``: ``step``, the optimizer / scheduler / grad-scaler state dicts, the EMA's
      counters and the RNG states (torch CPU, every CUDA device, Python ``random``, NumPy), stored as
      tensors and plain values that ``torch.load(weights_only=True)`` reads;
    - for each of ``parts`` (name -> :class:`TrainedPart`), ``{name}.safetensors`` and its optimizer /
      scheduler states in ``training_state.pt``.
    """
    _check_parts(parts)
    check(isinstance(step, int) and not isinstance(step, bool) and step >= 0,
          f"`step` must be a non-negative int, got {describe(step)}", error=TypeError)
    folder = Path(folder)
    model = _unwrapped(model)
    if isinstance(model, Checkpointable):
        model.save(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(model, folder / WEIGHTS_FILE)
    if ema is not None:
        save_weights(_ema_model(ema), folder / EMA_WEIGHTS_FILE)
    for name, part in parts.items():
        save_weights(_unwrapped(part.module), folder / f"{name}.safetensors")
    state = dict(format=FORMAT, step=step, optimizer=optimizer.state_dict(),
                 scheduler=None if scheduler is None else scheduler.state_dict(),
                 grad_scaler=None if grad_scaler is None else grad_scaler.state_dict(),
                 ema=None if ema is None else _ema_counters(ema), rng=get_rng_states(),
                 parts={name: dict(optimizer=part.optimizer.state_dict(),
                                   scheduler=None if part.scheduler is None else part.scheduler.state_dict())
                        for name, part in parts.items()})
    write_atomically(folder / TRAINING_STATE_FILE, lambda tmp: torch.save(state, tmp))
    return folder


def load_training_state(folder: PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        ema: Optional[nn.Module] = None, scheduler: Any = None, grad_scaler: Any = None,
                        restore_rng: bool = True, parts: Mapping[str, TrainedPart] = {}) -> int:
    """Restore what :func:`save_training_state` wrote into freshly built objects (same architecture,
    optimizer over the same parameters in the same order) and return the step to continue from. Model and
    EMA weights load strictly; RNG states are restored unless ``restore_rng=False``. ``parts`` must name
    the parts the folder was saved with.

    Every file is read and every part checked against its target (keys and shapes of the weights, the
    optimizer's parameter groups and state, the scheduler / grad scaler / EMA / RNG states) before anything
    is changed: on any error, all the objects passed in are left as they were."""
    folder = Path(folder)
    file = folder / TRAINING_STATE_FILE
    check(file.is_file(), f"{str(folder)!r} has no {TRAINING_STATE_FILE}: not a folder written by "
                          f"`save_training_state`", error=FileNotFoundError)
    model, ema_model = _unwrapped(model), None if ema is None else _ema_model(ema)
    state = _read_training_state(file)
    for name, target in (("scheduler", scheduler), ("grad_scaler", grad_scaler), ("ema", ema)):
        check(target is None or state[name] is not None,
              f"`{name}` was given but {str(file)!r} holds no {name} state (it was saved without one)",
              error=ValueError)
    source = str(file)
    loads = [_weights_load(model, folder / WEIGHTS_FILE), _optimizer_load(optimizer, state["optimizer"], source)]
    for name, target in (("scheduler", scheduler), ("grad_scaler", grad_scaler)):
        if target is not None:
            loads.append(_state_dict_load(name, target, state[name], source))
    if ema is not None:
        loads += [_weights_load(ema_model, folder / EMA_WEIGHTS_FILE), _ema_counters_load(ema, state["ema"], source)]
    loads += _parts_load(parts, state.get("parts", {}), folder, source)
    if restore_rng:
        loads.append(_rng_load(state["rng"], source))
    for load in loads:  # everything fits: only now is anything changed
        load()
    return int(state["step"])


_TRAINING_STATE_KEYS = {"format", "step", "optimizer", "scheduler", "grad_scaler", "ema", "rng"}  # + "parts"


def _check_parts(parts: Mapping[str, TrainedPart]) -> None:
    check(isinstance(parts, Mapping), f"`parts` must be a mapping of names to TrainedPart, got {describe(parts)}",
          error=TypeError)
    for name, part in parts.items():
        check(isinstance(name, str) and name.isidentifier() and name not in ("model", "ema"),
              f"`parts` names must be identifiers other than 'model' and 'ema' (they name files), got {name!r}")
        check(isinstance(part, TrainedPart), f"`parts[{name!r}]` must be a TrainedPart, got {describe(part)}",
              error=TypeError)


def _parts_load(parts: Mapping[str, TrainedPart], saved: Any, folder: Path, source: str) -> List[Callable[[], None]]:
    """Check every part's weights and states now; the returned calls load them."""
    _check_parts(parts)
    check(isinstance(saved, Mapping) and set(saved) == set(parts),
          f"{source!r} holds the trained parts {sorted(saved) if isinstance(saved, Mapping) else describe(saved)}, "
          f"but `parts` gives {sorted(parts)}: resume with the parts the run was saved with",
          error=CheckpointMismatchError)
    loads = []
    for name, part in parts.items():
        where = f"{source} (part {name!r})"
        loads += [_weights_load(_unwrapped(part.module), folder / f"{name}.safetensors"),
                  _optimizer_load(part.optimizer, saved[name]["optimizer"], where)]
        if part.scheduler is not None:
            check(saved[name]["scheduler"] is not None, f"a scheduler was given for part {name!r} but {source!r} "
                                                        f"holds none for it", error=ValueError)
            loads.append(_state_dict_load(f"{name} scheduler", part.scheduler, saved[name]["scheduler"], where))
    return loads


def _read_training_state(file: Path) -> Dict[str, Any]:
    state = read_tensor_file(file, expected="torch")
    keys = set(state) if isinstance(state, dict) else set()
    check(_TRAINING_STATE_KEYS <= keys and isinstance(state["step"], int) and isinstance(state["format"], int)
          and state["format"] <= FORMAT,
          f"{str(file)!r} is not a training state this version of mmgen_pytorch reads (format {FORMAT}): "
          f"missing {sorted(_TRAINING_STATE_KEYS - keys) or 'nothing'}"
          + (f", format {state['format']!r}" if "format" in keys else ""), error=CheckpointFileError)
    return state


def _weights_load(module: nn.Module, path: Path) -> Callable[[], None]:
    """Read and check ``path`` against ``module`` now; the returned call loads it."""
    weights = read_module_weights(module, path)
    check_state_dict(module.state_dict(), weights, target=type(module).__name__, source=str(path))
    return lambda: module.load_state_dict(weights, strict=True)


def _state_dict_load(name: str, target: Any, saved: Any, source: str) -> Callable[[], None]:
    """A scheduler / grad scaler state: a dict with the entries ``target``'s own state dict has."""
    current = target.state_dict()
    check(isinstance(saved, Mapping) and (bool(saved) or not current),
          f"the {name} state in {source!r} is {describe(saved) if not isinstance(saved, Mapping) else 'empty'}, "
          f"but the given {name} has entries {sorted(current)}", error=CheckpointMismatchError)
    _check_entries(name, set(current), set(saved), source)
    return lambda: target.load_state_dict(saved)


def _check_entries(name: str, current: set, saved: set, source: str) -> None:
    """``saved`` has the ``current`` entry names. Entries added or dropped by another torch version are allowed;
    entries missing on both sides mean another class (an SGD state for AdamW, StepLR for LambdaLR)."""
    only_saved, only_current = sorted(saved - current), sorted(current - saved)
    check(not (only_saved and only_current),
          f"the {name} state in {source!r} does not fit the given {name} (another class?): entries only in the "
          f"file {only_saved}, only in the {name} {only_current}", error=CheckpointMismatchError)


# optimizer state entries with one value per parameter element (torch.optim's elementwise optimizers)
_ELEMENTWISE_STATE = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg",
                      "acc_delta", "sum", "exp_inf", "ax", "prev", "step_size"}


def _optimizer_load(optimizer: torch.optim.Optimizer, saved: Any, source: str) -> Callable[[], None]:
    """Check what ``Optimizer.load_state_dict`` would only partly check (or not at all) before it changes anything:
    the parameter groups (count, sizes, options) and each parameter's state (index, elementwise shapes)."""
    check(isinstance(saved, Mapping) and {"state", "param_groups"} <= set(saved) and isinstance(saved["state"], Mapping)
          and all(isinstance(g, Mapping) and "params" in g for g in saved["param_groups"]),
          f"the optimizer state in {source!r} is not an optimizer state dict", error=CheckpointFileError)
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    _check_param_groups(groups, saved_groups, source)
    params = dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                      itertools.chain.from_iterable(g["params"] for g in groups)))
    for index, entry in saved["state"].items():
        check(index in params, f"the optimizer state in {source!r} has state for parameter {index!r}, which "
                               f"no parameter group lists", error=CheckpointMismatchError)
        for key, value in entry.items():
            check(key not in _ELEMENTWISE_STATE or not isinstance(value, Tensor)
                  or value.shape == params[index].shape,
                  f"the optimizer state in {source!r} does not fit the optimizer's parameters: `{key}` of "
                  f"parameter {index} has shape {tuple(value.shape)}, the parameter {tuple(params[index].shape)} "
                  f"(parameters in another order?)", error=CheckpointMismatchError)
    return lambda: optimizer.load_state_dict(saved)


def _check_param_groups(groups: List[Mapping], saved_groups: List[Mapping], source: str) -> None:
    """As many groups, of the same sizes, with the options of the same optimizer class."""
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved_groups]
    check(sizes == saved_sizes, f"the optimizer state in {source!r} has parameter groups of sizes {saved_sizes}, "
                                f"the optimizer {sizes}: build it over the same parameters, in the same groups "
                                f"and order", error=CheckpointMismatchError)
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        _check_entries(f"optimizer parameter group {index}", {k for k in group if k != "params"},
                       {k for k in saved_group if k != "params"}, source)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _ema_model(ema: nn.Module) -> nn.Module:
    check(isinstance(getattr(ema, "ema_model", None), nn.Module),
          f"`ema` must be an ema_pytorch.EMA (with an `ema_model`), got {describe(ema)}", error=TypeError)
    return ema.ema_model


def _ema_counters(ema: nn.Module) -> Dict[str, Tensor]:
    """The EMA's own buffers (ema_pytorch: ``initted``, ``step``), without the two models' weights."""
    return {key: value.clone() for key, value in ema.state_dict().items()
            if not key.startswith(("ema_model.", "online_model."))}


def _ema_counters_load(ema: nn.Module, saved: Mapping[str, Tensor], source: str) -> Callable[[], None]:
    """Check the saved EMA counters against ``ema``'s now; the returned call copies them in."""
    current = {key: value for key, value in ema.state_dict().items()
               if not key.startswith(("ema_model.", "online_model."))}
    check_state_dict(current, saved, target=f"{type(ema).__name__} counters", source=source)

    def load():
        for key, value in saved.items():
            current[key].copy_(value)  # state_dict tensors share storage with the buffers
    return load


# RNG states as weights-only-loadable values

def get_rng_states() -> Dict[str, Any]:
    """torch CPU, CUDA (every device, when available), Python ``random`` and NumPy (when importable)
    generator states, as tensors, ints, floats and None."""
    version, internal, gauss_next = random.getstate()
    states: Dict[str, Any] = dict(torch=torch.get_rng_state(), python=dict(
        version=version, state=torch.tensor(internal, dtype=torch.int64), gauss_next=gauss_next))
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = _numpy()
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = dict(kind=kind, keys=torch.from_numpy(keys.astype(numpy.int64)), position=int(position),
                               has_gauss=int(has_gauss), cached_gaussian=float(cached))
    return states


def _rng_load(saved: Any, source: str) -> Callable[[], None]:
    """Check the saved RNG states have this process's layout (tensor shapes and dtypes, entry names) now;
    the returned call restores them. CUDA / NumPy states missing on either side are skipped as in
    :func:`set_rng_states`."""
    current = get_rng_states()
    check(isinstance(saved, Mapping) and {"torch", "python"} <= set(saved),
          f"the RNG states in {source!r} lack the torch / Python generator states", error=CheckpointFileError)
    for name in sorted(set(current) & set(saved)):
        _check_layout(f"rng.{name}", current[name], saved[name], source)
    return lambda: set_rng_states(saved)


def _check_layout(name: str, current: Any, saved: Any, source: str) -> None:
    """``saved`` nests like ``current``: tensors of the same shape and dtype, dicts with the same keys
    (lists are compared over their common length: CUDA states for the devices both have)."""
    if isinstance(current, Tensor):
        ok = isinstance(saved, Tensor) and saved.shape == current.shape and saved.dtype == current.dtype
        check(ok, f"`{name}` in {source!r} is {describe(saved)}, expected {describe(current)}",
              error=CheckpointMismatchError)
    elif isinstance(current, Mapping):
        check(isinstance(saved, Mapping) and set(saved) == set(current),
              f"`{name}` in {source!r} has entries {sorted(saved) if isinstance(saved, Mapping) else describe(saved)}"
              f", expected {sorted(current)}", error=CheckpointMismatchError)
        for key in current:
            _check_layout(f"{name}.{key}", current[key], saved[key], source)
    elif isinstance(current, (list, tuple)):
        check(isinstance(saved, (list, tuple)), f"`{name}` in {source!r} is {describe(saved)}, expected a list",
              error=CheckpointMismatchError)
        for index, (mine, theirs) in enumerate(zip(current, saved)):
            _check_layout(f"{name}.{index}", mine, theirs, source)


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned; CUDA states only for the devices present."""
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        for device, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    numpy = _numpy()
    if "numpy" in states and numpy is not None:
        saved = states["numpy"]
        numpy.random.set_state((saved["kind"], saved["keys"].numpy().astype(numpy.uint32), saved["position"],
                                saved["has_gauss"], saved["cached_gaussian"]))


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy
