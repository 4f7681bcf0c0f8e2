"""Models saved as a folder (``config.json`` + ``model.safetensors``) and training resumed bit-identically.

Loading never unpickles: the constructor arguments are JSON, weights are safetensors, and the training
state (optimizer, scheduler, EMA counters, step, RNG states) loads with ``torch.load(weights_only=True)``.

:class:`Checkpointable` records the arguments the outermost constructor of a model was called with, so
``MonoFormer(...)`` records MonoFormer's arguments, not the ones it passes on to ``Transfusion``.
Arguments JSON cannot hold (a frozen VAE, a tokenizer, an objective instance, a callable) are listed in
``config.json`` under ``"required"`` and must be passed again to :meth:`Checkpointable.load`; a
checkpointable submodule (a ``Transformer`` instance, a ``CaptionEncoder``) is saved as its own config.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from ._utils import check, describe
from .pretrained import (CheckpointFileError, CheckpointMismatchError, check_state_dict, checkpoint_format, load_strict,
                         read_json_file, read_tensor_file)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
FORMAT = 1

PathLike = Union[str, os.PathLike]
M = TypeVar("M", bound="Checkpointable")

_ARGUMENTS = "_checkpoint_arguments"  # instance attribute: the outermost constructor's arguments
_REGISTRY: Dict[str, type] = {}       # "module:qualname" -> Checkpointable subclass
_DATACLASS, _MODULE = "__dataclass__", "__module__"


class Checkpointable:
    """Mixin for ``nn.Module`` models: ``model.save(path)`` and ``Model.load(path, **overrides)``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[_qualified_name(cls)] = cls
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    def save(self, path: PathLike) -> Path:
        """Write ``path/config.json`` (class, library version, constructor arguments) and
        ``path/model.safetensors``; returns the folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config, required = _encode_arguments(self)
        from . import __version__
        record = {"class": type(self).__name__, "module": type(self).__module__, "library_version": __version__,
                  "format": FORMAT, "dtype": _uniform_dtype(self), "config": config, "required": required}
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
        _write_atomically(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        save_weights(self, folder / WEIGHTS_FILE)
        return folder

    @classmethod
    def load(cls: Type[M], path: PathLike, *, map_location: Union[str, torch.device] = "cpu", **overrides) -> M:
        """The model saved in ``path`` (by :meth:`save` or :func:`save_training_state`), weights loaded
        strictly, in eval mode, on ``map_location``. ``overrides`` replace constructor arguments and
        must supply those listed under ``"required"`` in ``config.json`` (None where optional).
        ``Checkpointable.load`` (or :func:`load_model`) builds whichever class was saved."""
        folder = Path(path)
        record = read_config(folder)
        target = _saved_class(cls, record, folder)
        missing = {name: kind for name, kind in record["required"].items() if name not in overrides}
        check(not missing, _missing_arguments_message(target, folder, missing), error=TypeError)
        checkpoint_format(folder / WEIGHTS_FILE, expected="safetensors")  # missing / truncated: before building
        arguments = _decoded_arguments(record, folder / CONFIG_FILE)
        model = target(**{**arguments, **overrides})
        if record.get("dtype"):
            model.to(_saved_dtype(record["dtype"]))
        load_weights(model, folder / WEIGHTS_FILE)
        return model.to(map_location).eval()


def load_model(path: PathLike, *, map_location: Union[str, torch.device] = "cpu", **overrides) -> nn.Module:
    """Any model saved with :meth:`Checkpointable.save`, built as the class recorded in ``config.json``."""
    return Checkpointable.load(path, map_location=map_location, **overrides)


# recording constructor arguments

def _recording(init: Callable) -> Callable:
    signature = inspect.signature(init)
    check(all(p.kind is not p.VAR_POSITIONAL for p in signature.parameters.values()),
          f"a Checkpointable constructor cannot take *args, got {init.__qualname__}{signature}", error=TypeError)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if _ARGUMENTS not in self.__dict__:  # the outermost constructor; its super().__init__ calls are not recorded
            arguments = _bound_arguments(signature, self, args, kwargs)
            if arguments is not None:
                self.__dict__[_ARGUMENTS] = arguments
        init(self, *args, **kwargs)

    return __init__


def _bound_arguments(signature: inspect.Signature, instance, args, kwargs) -> Optional[Dict[str, Any]]:
    """Every argument by name, defaults included (so a later default change cannot alter a saved model);
    ``**kwargs`` flattened. None when the call does not bind: the constructor raises its own error."""
    try:
        bound = signature.bind(instance, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = {}
    for name, value in list(bound.arguments.items())[1:]:
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update({key: _copy_containers(v) for key, v in value.items()})
        else:
            arguments[name] = _copy_containers(value)
    return arguments


def _copy_containers(value):
    """Fresh dicts / lists / tuples, so a constructor that mutates its input cannot alter the record."""
    if isinstance(value, dict):
        return {key: _copy_containers(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_copy_containers(v) for v in value)
    return value


# JSON encoding of arguments

class _NotJSON(Exception):
    """An argument config.json cannot hold; the message names the offending value's type."""


