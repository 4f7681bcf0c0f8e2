"""Batches of dict items: stacked by a DataLoader's ``collate_fn``, or gathered at once by a dataset that holds
its items as tensors (``__getitems__``, which DataLoader calls with a batch's indices when a dataset has it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from .._utils import check


class StackedItems(Sequence):
    """Items gathered as one batch by a dataset's ``__getitems__``: ``fields`` holds each field already stacked
    (``[batch, ...]``), which :class:`StackFields` passes on as it is; as a sequence of item dicts it is what
    any other ``collate_fn`` (DataLoader's default one included) takes."""

    def __init__(self, fields: Dict[str, Tensor]):
        self.fields = fields

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(len(self))[index]]
        return {name: field[index] for name, field in self.fields.items()}


class StackFields:
    """A DataLoader ``collate_fn`` for dict items: each field stacked into a batch (default: the fields of
    the first item; all items must have them), or a batch a dataset gathered itself (:class:`StackedItems`)
    passed on. Picklable, for loader workers."""

    def __init__(self, fields: Optional[Sequence[str]] = None):
        self.fields = None if fields is None else list(fields)

    def __call__(self, items: Union[Sequence[Mapping], StackedItems]) -> Dict[str, Tensor]:
        if isinstance(items, StackedItems):  # a dataset's __getitems__ gathered the batch itself
            fields = self.fields if self.fields is not None else list(items.fields)
            missing = sorted(name for name in fields if name not in items.fields)
            check(not missing, f"`dataset` items must all have the fields {fields}; they lack {missing}")
            return {name: items.fields[name] for name in fields}
        fields = self.fields if self.fields is not None else list(items[0])
        missing = sorted({name for item in items for name in fields if name not in item})
        check(not missing, f"`dataset` items must all have the fields {fields}; some lack {missing}")
        return {name: torch.stack([torch.as_tensor(item[name]) for item in items]) for name in fields}
