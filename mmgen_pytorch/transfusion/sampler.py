"""Batched, cached sampling of interleaved text and modalities.

All rows advance in lockstep over one static KV cache (rows with CFG: conditional rows first, then
their unconditional twins, whose text is dropped exactly as in training: ``null_text`` ids, or left
out — the twin then feeds padding and its positions lag behind by ``Row.twin_shift``). Each iteration
either feeds one text token per row, or generates one modality for the rows that just fed ``[som]``:
every denoiser evaluation of the objective's ``generate`` (ODE steps, or diffusion steps) runs only the
modality tokens against the cached prefix WITHOUT writing them, and the finished clean latent is
written once, at the objective's clean time, before ``[eom]``. Rows that sit out a step feed padding,
which no token ever attends to.

The rows decode through the shared :class:`~mmgen_pytorch.backbone.Decoder`; with ``use_cache=False``
it replays the whole history for every call through the same code path: the reference that the
cached sampler is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import GeneratorLike, as_generator, check, describe
from ..backbone import NO_BLOCK, PADDING, Decoder, KVCache, SequenceChunk, TokenLayout
from ..guidance import check_cfg_scale
from ..objectives.base import ContinuousObjective
from ..sampling import check_sampling_options, sample_from_logits
from .modalities import ModalityFormat
from .packing import LatentRun, PackedBatch, Placement, SampleSequence, Shape, Vocabulary, token_count

GENERATED_BLOCK_OFFSET = 1 << 20  # block ids of generated modalities: far from prompt instance ids


class SamplingModel(Protocol):
    """All the sampler uses of a model (:class:`~mmgen_pytorch.Transfusion` and its siblings)."""

    vocab: Vocabulary
    objective: ContinuousObjective
    placement: Placement
    modalities: Sequence[ModalityFormat]
    device: torch.device
    twin_skips_text: bool  # CFG twins leave text out (padding) instead of feeding null_text

    def prompt_sequence(self, items: Sequence, *, drop_text: bool, sos: bool) -> SampleSequence: ...
    def pack_prompts(self, sequences: Sequence[SampleSequence]) -> PackedBatch: ...
    def new_cache(self, batch_size: int, max_length: int) -> KVCache: ...
    def run_backbone(self, token_ids: Tensor, positions: Tensor, layout: TokenLayout, latents: List[LatentRun],
                     token_times: Tensor, **backbone_kwargs) -> Tensor: ...
    def to_text_logits(self, hidden: Tensor) -> Tensor: ...
    def modality_output(self, hidden: Tensor, modality: int, flat_index: Tensor, times: Tensor) -> Tensor: ...
    def decode_modality(self, modality: int, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor: ...
    def shape_for(self, modality: int, emitted: Optional[Shape], fixed: Optional[Shape]) -> Shape: ...
    def emitted_shape(self, modality: int, ids: Sequence[int]) -> Optional[Shape]: ...
    def check_shape(self, modality: int, shape, *, name: str) -> Shape: ...
    def check_modality_type(self, modality, *, name: str = "modality_type") -> int: ...


@dataclass
class Chunk(SequenceChunk):
    """Consecutive tokens of every row: text ids, rotary positions, layout and times per token, and
    the latent tokens among them as :class:`LatentRun` s (flat indices into ``[rows * c]``)."""

    token_ids: Tensor        # [b, c]
    positions: Tensor        # [b, c, axes]
    layout: TokenLayout
    latents: List[LatentRun]
    token_times: Tensor      # [b, c]

    @classmethod
    def concat(cls, chunks: Sequence["Chunk"]) -> "Chunk":
        """The per-token fields as any chunk's; the latents' flat indices moved to the longer rows."""
        total, latents, offset = sum(c.length for c in chunks), [], 0
        for c in chunks:
            for run in c.latents:
                row, column = run.flat_index // c.length, run.flat_index % c.length
                latents.append(run._replace(flat_index=row * total + offset + column))
            offset += c.length
        return replace(super().concat([replace(c, latents=None) for c in chunks]), latents=latents)

    def select_rows(self, rows: Tensor) -> "Chunk":
        """The per-token fields as any chunk's; the kept rows' latents renumbered."""
        new_row = torch.full((self.rows,), -1, dtype=torch.long, device=rows.device)
        new_row[rows] = torch.arange(len(rows), device=rows.device)
        latents = []
        for run in self.latents:
            row, column = run.flat_index // self.length, run.flat_index % self.length
            kept = new_row[row] >= 0
            latents.append(LatentRun(run.modality, new_row[row][kept] * self.length + column[kept],
                                     None if run.values is None else run.values[kept], run.coords[kept]))
        return replace(SequenceChunk.select_rows(replace(self, latents=None), rows), latents=latents)


@dataclass
class Row:
    """What one sample has produced and where it stands."""

    items: List = field(default_factory=list)        # output: the generated text tensors and modalities
    text: List[int] = field(default_factory=list)    # chosen ids not yet flushed into items
    fed: List[int] = field(default_factory=list)     # every text-like id in the sequence so far
    forced: List[int] = field(default_factory=list)  # ids to feed instead of sampling
    next_token: Optional[int] = None                 # chosen, not yet fed
    pending: Optional[Tuple[int, Shape]] = None      # (modality, shape) after a fed [som]
    length: int = 0                                  # tokens in the sequence (prompt included)
    position: int = 0                                # next rotary position
    twin_shift: int = 0                              # the unconditional twin's position minus this row's
    modalities: int = 0
    done: bool = False

    def flush_text(self, num_text_tokens: int) -> None:
        text = [t for t in self.text if t < num_text_tokens]
        if text:
            self.items.append(torch.tensor(text, dtype=torch.long))
        self.text = []


class Sampler:
    def __init__(self, model: SamplingModel, *, max_length: int, text_temperature: float = 1.0, text_min_p: float = 0.1,
                 text_top_k: int = 0, text_top_p: float = 1.0, cfg_scale: float = 3.0, modality_steps: int = 16,
                 fixed_modality_shape: Optional[Shape] = None, max_modalities: Optional[int] = None,
                 return_unprocessed_modalities: bool = False, use_cache: bool = True, progress: bool = True,
                 generator: GeneratorLike = None, text_only: bool = False, objective_kwargs: Optional[dict] = None):
        """Every option is checked here, before any prompt is encoded or run."""
        check(max_length > 0, f"`max_length` must be positive, got {max_length}")
        check_cfg_scale(cfg_scale)
        check_sampling_options(temperature=text_temperature, min_p=text_min_p, top_k=text_top_k, top_p=text_top_p,
                               prefix="" if text_only else "text_")
        model.objective.check_steps(modality_steps, name="modality_steps")
        check(objective_kwargs is None or isinstance(objective_kwargs, Mapping),
              f"`objective_kwargs` must be a dict of the objective's generate options, got {describe(objective_kwargs)}")
        model.objective.check_generate_options(dict(objective_kwargs or {}))
        generator = as_generator(generator, model.device)
        self.model, self.vocab = model, model.vocab
        self.max_length, self.cfg_scale, self.steps = max_length, cfg_scale, modality_steps
        self.text_kwargs = dict(temperature=text_temperature, min_p=text_min_p, top_k=text_top_k, top_p=text_top_p)
        self.fixed_shape = tuple(fixed_modality_shape) if fixed_modality_shape is not None else None
        self.max_modalities, self.unprocessed = max_modalities, return_unprocessed_modalities
        self.use_cache, self.progress, self.generator, self.text_only = use_cache, progress, generator, text_only
        self.objective_kwargs = dict(objective_kwargs or {})
        self.guided = cfg_scale != 1.0 and not text_only
        self.copies = 2 if self.guided else 1

    @torch.no_grad()
    def __call__(self, prompts: Sequence[List], forced: Sequence[List[int]]) -> List[List]:
        rows = [Row() for _ in prompts]
        hidden = self.prefill(prompts, forced, rows)
        bar = tqdm(total=self.max_length, disable=not self.progress, desc="sampling", leave=False)
        while True:
            if hidden is not None:
                self.choose_next(rows, hidden)
            bar.update(max(r.length for r in rows) - bar.n)
            pending = [i for i, r in enumerate(rows) if r.pending is not None and not r.done]
            if pending:
                self.generate_modality(rows, pending)
                hidden = None
            elif any(not r.done for r in rows):
                hidden = self.feed_text(rows)
            else:
                break
        bar.close()
        for row in rows:
            row.flush_text(self.vocab.num_text_tokens)
        return [r.items for r in rows]

    # prompt

    def prefill(self, prompts, forced, rows: List[Row]) -> Tensor:
        model = self.model
        sequences = []
        for drop in ([False, True] if self.guided else [False]):
            for items, extra in zip(prompts, forced):
                sequence = model.prompt_sequence(items, drop_text=drop, sos=not self.text_only)
                sequence.add_text(extra)
                sequences.append(sequence)
        check(all(s.length > 0 for s in sequences), "a prompt is empty and a text-only model has no [sos]: "
                                                    "give at least one token")
        for index, (row, sequence, twin) in enumerate(zip(rows, sequences,
                                                          sequences[len(rows):] if self.guided else sequences)):
            row.length, row.position = sequence.length, sequence.next_position
            row.twin_shift = twin.next_position - sequence.next_position
            row.fed = [int(t) for s in sequence.segments if s.modality is None for t in s.token_ids]
            check(row.length <= self.max_length,
                  f"`prompt[{index}]` ({row.length} tokens with its structure tokens) is longer than `max_length` "
                  f"({self.max_length})")
            self.mark_fed(row, row.fed[-1])
        packed = model.pack_prompts(sequences)
        chunk = Chunk(packed.token_ids, packed.positions, TokenLayout(packed.layout.segment_ids, packed.layout.block_ids),
                      [LatentRun(g.modality, g.flat_index, g.tokens, g.coords) for g in packed.groups],
                      torch.full(packed.shape, model.objective.clean_time, device=model.device))
        self.decoder = Decoder(self.run, new_cache=model.new_cache, rows=len(sequences),
                               max_length=packed.shape[1] + self.max_length + 8, use_cache=self.use_cache)
        return self.decoder.write(chunk)[:, -1]

    def run(self, chunk: Chunk, *, cache: Optional[KVCache], write: bool) -> Tensor:
        """The model over a chunk (the decoder's model function)."""
        return self.model.run_backbone(chunk.token_ids, chunk.positions, chunk.layout, chunk.latents,
                                       chunk.token_times, cache=cache, write_cache=write)

    def mark_fed(self, row: Row, token: int) -> None:
        """A [som] just fed makes the row generate that modality next."""
        modality = self.vocab.som_modality(token)
        if modality is not None and not self.text_only:
            row.pending = (modality, self.model.shape_for(modality, self.emitted_shape(row.fed, modality), self.fixed_shape))

    def emitted_shape(self, fed: List[int], modality: int) -> Optional[Shape]:
        """The shape spelled between the last [meta] and the [som] that ends ``fed``."""
        if self.vocab.meta not in fed:
            return None
        meta = len(fed) - 1 - fed[::-1].index(self.vocab.meta)
        return self.model.emitted_shape(modality, fed[meta + 1:-1])

    # text

    def choose_next(self, rows: List[Row], hidden: Tensor) -> None:
        """Pick each waiting row's next token from its last hidden state (or its forced queue)."""
        waiting = [i for i, r in enumerate(rows) if not r.done and r.pending is None and r.next_token is None]
        if not waiting:
            return
        logits = self.model.to_text_logits(hidden[waiting]).float()
        if self.text_only:
            logits = logits[:, :self.vocab.num_text_tokens]
        else:
            logits[:, [self.vocab.sos, self.vocab.null_text]] = float("-inf")
        sampled = sample_from_logits(logits, generator=self.generator, **self.text_kwargs).tolist()
        for i, token in zip(waiting, sampled):
            row = rows[i]
            token = row.forced.pop(0) if row.forced else token
            if (token == self.vocab.eos and not self.text_only) or row.length >= self.max_length:
                row.done = True
                continue
            if token == self.vocab.meta and self.fixed_shape is not None:
                row.forced = self.vocab.shape_ids(self.fixed_shape)
            row.text.append(token)
            row.next_token = token
            if row.length + 1 >= self.max_length:  # the sequence is full with this token: no need to feed it
                row.done = True

    def feed_text(self, rows: List[Row]) -> Tensor:
        """Feed every active row's chosen token: one forward of one token per row."""
        batch, copies = len(rows), self.copies
        token_ids = torch.zeros(batch * copies, 1, dtype=torch.long)
        positions = torch.zeros(batch * copies, 1, self.model.placement.axes, dtype=torch.long)
        segment = torch.full((batch * copies, 1), PADDING, dtype=torch.long)
        for i, row in enumerate(rows):
            if row.done or row.next_token is None:
                continue
            token, row.next_token = row.next_token, None
            for copy in range(copies):
                r = i + copy * batch
                dropped = copy == 1 and token < self.vocab.num_text_tokens
                if dropped and self.model.twin_skips_text:  # the twin feeds padding instead
                    row.twin_shift -= 1
                    continue
                token_ids[r, 0] = self.vocab.null_text if dropped else token
                positions[r] = self.position_of(rows, r)
                segment[r] = 0
            row.fed.append(token)
            row.position += 1
            row.length += 1
            self.mark_fed(row, token)
        device = self.model.device
        chunk = Chunk(token_ids.to(device), positions.to(device),
                      TokenLayout(segment.to(device), torch.full_like(segment, NO_BLOCK).to(device)), [],
                      torch.full((batch * copies, 1), self.model.objective.clean_time, device=device))
        return self.decoder.write(chunk)[:, -1]

    # modalities

    def generate_modality(self, rows: List[Row], pending: List[int]) -> None:
        """Generate one modality for every pending row that wants the same (type, shape)."""
        model = self.model
        modality, shape = rows[pending[0]].pending
        count, length = token_count(shape), model.placement.length(shape)
        group = []
        for i in pending:
            if rows[i].pending != (modality, shape):
                continue
            out_of_room = rows[i].length + length + 1 > self.max_length  # the modality and its [eom]
            if out_of_room or (self.max_modalities is not None and rows[i].modalities >= self.max_modalities):
                rows[i].done = True
            else:
                group.append(i)
        if not group:
            return
        batch = len(rows)
        all_rows = [i + copy * batch for copy in range(self.copies) for i in group]
        dim_latent = model.modalities[modality].dim_latent
        noise = torch.randn(len(group), count, dim_latent, device=model.device, generator=self.generator)
        chunk = self.modality_chunk(rows, all_rows, modality, shape, count, batch * self.copies)

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            output = self.modality_forward(chunk, x.repeat(self.copies, 1, 1), t, write=False)
            return model.objective.guide(output, self.cfg_scale) if self.guided else output

        latent = model.objective.generate(denoise, noise, self.steps, generator=self.generator,
                                          progress=self.progress, **self.objective_kwargs)
        self.modality_forward(chunk, latent.repeat(self.copies, 1, 1), torch.tensor(model.objective.clean_time),
                              write=True)
        for k, i in enumerate(group):
            row = rows[i]
            row.flush_text(self.vocab.num_text_tokens)
            row.items.append((modality, self.output_modality(modality, latent[k], shape)))
            row.position += model.placement.extent(shape)
            row.length += length
            row.modalities += 1
            row.pending = None
            row.next_token = self.vocab.eom(modality)
            if self.max_modalities is not None and row.modalities >= self.max_modalities:
                row.done = True

    def output_modality(self, modality: int, tokens: Tensor, shape: Shape) -> Tensor:
        if not self.unprocessed:
            return self.model.decode_modality(modality, tokens, shape)
        return self.model.decode_modality(modality, tokens, shape, decode=False)

    def position_of(self, rows: List[Row], r: int) -> int:
        """The next position of batch row ``r`` (a conditional row, or an unconditional twin)."""
        row = rows[r % len(rows)]
        return row.position + (row.twin_shift if r >= len(rows) else 0)

    def modality_chunk(self, rows, all_rows, modality, shape, count, total_rows) -> Chunk:
        """The ``count`` latents of ``shape`` (after the placement's time tokens) for rows ``all_rows``."""
        placement, device = self.model.placement, self.model.device
        lead = placement.time_tokens
        length = lead + count
        token_ids = torch.zeros(total_rows, length, dtype=torch.long)
        positions = torch.zeros(total_rows, length, placement.axes, dtype=torch.long)
        segment = torch.full((total_rows, length), PADDING, dtype=torch.long)
        block = torch.full((total_rows, length), NO_BLOCK, dtype=torch.long)
        block_id = GENERATED_BLOCK_OFFSET + self.decoder.length
        for r in all_rows:
            positions[r] = placement.positions(self.position_of(rows, r), shape)
            segment[r], block[r] = 0, block_id
        flat = torch.cat([torch.arange(lead, length) + r * length for r in all_rows]).to(device)
        coords = placement.coords(shape).repeat(len(all_rows), 1).to(device)
        return Chunk(token_ids.to(device), positions.to(device), TokenLayout(segment.to(device), block.to(device)),
                     [LatentRun(modality, flat, None, coords)],
                     torch.full((total_rows, length), self.model.objective.clean_time, device=device))

    def modality_forward(self, chunk: Chunk, x: Tensor, t: Tensor, write: bool) -> Tensor:
        """The objective's output for latents ``x [rows, count, d]`` at the shared time ``t``."""
        modality, flat, _, coords = chunk.latents[0]
        times = chunk.token_times.clone()
        times.view(-1)[flat] = t.to(times.dtype)
        step = Chunk(chunk.token_ids, chunk.positions, chunk.layout,
                     [LatentRun(modality, flat, x.reshape(-1, x.shape[-1]), coords)], times)
        hidden = self.decoder.write(step) if write else self.decoder.read(step)
        return self.model.modality_output(hidden, modality, flat, times.view(-1)[flat],
                                          coords=coords).view(*x.shape[:-1], -1)


def forced_tokens(model, force_modality_at_start) -> List[int]:
    """``m`` or ``(m, shape)`` -> the ``[meta] shape [som_m]`` ids appended to a prompt."""
    if force_modality_at_start is None:
        return []
    modality, shape = (force_modality_at_start if isinstance(force_modality_at_start, tuple)
                       else (force_modality_at_start, None))
    modality = model.check_modality_type(modality, name="force_modality_at_start")
    shape = (model.check_shape(modality, shape, name="force_modality_at_start") if shape is not None
             else model.shape_for(modality, None, None))
    return [model.vocab.meta, *model.vocab.shape_ids(shape), model.vocab.som(modality)]


def prompt_as_list(prompt) -> List:
    """None, one tensor / ``(type, tensor)``, or a list of them -> a list of prompt items."""
    if prompt is None:
        return []
    if isinstance(prompt, (Tensor, tuple)):
        return [prompt]
    return list(prompt)


