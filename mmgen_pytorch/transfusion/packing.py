"""Ragged multimodal samples -> one packed token grid.

A sample is a list of text tensors (long, 1-D) and modalities (float tensors, or ``(type, tensor)``).
Each modality becomes ``[meta] <shape as ASCII> [som_m] <latent tokens> [eom_m]`` and a sample is
wrapped in ``[sos] ... [eos]`` during training.

Positions (:class:`Placement`): text advances one position per token (the same value on every rotary
axis). On the grid (Transfusion), a modality of rank r that starts at position p gives token
``(i_1..i_r)`` the position ``p + (0, .., 0, i_1, .., i_r)`` (left-padded with zeros up to the number of
rotary axes; rank 0 = one token at p), and text resumes at ``p + max(shape)`` — the M-RoPE scheme: real
1-D / 2-D / 3-D positions inside every modality. A grid with more dimensions than the rotary axes
(a modality whose rank is free) is placed with its leading dimensions merged row-major into the first
axis (:func:`placed_shape`); the modality keeps its true shape. Flat (MonoFormer, LLaMA's 1-D RoPE):
every token of the modality takes the next position, row-major. A placement may also put time tokens (MonoFormer's
timestep token) right before the latents, inside the modality's block.

Dropping text for CFG: ``"null"`` replaces each text token by ``null_text`` (Transfusion), ``"empty"``
removes the text (MonoFormer's empty prompt); structure tokens and modalities stay.

Conditioning of earlier modalities (training == sampling): a modality that is followed by more
content is placed CLEAN in the sequence (the objective's clean time, no loss), exactly as the sampler
writes a finished modality into its cache; its NOISED copy (which carries the loss) is appended after the sample,
with the same positions, in its own bidirectional block, seeing only the prefix up to its ``[som]``
(``TokenLayout.causal_limits``). A modality at the end of a sample is noised in place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._utils import as_enum, check
from ..backbone import NO_BLOCK, PADDING, TokenLayout, grid_positions

Shape = Tuple[int, ...]
SHAPE_PATTERN = re.compile(r"^(\d+(,\d+)*)?$")


class UncondText(str, Enum):
    """What the unconditional stream of classifier-free guidance keeps of a sample's text."""

    NULL = "null"    # every text id becomes ``null_text``, unlabelled (transfusion-pytorch)
    EMPTY = "empty"  # the text is left out (MonoFormer's empty prompt)


class Positions(str, Enum):
    """Where modality tokens sit in the rotary positions."""

    GRID = "grid"  # M-RoPE: one rotary axis per grid dimension, the modality at its grid coordinates
    FLAT = "flat"  # consecutive 1-D positions over the whole sequence (LLaMA's RoPE)


@dataclass(frozen=True)
class Vocabulary:
    """Token ids: text ``[0, N)``, sos, eos, null_text, M ``[som]``, M ``[eom]``, ``[meta]``, 128 ASCII."""

    num_text_tokens: int
    num_modalities: int

    @property
    def sos(self) -> int:
        return self.num_text_tokens

    @property
    def eos(self) -> int:
        return self.num_text_tokens + 1

    @property
    def null_text(self) -> int:
        return self.num_text_tokens + 2

    def som(self, modality: int) -> int:
        return self.num_text_tokens + 3 + modality

    def eom(self, modality: int) -> int:
        return self.num_text_tokens + 3 + self.num_modalities + modality

    @property
    def meta(self) -> int:
        return self.num_text_tokens + 3 + 2 * self.num_modalities

    @property
    def first_char(self) -> int:
        return self.meta + 1

    @property
    def size(self) -> int:
        return self.first_char + 128

    def som_modality(self, token: int) -> Optional[int]:
        offset = token - self.som(0)
        return offset if 0 <= offset < self.num_modalities else None

    def is_text(self, ids: Tensor) -> Tensor:
        return ids < self.num_text_tokens

    def char_ids(self, text: str) -> List[int]:
        """The ids of ASCII characters (a shape header's ``"3,3"``)."""
        return [self.first_char + ord(c) for c in text]

    def shape_ids(self, shape: Shape) -> List[int]:
        return self.char_ids(",".join(str(s) for s in shape))

    def parse_shape(self, ids: Sequence[int], rank: Optional[int] = None) -> Optional[Shape]:
        """The shape spelled by ``ids`` (e.g. ``"3,3"``), or None when it is not a valid shape."""
        if any(not self.first_char <= i < self.size for i in ids):
            return None
        shape = shape_from_text("".join(chr(i - self.first_char) for i in ids))
        return None if shape is None or (rank is not None and len(shape) != rank) else shape