def _encode_arguments(model) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(JSON config, {argument: type of what JSON cannot hold}) of a constructed model."""
    arguments = model.__dict__.get(_ARGUMENTS)
    check(arguments is not None, f"{type(model).__name__} has no recorded constructor arguments (it was not "
                                 f"built by calling its class), so it cannot be saved with its config",
          error=TypeError)
    submodules = {id(m) for m in model.modules()} if isinstance(model, nn.Module) else set()
    config, required = {}, {}
    for name, value in arguments.items():
        try:
            config[name] = _encode(value, submodules)
        except _NotJSON as error:
            required[name] = str(error)
    return config, required


def _encode(value, submodules: set):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotJSON(f"float {value}")
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [_encode(v, submodules) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) and key not in (_DATACLASS, _MODULE) for key in value):
            raise _NotJSON("dict with non-string or reserved keys")
        return {key: _encode(v, submodules) for key, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name), submodules) for f in dataclasses.fields(value) if f.init}
        return {_DATACLASS: _qualified_name(type(value)), "fields": fields}
    if isinstance(value, Checkpointable) and id(value) in submodules and _ARGUMENTS in value.__dict__:
        # a submodule: its weights are in the parent's state dict, its config goes in the parent's
        config, required = _encode_arguments(value)
        if not required:
            return {_MODULE: _qualified_name(type(value)), "config": config}
    raise _NotJSON(type(value).__name__)


def _decode(value):
    """JSON -> constructor arguments: arrays become tuples, tagged objects dataclasses / submodules."""
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    if _DATACLASS in value:
        cls = _resolve_class(value[_DATACLASS], dataclasses.is_dataclass)
        return cls(**{name: _decode(v) for name, v in value["fields"].items()})
    if _MODULE in value:
        cls = _resolve_class(value[_MODULE], lambda c: c in _REGISTRY.values())
        return cls(**{name: _decode(v) for name, v in value["config"].items()})
    return {key: _decode(v) for key, v in value.items()}


def _decoded_arguments(record: Mapping[str, Any], file: Path) -> Dict[str, Any]:
    """The constructor arguments in a ``config.json`` record; a malformed entry raises naming the file."""
    try:
        return {name: _decode(value) for name, value in record["config"].items()}
    except (KeyError, TypeError, AttributeError) as error:  # a tagged entry without its fields, unknown fields
        raise CheckpointFileError(f"{str(file)!r} has a malformed `config` entry ({type(error).__name__}: {error}); "
                                  f"it was not written by this version of mmgen_pytorch, or was edited") from error


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str, allowed: Callable[[type], bool]) -> type:
    """A class by ``module:qualname``, from a module already imported or inside mmgen_pytorch (a
    config.json cannot make loading import arbitrary code); ``allowed`` must accept it."""
    module_name, _, qualname = str(name).partition(":")
    module = sys.modules.get(module_name)
    if module is None and module_name.split(".")[0] == "mmgen_pytorch":
        module = importlib.import_module(module_name)
    found = module
    for part in qualname.split(".") if module is not None else ():
        found = getattr(found, part, None)
    check(module is not None and isinstance(found, type) and allowed(found),
          f"config.json names the class {name!r}, which is not a loadable class here (it must be an mmgen_pytorch "
          f"class, or one from a module you imported, of the right kind)", error=CheckpointMismatchError)
    return found


# config.json

def read_config(path: PathLike) -> Dict[str, Any]:
    """The parsed ``config.json`` of a saved model folder, checked for the fields :meth:`load` needs."""
    file = Path(path) / CONFIG_FILE
    check(file.is_file(), f"{str(path)!r} has no {CONFIG_FILE}: not a folder written by `save` / "
                          f"`save_training_state`", error=FileNotFoundError)
    record = read_json_file(file)
    check(isinstance(record, dict) and {"class", "config", "required"} <= set(record)
          and isinstance(record["class"], str) and isinstance(record["config"], dict)
          and isinstance(record["required"], dict) and isinstance(record.get("format", FORMAT), int)
          and record.get("format", FORMAT) <= FORMAT,
          f"{file} is not a config.json this version of mmgen_pytorch reads (format {FORMAT}): "
          f"got {describe(record) if not isinstance(record, dict) else sorted(record)}",
          error=CheckpointMismatchError)
    return record


def _saved_class(cls: type, record: Mapping[str, Any], folder: Path) -> type:
    """``cls`` itself after checking it is the saved class; for ``Checkpointable.load`` the saved class."""
    saved = record["class"]
    if cls is not Checkpointable:
        check(cls.__name__ == saved, f"{str(folder)!r} holds a {saved} checkpoint, not a {cls.__name__}: load it "
                                     f"with {saved}.load(path) or mmgen_pytorch.load_model(path)",
              error=CheckpointMismatchError)
        return cls
    exact = _REGISTRY.get(f"{record.get('module')}:{saved}")
    by_name = [c for c in _REGISTRY.values() if c.__name__ == saved]
    check(exact is not None or len(by_name) == 1,
          f"{str(folder)!r} holds a {saved} checkpoint (module {record.get('module')}); no unique Checkpointable "
          f"class of that name is imported: import it, or call {saved}.load(path)", error=CheckpointMismatchError)
    return exact if exact is not None else by_name[0]


def _missing_arguments_message(cls: type, folder: Path, missing: Mapping[str, str]) -> str:
    listed = ", ".join(f"`{name}` ({kind})" for name, kind in missing.items())
    call = ", ".join(f"{name}=..." for name in missing)
    return (f"{cls.__name__}.load({str(folder)!r}): the model was built with arguments config.json cannot hold: "
            f"{listed}; pass them again: {cls.__name__}.load(path, {call}) (None where the argument is optional)")


def _saved_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    check(isinstance(dtype, torch.dtype), f"config.json `dtype` must name a torch dtype, got {name!r}",
          error=CheckpointMismatchError)
    return dtype


def _uniform_dtype(module: nn.Module) -> Optional[str]:
    """The dtype shared by every floating tensor of the state dict, else None (loading then keeps the
    constructor's dtypes)."""
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    return str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None


# weights

def save_weights(module: nn.Module, path: PathLike) -> None:
    """``module``'s state dict as safetensors; tensors shared between keys are stored once."""
    _write_atomically(Path(path), lambda tmp: save_model(module, tmp, metadata={"format": "pt"}, force_contiguous=True))


def load_weights(module: nn.Module, path: PathLike) -> None:
    """Load a safetensors file written by :func:`save_weights` strictly (a missing, unexpected or misshapen
    key raises :class:`~mmgen_pytorch.pretrained.CheckpointMismatchError` naming it; ``module`` is left
    untouched when the file is broken or does not fit)."""
    load_strict(module, _with_shared_keys(module, read_weights(path)), source=str(path))


def read_weights(path: PathLike) -> Dict[str, Tensor]:
    """The state dict in a safetensors file; a missing, empty, truncated or foreign file raises naming it."""
    return read_tensor_file(path, expected="safetensors")


def _with_shared_keys(module: nn.Module, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Fill in the keys safetensors dropped because they alias another tensor of ``module`` (tied weights)."""
    groups: Dict[tuple, List[str]] = {}
    for name, tensor in module.state_dict().items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride()) if tensor.numel() else (id(tensor),)
        groups.setdefault(view, []).append(name)
    filled = dict(state_dict)
    for names in groups.values():
        present = [n for n in names if n in state_dict]
        for name in names if present else ():
            filled.setdefault(name, state_dict[present[0]])
    return filled


def _write_atomically(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temporary file and rename it: an interrupted save never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


# training state

def save_training_state(folder: PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        ema: Optional[nn.Module] = None, scheduler: Any = None, grad_scaler: Any = None) -> Path:
    """Everything needed to continue training exactly where it stopped, in ``folder``:

    - ``model.safetensors`` (+ ``config.json`` for a :class:`Checkpointable` model, so
      ``Model.load(folder)`` also works) and, with ``ema`` (an ``ema_pytorch.EMA``), ``ema.safetensors``;
    - ``training_state.pt``: ``step``, the optimizer / scheduler / grad-scaler state dicts, the EMA's
      counters and the RNG states (torch CPU, every CUDA device, Python ``random``, NumPy), stored as
      tensors and plain values that ``torch.load(weights_only=True)`` reads.
    """
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
    state = dict(format=FORMAT, step=step, optimizer=optimizer.state_dict(),
                 scheduler=None if scheduler is None else scheduler.state_dict(),
                 grad_scaler=None if grad_scaler is None else grad_scaler.state_dict(),
                 ema=None if ema is None else _ema_counters(ema), rng=get_rng_states())
    _write_atomically(folder / TRAINING_STATE_FILE, lambda tmp: torch.save(state, tmp))
    return folder


def load_training_state(folder: PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        ema: Optional[nn.Module] = None, scheduler: Any = None, grad_scaler: Any = None,
                        restore_rng: bool = True) -> int:
    """Restore what :func:`save_training_state` wrote into freshly built objects (same architecture,
    optimizer over the same parameters in the same order) and return the step to continue from. Model and
    EMA weights load strictly; RNG states are restored unless ``restore_rng=False``.

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
    if restore_rng:
        loads.append(_rng_load(state["rng"], source))
    for load in loads:  # everything fits: only now is anything changed
        load()
    return int(state["step"])


_TRAINING_STATE_KEYS = {"format", "step", "optimizer", "scheduler", "grad_scaler", "ema", "rng"}


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
    weights = _with_shared_keys(module, read_weights(path))
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
