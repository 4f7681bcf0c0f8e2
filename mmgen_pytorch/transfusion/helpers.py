"""List helpers that transfusion-pytorch exports, with the same call forms: run a function once per
group of same-shaped tensors, and transform a filtered sub-list in place.

``apply_fn_modality_type(fn, samples, modality_type)`` applies ``fn`` to every modality of one type in a
sample, or in a (nested) list of samples, calling ``fn`` once per distinct shape on the stacked batch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .._utils import check

Shape = Tuple[int, ...]

try:  # torch's FlexAttention where this torch has it (transfusion-pytorch exports the name)
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - older torch
    flex_attention = None


def stack_same_shape_tensors_with_inverse(tensors: Sequence[Tensor]):
    """``{shape: [count, *shape]}`` stacks of the tensors of each shape, and ``inverse(stacks)``, which
    puts a dict of that form (same shapes, same counts) back into the original order as a list."""
    positions: List[Tuple[Shape, int]] = []
    groups: Dict[Shape, List[Tensor]] = {}
    for tensor in tensors:
        shape = tuple(tensor.shape)
        group = groups.setdefault(shape, [])
        positions.append((shape, len(group)))
        group.append(tensor)
    counts = {shape: len(group) for shape, group in groups.items()}

    def inverse(stacks: Dict[Shape, Tensor]) -> List[Tensor]:
        got = {shape: len(stack) for shape, stack in stacks.items()}
        check(got == counts, f"`inverse` needs one stack per shape with the counts it was made from ({counts}), "
                             f"got {got}")
        return [stacks[shape][index] for shape, index in positions]

    return {shape: torch.stack(group) for shape, group in groups.items()}, inverse


def filter_with_inverse(condition: Callable[[Any], bool], items: Sequence):
    """The items for which ``condition`` holds, and ``inverse(replacements)``, which returns ``items``
    with those items replaced, in order, by ``replacements`` (one per kept item)."""
    kept = [index for index, item in enumerate(items) if condition(item)]

    def inverse(replacements: Sequence) -> List:
        check(len(replacements) == len(kept),
              f"`inverse` needs {len(kept)} replacements (one per kept item), got {len(replacements)}")
        out = list(items)
        for index, replacement in zip(kept, replacements):
            out[index] = replacement
        return out

    return [items[index] for index in kept], inverse


def apply_fn_modality_type(fn: Callable[[Tensor], Tensor], modalities, modality_type: int = 0,
                           return_untransformed: bool = False):
    """``fn`` over every modality of ``modality_type`` in ``modalities`` (one sample, a list of samples,
    or deeper lists), batched by shape; an untagged float tensor is of type 0 and comes back as
    ``(0, tensor)``. With ``return_untransformed`` a transformed entry is ``(type, new, old)``."""
    leaves, rebuild = _flatten(modalities)
    leaves = [(0, leaf) if _is_float_tensor(leaf) else leaf for leaf in leaves]
    chosen, put_back = filter_with_inverse(lambda leaf: isinstance(leaf, tuple) and leaf[0] == modality_type,
                                           leaves)
    originals = [tensor for _, tensor in chosen]
    stacks, unstack = stack_same_shape_tensors_with_inverse(originals)
    transformed = unstack({shape: fn(stack) for shape, stack in stacks.items()})
    if return_untransformed:
        replacements = [(modality_type, new, old) for new, old in zip(transformed, originals)]
    else:
        replacements = [(modality_type, new) for new in transformed]
    return rebuild(put_back(replacements))


def _is_float_tensor(value) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _flatten(tree) -> Tuple[List, Callable[[List], Any]]:
    """The leaves of nested lists (a tuple is a leaf: a tagged modality), and a function that puts a
    list of new leaves back into the same nesting."""
    if not isinstance(tree, list):
        return [tree], lambda leaves: leaves[0]
    parts = [_flatten(child) for child in tree]
    sizes = [len(leaves) for leaves, _ in parts]

    def rebuild(leaves: List) -> List:
        out, start = [], 0
        for (_, rebuild_child), size in zip(parts, sizes):
            out.append(rebuild_child(leaves[start:start + size]))
            start += size
        return out

    return [leaf for leaves, _ in parts for leaf in leaves], rebuild
