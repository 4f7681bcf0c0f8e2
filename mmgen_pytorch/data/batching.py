"""Batches of dict items: stacked by a DataLoader's ``collate_fn``, or gathered at once by a dataset that holds
its items as tensors (``__getitems__``, which DataLoader calls with a batch's indices when a dataset has it)."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._utils import check


class StackedItems(dict):
    """A batch of items gathered by a dataset's ``__getitems__``: each field already stacked, exactly what
    :class:`StackFields` makes of the items one by one (a dict of ``[batch, ...]`` tensors)."""


class StackFields:
    """A DataLoader ``collate_fn`` for dict items: each field stacked into a batch (default: the fields of
    the first item; all items must have them), or a batch a dataset gathered itself (:class:`StackedItems`)
    passed on. Picklable, for loader workers."""

    def __init__(self, fields: Optional[Sequence[str]] = None):
        self.fields = None if fields is None else list(fields)

    def __call__(self, items: Union[Sequence[Mapping], StackedItems]) -> Dict[str, Tensor]:
        if isinstance(items, StackedItems):  # a dataset's __getitems__ gathered the batch itself
            fields = self.fields if self.fields is not None else list(items)
            missing = sorted(name for name in fields if name not in items)
            check(not missing, f"`dataset` items must all have the fields {fields}; they lack {missing}")
            return {name: items[name] for name in fields}
        fields = self.fields if self.fields is not None else list(items[0])
        missing = sorted({name for item in items for name in fields if name not in item})
        check(not missing, f"`dataset` items must all have the fields {fields}; some lack {missing}")
        return {name: torch.stack([torch.as_tensor(item[name]) for item in items]) for name in fields}