def placed_shape(shape: Shape, axes: int) -> Shape:
    """The grid as it lies on ``axes`` rotary axes: a grid with more dimensions has its leading ones
    merged row-major into the first axis (``(4, 4)`` on one axis is a run of 16), so its tokens keep
    their order and get distinct positions."""
    if len(shape) <= axes:
        return tuple(shape)
    merged = len(shape) - axes + 1
    return (math.prod(shape[:merged]), *shape[merged:])


def shape_from_text(text: str) -> Optional[Shape]:
    """A shape as a ``[meta]`` header spells it (``"3,3"`` -> ``(3, 3)``, ``""`` -> ``()``), or None when
    ``text`` spells no shape of positive sizes."""
    if not SHAPE_PATTERN.match(text):
        return None
    shape = tuple(int(s) for s in text.split(",")) if text else ()
    return None if any(s <= 0 for s in shape) else shape


def modality_positions(start: int, shape: Shape, axes: int) -> Tensor:
    """``[prod(shape), axes]`` positions of a modality's tokens starting at position ``start``."""
    shape = placed_shape(shape, axes)
    coords = grid_positions(*shape) if shape else torch.zeros(1, 0, dtype=torch.long)
    pad = torch.zeros(coords.shape[0], axes - coords.shape[1], dtype=torch.long)
    return start + torch.cat((pad, coords), dim=1)


def modality_extent(shape: Shape, axes: int) -> int:
    """How far text positions advance past a modality."""
    shape = placed_shape(shape, axes)
    return max(shape) if shape else 1


def token_count(shape: Shape) -> int:
    return int(torch.tensor(shape).prod()) if shape else 1


@dataclass(frozen=True)
class Placement:
    """Where a modality's tokens sit: ``time_tokens`` time tokens, then its latents.

    ``flat=False``: grid (M-RoPE) positions over ``axes`` rotary axes; ``flat=True``: consecutive 1-D
    positions (every axis equal), the time tokens included.
    """

    axes: int = 1
    flat: bool = False
    time_tokens: int = 0

    def __post_init__(self):
        check(self.flat or self.time_tokens == 0, "time tokens need flat positions")

    def length(self, shape: Shape) -> int:
        """Tokens the modality occupies."""
        return self.time_tokens + token_count(shape)

    def positions(self, start: int, shape: Shape) -> Tensor:
        """``[length, axes]`` positions of the modality's tokens starting at ``start``."""
        if not self.flat:
            return modality_positions(start, shape, self.axes)
        return (start + torch.arange(self.length(shape)))[:, None].expand(-1, self.axes).clone()

    def coords(self, shape: Shape) -> Tensor:
        """``[count, axes]`` position of each latent relative to the first latent."""
        return self.positions(0, shape)[self.time_tokens:] - self.time_tokens

    def extent(self, shape: Shape) -> int:
        """How far text positions advance past the modality."""
        return self.length(shape) if self.flat else modality_extent(shape, self.axes)


@dataclass
class Modality:
    """A modality instance in channel-last token form."""

    modality: int
    tokens: Tensor          # [n, dim_latent], clean latents
    shape: Shape


@dataclass
class Segment:
    """A contiguous run of tokens of one sample."""

    token_ids: Tensor                        # [n] long (0 under latents)
    positions: Tensor                        # [n, axes]
    modality: Optional[Modality] = None      # latent run
    noised: bool = False                     # carries a flow loss (time < 1)
    causal_limit: Optional[int] = None       # for appended noised copies: sample-relative index
    labelled: bool = True                    # text tokens in it are prediction targets
    ordinal: int = -1                        # which modality of the sample (0, 1, ...) it holds
    lead: int = 0                            # time tokens before the latents


