"""Captions for image datasets: reading a captions file, and caption text -> padded token ids with a mask.

Two file formats, chosen by the file's suffix; ``file`` is the image path relative to the dataset root,
with ``/`` separators (``cat/001.png``; a flat folder: ``001.png``):

* JSON Lines (``.jsonl``): one object per line, ``{"file": "cat/001.png", "caption": "a cat on a mat"}``
  (other keys are ignored, blank lines skipped);
* CSV (``.csv``): a header row naming the columns ``file`` and ``caption`` (other columns ignored), then
  one row per image; quote captions that hold commas, as the ``csv`` module writes them.

A ``dict`` ``{file: caption}`` may be given instead of a file.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor

from .._utils import as_int, check, check_positive_int, describe, is_index_tensor

CaptionsSource = Union[str, os.PathLike, Mapping[str, str]]
CAPTION_FILE_FORMATS = (".jsonl", ".csv")


def _entry_key(entry: Any, where: str) -> str:
    """An image path from a captions entry as the relative POSIX path the datasets index images by."""
    check(isinstance(entry, str) and entry.strip() != "",
          f"{where}: `file` must be a non-empty image path relative to the dataset root, got {entry!r}")
    path = PurePosixPath(entry.strip().replace("\\", "/"))
    check(not path.is_absolute() and ".." not in path.parts,
          f"{where}: `file` must be a path relative to the dataset root (no leading '/' or '..'), got {entry!r}")
    return path.as_posix()


def _add_caption(captions: Dict[str, Tuple[str, str]], entry: Any, caption: Any, where: str) -> None:
    key = _entry_key(entry, where)
    check(isinstance(caption, str), f"{where}: `caption` must be a string, got {describe(caption)}")
    first = captions.get(key, ("", ""))[1]
    check(key not in captions, f"{where}: a second caption for {key!r} (the first is at {first})")
    captions[key] = (caption, where)


def _read_jsonl(path: Path) -> Dict[str, Tuple[str, str]]:
    captions: Dict[str, Tuple[str, str]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg})") from None
            check(isinstance(row, dict) and "file" in row and "caption" in row,
                  f"{where}: expected an object with keys 'file' and 'caption', got {line.strip()[:80]!r}")
            _add_caption(captions, row["file"], row["caption"], where)
    return captions


def _read_csv(path: Path) -> Dict[str, Tuple[str, str]]:
    captions: Dict[str, Tuple[str, str]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        check("file" in columns and "caption" in columns,
              f"{path}: the CSV header must name the columns 'file' and 'caption', got {columns}")
        for row in reader:
            _add_caption(captions, row["file"], row["caption"], f"{path}, line {reader.line_num}")
    return captions


def read_captions(captions: CaptionsSource, *, name: str = "captions") -> Dict[str, Tuple[str, str]]:
    """``{relative image path: (caption, where it was given)}`` from a ``.jsonl`` / ``.csv`` file or a dict
    (formats in this module's docstring); ``where`` (``"file, line n"``) lets callers name the line of an
    entry that matches no image."""
    if isinstance(captions, Mapping):
        table: Dict[str, Tuple[str, str]] = {}
        for entry, caption in captions.items():
            _add_caption(table, entry, caption, f"`{name}` entry {entry!r}")
        check(len(table) > 0, f"`{name}` is an empty mapping")
        return table
    check(isinstance(captions, (str, os.PathLike)),
          f"`{name}` must be a path to a captions file ({' or '.join(CAPTION_FILE_FORMATS)}) or a dict "
          f"{{file: caption}}, got {describe(captions)}", error=TypeError)
    path = Path(captions)
    check(path.is_file(), f"`{name}` file {str(path)!r} does not exist", error=FileNotFoundError)
    suffix = path.suffix.lower()
    check(suffix in CAPTION_FILE_FORMATS,
          f"`{name}` file {str(path)!r} must end in {' or '.join(CAPTION_FILE_FORMATS)} (JSON Lines or CSV with "
          f"columns file,caption), got the suffix {suffix!r}")
    table = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    check(len(table) > 0, f"`{name}` file {str(path)!r} holds no captions")
    return table


def _as_id_list(output: Any, text: str) -> List[int]:
    """A tokenizer's output as a list of non-negative ints: a list / tuple / NumPy array of ints or a
    1-D integer tensor."""
    problem = f"`tokenizer` must return a list of non-negative int token ids for a caption, got {describe(output)} " \
              f"for {text[:60]!r}"
    if isinstance(output, Tensor):
        check(output.ndim == 1 and is_index_tensor(output), problem, error=TypeError)
        output = output.tolist()
    check(hasattr(output, "__len__") and not isinstance(output, (str, bytes, Mapping)), problem, error=TypeError)
    ids = [as_int(value) for value in output]
    check(all(value is not None for value in ids), problem, error=TypeError)
    check(all(value >= 0 for value in ids), problem)
    return ids


class CaptionTokenizer:
    """Caption text -> ``(ids [max_length] long, mask [max_length] bool)``: the user's tokenizer's ids,
    truncated to ``max_length`` or padded with ``pad_id``; ``mask`` is True on real tokens.

    ``tokenizer`` is an object with ``encode(text) -> list[int]`` (a Hugging Face tokenizer, tiktoken,
    sentencepiece) or any callable ``text -> list[int]``; ``encode`` is used when both exist (a Hugging
    Face tokenizer's ``__call__`` returns a dict). Truncation keeps the first ``max_length`` ids (an end
    token the tokenizer appends is cut with the rest)."""

    def __init__(self, tokenizer: Any, *, max_length: int, pad_id: int = 0):
        check(not isinstance(tokenizer, (str, bytes, os.PathLike)),
              f"`tokenizer` must be a tokenizer object or callable, got the name {tokenizer!r}: load it first, e.g. "
              f"transformers.AutoTokenizer.from_pretrained({str(tokenizer)!r})", error=TypeError)
        encode = getattr(tokenizer, "encode", None)
        encode = encode if callable(encode) else tokenizer
        check(callable(encode), f"`tokenizer` must be an object with an `encode(text)` method or a callable "
                                f"text -> list[int], got {describe(tokenizer)}", error=TypeError)
        self.encode: Callable[[str], Any] = encode
        self.max_length = check_positive_int("max_caption_length", max_length)
        pad = as_int(pad_id)
        check(pad is not None and pad >= 0, f"`pad_id` must be a non-negative int, got {describe(pad_id)}",
              error=TypeError if pad is None else ValueError)
        self.pad_id = pad

    def __call__(self, text: str) -> Tuple[Tensor, Tensor]:
        ids = _as_id_list(self.encode(text), text)[: self.max_length]
        padded = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        padded[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask = torch.arange(self.max_length) < len(ids)
        return padded, mask


def caption_tokenizer(captions_given: bool, tokenizer: Any, max_length: Any, pad_id: Any, *,
                      captions_name: str) -> "CaptionTokenizer | None":
    """The datasets' caption options checked together: a tokenizer and a length exactly when captions are
    given (``captions_name`` names the option that gives them)."""
    if not captions_given:
        check(tokenizer is None and max_length is None,
              f"`tokenizer` and `max_caption_length` are only used with `{captions_name}`; give `{captions_name}` "
              f"or leave them None")
        return None
    check(tokenizer is not None, f"`{captions_name}` needs a `tokenizer` (an object with `encode(text)` or a "
                                 f"callable text -> list[int])")
    check(max_length is not None, f"`{captions_name}` needs `max_caption_length` (captions are padded or "
                                  f"truncated to it so that a batch stacks)")
    return CaptionTokenizer(tokenizer, max_length=max_length, pad_id=pad_id)
