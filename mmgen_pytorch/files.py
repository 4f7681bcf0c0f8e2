"""Reading checkpoint and JSON files safely, and loading state dicts strictly.

What a file is comes from its first bytes, so an empty, truncated or foreign file (an HTML error page
saved as ``.pth``) is named as such instead of failing deep inside torch or safetensors; torch files
load with ``weights_only=True`` only. Used by saved model folders (:mod:`mmgen_pytorch.saving`),
training state (:mod:`mmgen_pytorch.checkpoint`) and upstream checkpoints (:mod:`mmgen_pytorch.pretrained`).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ._utils import check

StateDict = Dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model, or it cannot be loaded safely."""


class CheckpointFileError(CheckpointMismatchError):
    """A file that cannot be read as what it should hold: empty, truncated, not valid JSON, or no checkpoint
    at all (an HTML error page saved by a failed download). The message names the file."""


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a readable diff of missing, unexpected and misshapen keys."""
    check_state_dict(module.state_dict(), state_dict, target=type(module).__name__, source=source)
    module.load_state_dict(state_dict, strict=True)


def check_state_dict(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], *, target: str,
                     source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, unexpected and misshapen key of
    ``state_dict`` against ``expected`` (e.g. a model's state dict in the upstream key names)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(f"{k}: model {tuple(expected[k].shape)} vs {source} {tuple(state_dict[k].shape)}"
                       for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or misshapen:
        lines = [f"the {source} does not fit {target}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))


# file formats, from the first bytes

TORCH_ZIP_MAGIC = b"PK\x03\x04"         # torch.save's default zip archive
PICKLE_PROTOCOLS = range(2, 6)          # legacy torch.save: b"\x80" + protocol byte
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors refuses larger JSON headers
FILE_FORMATS = {"torch": "torch.save output (a zip archive or a legacy pickle)", "safetensors": "safetensors"}


def checkpoint_format(path, *, expected: Optional[str] = None) -> str:
    """``"torch"`` or ``"safetensors"``, read off the first bytes of the file ``path``. Raises
    :class:`CheckpointFileError` naming the file when it is empty, truncated or not a checkpoint at all,
    or (with ``expected``, a :data:`FILE_FORMATS` key) of the other format; ``FileNotFoundError`` when absent."""
    path = Path(path)
    check(path.exists(), f"checkpoint file {str(path)!r} does not exist", error=FileNotFoundError)
    check(path.is_file(), f"{str(path)!r} is a folder, not a checkpoint file", error=CheckpointFileError)
    size = path.stat().st_size
    check(size > 0, f"{str(path)!r} is empty (0 bytes), not a checkpoint: the save or download did not "
                    f"complete", error=CheckpointFileError)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(TORCH_ZIP_MAGIC):
        check(zipfile.is_zipfile(path), f"{str(path)!r} is truncated: it starts as a torch.save zip archive but "
                                        f"ends after {size} bytes, before the archive's end record",
              error=CheckpointFileError)
        found = "torch"
    elif head[:1] == b"\x80" and len(head) > 1 and head[1] in PICKLE_PROTOCOLS:
        found = "torch"
    elif _safetensors_header_size(head):
        _check_safetensors_complete(path, _safetensors_header_size(head), size)
        found = "safetensors"
    else:
        raise CheckpointFileError(
            f"{str(path)!r} is not a checkpoint: it is {_describe_content(head)}, while torch.save output starts "
            f"with {TORCH_ZIP_MAGIC!r} (zip) or b'\\x80' and a pickle protocol byte, and a safetensors file with an "
            f"8-byte header length and '{{'")
    check(expected is None or found == expected,
          f"{str(path)!r} is {FILE_FORMATS[found]}, expected {FILE_FORMATS[expected or found]}",
          error=CheckpointFileError)
    return found


def _safetensors_header_size(head: bytes) -> Optional[int]:
    """The JSON header length of a safetensors file starting with ``head``, or None if it does not look like one."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    size = int.from_bytes(head[:8], "little")
    return size if 2 <= size <= SAFETENSORS_HEADER_LIMIT else None