@dataclass
class SampleSequence:
    placement: Placement = Placement()
    segments: List[Segment] = field(default_factory=list)
    next_position: int = 0

    @property
    def axes(self) -> int:
        return self.placement.axes

    @property
    def length(self) -> int:
        return sum(s.token_ids.shape[0] for s in self.segments)

    def add_text(self, ids: Sequence[int] | Tensor, labelled: bool = True) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            return
        positions = torch.arange(self.next_position, self.next_position + ids.numel())
        self.segments.append(Segment(ids, positions[:, None].expand(-1, self.axes).clone(), labelled=labelled))
        self.next_position += ids.numel()

    def add_modality(self, modality: Modality, *, noised: bool, ordinal: int = -1) -> Segment:
        positions = self.placement.positions(self.next_position, modality.shape)
        segment = Segment(torch.zeros(positions.shape[0], dtype=torch.long), positions, modality, noised,
                          ordinal=ordinal, lead=self.placement.time_tokens)
        self.segments.append(segment)
        self.next_position += self.placement.extent(modality.shape)
        return segment


def build_training_sequence(items: Sequence, vocab: Vocabulary, placement: Placement, *, drop_text: bool = False,
                            uncond_text: UncondText = UncondText.NULL, sos: bool = True, eos: bool = True,
                            noise_last: bool = True) -> SampleSequence:
    """``items``: text id tensors and :class:`Modality` instances, in order.

    ``drop_text`` builds CFG's unconditional stream: ``uncond_text="null"`` replaces every text id by
    ``null_text`` (unlabelled), ``"empty"`` leaves the text out. Modalities followed by more content
    stay clean and get an appended noised copy.
    """
    uncond_text = as_enum(UncondText, uncond_text, "uncond_text")
    sequence = SampleSequence(placement)
    if sos:
        sequence.add_text([vocab.sos])
    copies: List[Tuple[Modality, int, Segment]] = []
    ordinal = 0
    for index, item in enumerate(items):
        if isinstance(item, Modality):
            sequence.add_text([vocab.meta, *vocab.shape_ids(item.shape), vocab.som(item.modality)])
            followed = any(True for _ in items[index + 1:])
            som_index = sequence.length - 1
            segment = sequence.add_modality(item, noised=noise_last and not followed, ordinal=ordinal)
            if followed and noise_last:
                copies.append((item, som_index, segment))
            sequence.add_text([vocab.eom(item.modality)])
            ordinal += 1
        elif not drop_text:
            sequence.add_text(item)
        elif uncond_text is UncondText.NULL:
            sequence.add_text(torch.full_like(item, vocab.null_text), labelled=False)
    if eos:
        sequence.add_text([vocab.eos])
    for modality, som_index, clean in copies:
        sequence.segments.append(Segment(torch.zeros_like(clean.token_ids), clean.positions, modality, noised=True,
                                         causal_limit=som_index, labelled=False, ordinal=clean.ordinal,
                                         lead=clean.lead))
    return sequence


class LatentRun(NamedTuple):
    """Latent tokens as the backbone takes them: ``values [k, dim_latent]`` of ``modality`` at
    ``flat_index [k]`` of the flattened ``[b * n]`` grid, with their ``coords [k, axes]`` inside the modality
    (``values`` may be None in a template that a denoising step fills)."""

    modality: int
    flat_index: Tensor
    values: Optional[Tensor]
    coords: Tensor


@dataclass
class LatentGroup:
    """All latent tokens of one modality type in a packed batch."""

    modality: int
    flat_index: Tensor      # [k] index into the flattened [b * n] grid
    tokens: Tensor          # [k, dim_latent] clean latents
    instance: Tensor        # [k] instance id (into PackedBatch.instances)
    coords: Tensor          # [k, axes] position of each token inside its modality


