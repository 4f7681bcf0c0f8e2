"""Models saved as a folder (``config.json`` + ``model.safetensors``) and loaded back without unpickling.

The constructor arguments are JSON and the weights safetensors. :class:`Checkpointable` records the
arguments the outermost constructor of a model was called with, so ``MonoFormer(...)`` records
MonoFormer's arguments, not the ones it passes on to ``Transfusion``. Arguments JSON cannot hold (a
frozen VAE, a tokenizer, an objective instance, a callable) are listed in ``config.json`` under
``"required"`` and must be passed again to :meth:`Checkpointable.load`; a checkpointable submodule (a
``Transformer`` instance, a ``CaptionEncoder``) is saved as its own config.

This module imports no upstream key maps, so the backbone can be checkpointable without them; training
state (optimizer, RNG, EMA) is :mod:`mmgen_pytorch.checkpoint`; the Hub conventions over the same folder
are :mod:`mmgen_pytorch.hub`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from ._utils import check, describe
from .files import (CheckpointFileError, CheckpointMismatchError, checkpoint_format, load_strict, read_json_file,
                    read_tensor_file)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1

PathLike = Union[str, os.PathLike]
M = TypeVar("M", bound="Checkpointable")

_ARGUMENTS = "_checkpoint_arguments"  # instance attribute: the outermost constructor's arguments
_REGISTRY: Dict[str, type] = {}       # "module:qualname" -> Configurable subclass
_DATACLASS, _MODULE = "__dataclass__", "__module__"


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Configurable:
    """Mixin that records the outermost constructor's arguments, so that an instance passed to a model's
    constructor (an objective, a time injection, code heads) is written into ``config.json`` as
    its class and arguments and rebuilt on load."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[_qualified_name(cls)] = cls
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)


class Checkpointable(Configurable):
    """Mixin for ``nn.Module`` models: ``model.save(path)`` and ``Model.load(path, **overrides)``, and the
    Hugging Face Hub conventions on the same folder: ``save_pretrained``, ``from_pretrained`` (a folder or a
    Hub repo id), ``push_to_hub`` (:mod:`mmgen_pytorch.hub`)."""

    @classmethod
    def upgraded_arguments(cls, arguments: Dict[str, Any]) -> Dict[str, Any]:
        """The constructor arguments of a ``config.json`` written by an earlier version, in today's form
        (a model whose constructor changed overrides this); called by :meth:`load` before overrides apply."""
        return arguments

    def save(self, path: PathLike) -> Path:
        """Write ``path/config.json`` (class, library version, constructor arguments) and
        ``path/model.safetensors``; returns the folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config, required = encode_arguments(self)
        from . import __version__
        record = {"class": type(self).__name__, "module": type(self).__module__, "library_version": __version__,
                  "format": FORMAT, "dtype": _uniform_dtype(self), "config": config, "required": required}
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
        write_atomically(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
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
        arguments = target.upgraded_arguments(_decoded_arguments(record, folder / CONFIG_FILE))
        model = target(**{**arguments, **overrides})
        if record.get("dtype"):
            model.to(_saved_dtype(record["dtype"]))
        load_weights(model, folder / WEIGHTS_FILE)
        return model.to(map_location).eval()

    # Hugging Face Hub conventions (mmgen_pytorch.hub; huggingface_hub is optional and imported lazily)

    def save_pretrained(self, save_directory: PathLike, *, push_to_hub: bool = False, repo_id: Optional[str] = None,
                        model_card_kwargs: Optional[Dict[str, Any]] = None, **push_to_hub_kwargs) -> Optional[str]:
        """:meth:`save` into ``save_directory`` plus a model card (``README.md``) through huggingface_hub's
        ``ModelHubMixin``; ``push_to_hub=True`` then uploads it to ``repo_id`` (default: the folder's name).
        Without huggingface_hub installed: :meth:`save` alone. Returns the commit URL of a push, else None."""
        from .hub import save_pretrained
        return save_pretrained(self, save_directory, push_to_hub=push_to_hub, repo_id=repo_id,
                               model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)

    def push_to_hub(self, repo_id: str, **options) -> str:
        """Upload the :meth:`save_pretrained` folder to the Hub repo ``repo_id`` (created if absent) in one
        commit; ``options`` are ``ModelHubMixin.push_to_hub``'s (``commit_message``, ``private``, ``token``,
        ``branch``, ``create_pr``, ...). Returns the commit URL. Needs ``pip install mmgen-pytorch[hub]``."""
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, **options)

    @classmethod
    def from_pretrained(cls: Type[M], pretrained_model_name_or_path: Union[str, os.PathLike], *,
                        revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                        force_download: bool = False, token: Union[str, bool, None] = None,
                        local_files_only: bool = False, map_location: Union[str, torch.device] = "cpu",
                        **overrides) -> M:
        """:meth:`load` of a local folder; otherwise ``pretrained_model_name_or_path`` is a Hub repo id
        (``"namespace/name"``) whose ``config.json`` and ``model.safetensors`` are downloaded at ``revision``
        (cached; ``cache_dir``, ``force_download``, ``token``, ``local_files_only`` as in huggingface_hub) and
        loaded the same way. ``overrides`` are :meth:`load`'s (the ``"required"`` arguments among them)."""
        from .hub import from_pretrained
        return from_pretrained(cls, pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                               force_download=force_download, token=token, local_files_only=local_files_only,
                               map_location=map_location, **overrides)


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