def _check_safetensors_complete(path: Path, header_size: int, size: int) -> None:
    """The header and every tensor's bytes lie inside the file (a cut-off download fails here, by name)."""
    check(8 + header_size <= size, f"{str(path)!r} is truncated: its safetensors header alone should take "
                                   f"{8 + header_size} bytes, the file has {size}", error=CheckpointFileError)
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(header_size))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise CheckpointFileError(f"{str(path)!r} is not a valid safetensors file: its header is corrupt "
                                      f"({error})") from None
    expected = 8 + header_size + max(ends, default=0)
    check(size >= expected, f"{str(path)!r} is truncated: its safetensors header promises {expected} bytes, the "
                            f"file has {size}", error=CheckpointFileError)


def _describe_content(head: bytes) -> str:
    """What the first bytes of a file that is no checkpoint look like, for the error message."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return f"an HTML / XML page (starting {head[:32]!r}), e.g. the error page of a failed download"
    decoded = head.decode("utf-8", "replace").rstrip("\ufffd")  # the 64 bytes may end inside a character
    if "\ufffd" not in decoded and all(c.isprintable() or c.isspace() for c in decoded):
        return f"a text file starting {decoded[:32]!r}"
    return f"binary data starting {head[:8]!r}"


def read_tensor_file(path, *, expected: Optional[str] = None, safe_globals: Sequence[Any] = ()) -> Any:
    """What the checkpoint file ``path`` holds, never unpickling arbitrary objects: ``torch.save`` output
    through ``torch.load(weights_only=True)`` (``safe_globals`` allow-listed for this call only), safetensors
    as a state dict. The format is checked first (:func:`checkpoint_format`); every failure names the file."""
    found = checkpoint_format(path, expected=expected)
    try:
        if found == "safetensors":
            return load_file(path)
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, error, safe_globals)
        if not unsafe:
            raise _unreadable(path, found, error) from error
        raise CheckpointMismatchError(
            f"{str(path)!r} is a PyTorch checkpoint that holds objects torch.load(weights_only=True) does not "
            f"load, because loading them would run their code: {', '.join(unsafe)}. If you trust these classes, "
            f"allow-list them with torch.serialization.add_safe_globals([...]) (or the safe_globals context "
            f"manager) and load again; or, only for a file from a source you trust, read it yourself with "
            f"torch.load(path, weights_only=False) and pass the dict") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, SafetensorError) as error:
        raise _unreadable(path, found, error) from error


def _unreadable(path, found: str, error: Exception) -> CheckpointFileError:
    reason = str(error).strip().splitlines()[-1:] or [""]
    return CheckpointFileError(f"{str(path)!r} starts as {FILE_FORMATS[found]} but cannot be read: it is "
                               f"truncated or corrupt ({type(error).__name__}: {reason[0][:200]})")


def _unsafe_globals(path, error: Exception, allowed: Sequence[Any]) -> list:
    """The globals of a torch checkpoint that weights-only loading refuses (all of them for a zip archive,
    the first one torch reports for a legacy file)."""
    found = re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError):
            pass
    names = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in allowed}
    return sorted(set(found) - names)


def read_json_file(path) -> Any:
    """The parsed JSON file ``path``; an empty, non-UTF-8 or malformed (e.g. truncated) file raises
    :class:`CheckpointFileError` naming the file, the line and the column."""
    path = Path(path)
    check(path.is_file(), f"JSON file {str(path)!r} does not exist", error=FileNotFoundError)
    raw = path.read_bytes()
    check(raw.strip(), f"{str(path)!r} is empty, not JSON: the save or download did not complete",
          error=CheckpointFileError)
    try:
        text = raw.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise CheckpointFileError(f"{str(path)!r} is not valid JSON: it is not UTF-8 text (it starts "
                                  f"{raw[:16]!r})") from None
    except json.JSONDecodeError as error:
        cut = " where the text ends, so the file is probably truncated" if error.pos >= len(text.rstrip()) else ""
        raise CheckpointFileError(f"{str(path)!r} is not valid JSON at line {error.lineno}, column {error.colno}"
                                  f"{cut}: {error.msg}") from None