@dataclass
class Instance:
    row: int
    modality: int
    shape: Shape
    noised: bool
    index: Tensor           # [n] flat indices of its tokens
    ordinal: int            # which modality of its sample


@dataclass
class PackedBatch:
    token_ids: Tensor       # [b, n]
    labels: Tensor          # [b, n] next-token targets, ignore_index elsewhere
    positions: Tensor       # [b, n, axes]
    layout: TokenLayout
    latent_mask: Tensor     # [b, n] bool
    instances: List[Instance]
    groups: List[LatentGroup]
    lengths: List[int]

    @property
    def shape(self) -> torch.Size:
        return self.token_ids.shape


def pack(sequences: Sequence[SampleSequence], *, num_modalities: int, ignore_index: int,
         pad_left: bool = False, device=None) -> PackedBatch:
    """Pad the sample sequences into one ``[b, n]`` grid (right padding, or left for prompts)."""
    lengths = [s.length for s in sequences]
    batch, total = len(sequences), max(lengths)
    axes = sequences[0].axes
    token_ids = torch.zeros(batch, total, dtype=torch.long)
    labels = torch.full((batch, total), ignore_index, dtype=torch.long)
    positions = torch.zeros(batch, total, axes, dtype=torch.long)
    segment_ids = torch.full((batch, total), PADDING, dtype=torch.long)
    block_ids = torch.full((batch, total), NO_BLOCK, dtype=torch.long)
    causal_limits = torch.arange(total).repeat(batch, 1)
    latent_mask = torch.zeros(batch, total, dtype=torch.bool)
    text_target = torch.zeros(batch, total, dtype=torch.bool)
    instances: List[Instance] = []
    per_type: List[List[Tuple[Tensor, Tensor, int, Tensor]]] = [[] for _ in range(num_modalities)]

    for row, sequence in enumerate(sequences):
        cursor = total - lengths[row] if pad_left else 0
        segment_ids[row, cursor:cursor + lengths[row]] = 0
        sample_start = cursor
        for segment in sequence.segments:
            n = segment.token_ids.shape[0]
            span = slice(cursor, cursor + n)
            token_ids[row, span] = segment.token_ids
            positions[row, span] = segment.positions
            if segment.modality is None:
                text_target[row, span] = segment.labelled
            else:
                latents = slice(cursor + segment.lead, cursor + n)  # the time tokens before them are neither
                latent_mask[row, latents] = True                    # latents nor text targets
                block_ids[row, span] = len(instances)
                if segment.causal_limit is not None:
                    causal_limits[row, span] = sample_start + segment.causal_limit
                flat = torch.arange(latents.start, latents.stop) + row * total
                instance_id = len(instances)
                instances.append(Instance(row, segment.modality.modality, segment.modality.shape, segment.noised, flat,
                                          segment.ordinal))
                coords = segment.positions[segment.lead:] - segment.positions[segment.lead]
                per_type[segment.modality.modality].append((flat, segment.modality.tokens, instance_id, coords))
            cursor += n

    # position i predicts token i + 1 when both are text-like tokens of the same sample
    labels[:, :-1] = torch.where(text_target[:, 1:] & ~latent_mask[:, :-1] & (segment_ids[:, :-1] != PADDING),
                                 token_ids[:, 1:], labels[:, :-1])
    groups = [LatentGroup(m, torch.cat([e[0] for e in entries]).to(device), torch.cat([e[1] for e in entries]).to(device),
                          torch.cat([torch.full((e[0].numel(),), e[2], dtype=torch.long) for e in entries]).to(device),
                          torch.cat([e[3] for e in entries]).to(device))
              for m, entries in enumerate(per_type) if entries]
    for instance in instances:
        instance.index = instance.index.to(device)
    layout = TokenLayout(segment_ids.to(device), block_ids.to(device), causal_limits.to(device))
    return PackedBatch(token_ids.to(device), labels.to(device), positions.to(device), layout,
                       latent_mask.to(device), instances, groups, lengths)
