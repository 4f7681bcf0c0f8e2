"""Hugging Face Hub conventions for every :class:`~mmgen_pytorch.saving.Checkpointable` model:
``save_pretrained``, ``from_pretrained`` (a local folder or a Hub repo id) and ``push_to_hub``.

The folder is the one :meth:`~mmgen_pytorch.saving.Checkpointable.save` writes (``config.json`` +
``model.safetensors``), plus a model card (``README.md``) when huggingface_hub is installed. The Hub side
is ``huggingface_hub.ModelHubMixin`` with its two hooks delegating to ``save`` and ``load``; the mixin's
own reading of ``config.json`` (flat constructor keywords) is not used, since ours is a record checked by
:func:`~mmgen_pytorch.saving.read_config`. huggingface_hub is optional (``pip install mmgen-pytorch[hub]``)
and imported only by a call that needs it: local folders save and load without it.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Type, Union

import torch

from ._utils import check, install_hint
from .saving import CONFIG_FILE, WEIGHTS_FILE, PathLike, encode_arguments

LIBRARY_NAME = "mmgen-pytorch"
# "name" or "namespace/name"; the Hub checks the finer rules itself
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")

MODEL_CARD = """---
{{ card_data }}
---

# {{ model_class }}

A `{{ model_class }}` of the mmgen-pytorch library: `config.json` holds its constructor arguments, \
`model.safetensors` its weights (loaded strictly, without unpickling).

```python
from {{ model_module }} import {{ model_class }}

model = {{ model_class }}.from_pretrained("{{ source }}"{{ required_arguments }})
```
{% if required_arguments %}
The model was built with arguments JSON cannot hold; pass them again as above ({{ required_types }}).
{% endif %}"""


def huggingface_hub(purpose: str):
    """The ``huggingface_hub`` module, or an ImportError naming the extra to install."""
    try:
        import huggingface_hub as hub
    except ImportError as error:
        raise ImportError(f"{purpose} needs huggingface_hub, an optional dependency of mmgen-pytorch: "
                          f"{install_hint('hub')}") from error
    return hub


def _hub_available() -> bool:
    try:
        importlib.import_module("huggingface_hub")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _hub_checkpoint_class() -> type:
    """``ModelHubMixin`` around a Checkpointable model, built on first use (the import is lazy)."""
    hub = huggingface_hub("the Hub mixin")
    from . import __version__

    class HubCheckpoint(hub.ModelHubMixin, library_name=LIBRARY_NAME, tags=[LIBRARY_NAME, "pytorch"],
                        model_card_template=MODEL_CARD):
        def __init__(self, model):
            self.model = model

        def _save_pretrained(self, save_directory: Path) -> None:
            self.model.save(save_directory)

        @classmethod
        def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir, force_download: bool,
                             local_files_only: bool, token, checkpoint_class: type, map_location,
                             overrides: Dict[str, Any]):
            folder = hub.snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, local_files_only=local_files_only,
                                           token=token, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
                                           library_name=LIBRARY_NAME, library_version=__version__)
            return cls(checkpoint_class.load(folder, map_location=map_location, **overrides))

        def generate_model_card(self, *args, **kwargs):
            _, required = encode_arguments(self.model)
            card = dict(model_class=type(self.model).__name__, model_module=type(self.model).__module__,
                        required_arguments="".join(f", {name}=..." for name in required),
                        required_types=", ".join(f"`{name}`: {kind}" for name, kind in required.items()))
            return super().generate_model_card(*args, **{**card, **kwargs})

    return HubCheckpoint


def save_pretrained(model, save_directory: PathLike, *, push_to_hub: bool = False, repo_id: Optional[str] = None,
                    model_card_kwargs: Optional[Dict[str, Any]] = None, **push_to_hub_kwargs) -> Optional[str]:
    """:meth:`~mmgen_pytorch.saving.Checkpointable.save` into ``save_directory`` plus a model card, through
    ``ModelHubMixin.save_pretrained``; without huggingface_hub, ``save`` alone (a push then raises)."""
    encode_arguments(model)  # an unsaveable model raises here, before the mixin removes an old config.json
    if push_to_hub:
        huggingface_hub("save_pretrained(push_to_hub=True)")
    elif not _hub_available():
        model.save(save_directory)
        return None
    card = {"source": repo_id or str(save_directory), **(model_card_kwargs or {})}
    return _hub_checkpoint_class()(model).save_pretrained(save_directory, push_to_hub=push_to_hub, repo_id=repo_id,
                                                          model_card_kwargs=card, **push_to_hub_kwargs)


def push_to_hub(model, repo_id: str, *, model_card_kwargs: Optional[Dict[str, Any]] = None, **options) -> str:
    """``ModelHubMixin.push_to_hub``: the folder of :func:`save_pretrained` uploaded to ``repo_id`` in one
    commit (``options``: its ``commit_message``, ``private``, ``token``, ``branch``, ``create_pr``, ...)."""
    huggingface_hub("push_to_hub")
    encode_arguments(model)
    card = {"source": repo_id, **(model_card_kwargs or {})}
    return _hub_checkpoint_class()(model).push_to_hub(repo_id, model_card_kwargs=card, **options)


def from_pretrained(cls: Type, source: Union[str, os.PathLike], *, revision: Optional[str] = None,
                    cache_dir: Optional[PathLike] = None, force_download: bool = False,
                    token: Union[str, bool, None] = None, local_files_only: bool = False,
                    map_location: Union[str, torch.device] = "cpu", **overrides):
    """``cls.load(source)`` for a local folder; for a Hub repo id, its ``config.json`` and
    ``model.safetensors`` downloaded (``snapshot_download``, cached) and loaded the same way."""
    check(isinstance(source, (str, os.PathLike)), f"from_pretrained: expected a folder or a Hub repo id (a str or "
                                                  f"path), got {type(source).__name__}", error=TypeError)
    if os.path.isdir(source):
        return cls.load(source, map_location=map_location, **overrides)
    check(not os.path.exists(source), f"from_pretrained: {str(source)!r} is a file; pass the folder that holds "
                                      f"{CONFIG_FILE} and {WEIGHTS_FILE}", error=NotADirectoryError)
    check(isinstance(source, str) and _REPO_ID.fullmatch(source) is not None,
          f"from_pretrained: there is no folder {str(source)!r}, and it is not a Hub repo id (\"name\" or "
          f"\"namespace/name\")", error=FileNotFoundError)
    huggingface_hub(f"from_pretrained({source!r}) (not a local folder: a Hub repo id)")
    return _hub_checkpoint_class()._from_pretrained(
        model_id=source, revision=revision, cache_dir=cache_dir, force_download=force_download,
        local_files_only=local_files_only, token=token, checkpoint_class=cls, map_location=map_location,
        overrides=overrides).model