def constructor_arguments(model) -> Dict[str, Any]:
    """The arguments ``model`` was constructed with, by name, defaults included (a copy)."""
    arguments = model.__dict__.get(_ARGUMENTS)
    check(arguments is not None, f"{type(model).__name__} has no recorded constructor arguments (it was not "
                                 f"built by calling its class)", error=TypeError)
    return _copy_containers(arguments)


def encode_arguments(model) -> Tuple[Dict[str, Any], Dict[str, str]]:
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


def encode_config(value) -> Any:
    """The JSON form of a configuration value (a config dataclass, lists, dicts, scalars) as ``config.json``
    holds it; a value JSON cannot hold raises."""
    return _encode(value, set())


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
    if (isinstance(value, Configurable) and _ARGUMENTS in value.__dict__
            and (id(value) in submodules or not isinstance(value, nn.Module))):
        # a submodule (its weights are in the parent's state dict) or a plain configured object: its
        # config goes in the parent's
        config, required = encode_arguments(value)
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
    write_atomically(Path(path), lambda tmp: save_model(module, tmp, metadata={"format": "pt"}, force_contiguous=True))


def load_weights(module: nn.Module, path: PathLike) -> None:
    """Load a safetensors file written by :func:`save_weights` strictly (a missing, unexpected or misshapen
    key raises :class:`~mmgen_pytorch.files.CheckpointMismatchError` naming it; ``module`` is left
    untouched when the file is broken or does not fit)."""
    load_strict(module, read_module_weights(module, path), source=str(path))


def read_weights(path: PathLike) -> Dict[str, Tensor]:
    """The state dict in a safetensors file; a missing, empty, truncated or foreign file raises naming it."""
    return read_tensor_file(path, expected="safetensors")


def read_module_weights(module: nn.Module, path: PathLike) -> Dict[str, Tensor]:
    """:func:`read_weights`, with keys saved by an earlier layout renamed (:func:`upgrade_legacy_keys`) and
    the keys safetensors dropped because they alias another tensor of ``module`` (tied weights) filled in."""
    state_dict = upgrade_legacy_keys(module, read_weights(path))
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


def upgrade_legacy_keys(module: nn.Module, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``state_dict`` with the keys of an earlier layout under today's names. A submodule (the model or any
    part of it) declares its renames as an attribute ``legacy_keys = {old_prefix: new_prefix}``,
    relative to itself; a key is renamed only when no key of the new name is present."""
    renames = [(prefix + old, prefix + new) for prefix, sub in _named_prefixes(module)
               for old, new in getattr(sub, "legacy_keys", {}).items()]
    upgraded = {}
    for key, tensor in state_dict.items():
        old, new = next(((o, n) for o, n in renames if key.startswith(o)), (None, None))
        renamed = new + key[len(old):] if old is not None else key
        upgraded[renamed if renamed not in state_dict else key] = tensor
    return upgraded


def _named_prefixes(module: nn.Module):
    return ((name + "." if name else "", sub) for name, sub in module.named_modules())


def write_atomically(path: Path, write: Callable[[str], Any], *, tmp_suffix: str = ".tmp") -> None:
    """Write through a temporary file and rename it: an interrupted save never leaves a truncated file.
    Processes that may write the same file at once each give their own ``tmp_suffix``."""
    tmp = path.with_name(path.name + tmp_suffix)
    write(str(tmp))
    os.replace(tmp, path)
