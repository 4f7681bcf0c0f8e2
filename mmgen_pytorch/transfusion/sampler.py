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
cached sampler is tested against. With ``compile=True`` every text step and every denoising step
(and the write of the finished latent) after the prompt's prefill runs the backbone's blocks as a
compiled decode step on a fixed-shape cache: one graph for text steps and one per modality shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import GeneratorLike, as_enum, as_generator, check, check_finite, describe
from ..backbone import NO_BLOCK, PADDING, Decoder, KVCache, SequenceChunk, TokenLayout
from ..backbone.decoding import check_compile
from ..guidance import check_cfg_scale
from ..objectives.base import ContinuousObjective
from ..sampling import check_sampling_options, sample_from_logits
from .modalities import ModalityFormat
from .packing import LatentRun, PackedBatch, Placement, SampleSequence, Shape, Vocabulary, token_count

GENERATED_BLOCK_OFFSET = 1 << 20  # block ids of generated modalities: far from prompt instance ids


class LengthBudget(str, Enum):
    """What ``max_length`` counts when sampling."""

    TOTAL = "total"          # prompt + output, structure tokens included (like Hugging Face's `max_length`)
    GENERATED = "generated"  # tokens generated after the prompt (transfusion-pytorch; `max_new_tokens`)
    # under both, a modality the prompt starts (or `force_modality_at_start` asks for) is always generated,
    # and a modality the model starts is finished under GENERATED; so the output may pass it by one modality


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
    def new_cache(self, batch_size: int, max_length: int, **options) -> KVCache: ...  # options: static, compiled
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
    requested: bool = False                          # the pending modality was started by the prompt
    length: int = 0                                  # tokens in the sequence (prompt included)
    position: int = 0                                # next rotary position
    twin_shift: int = 0                              # the unconditional twin's position minus this row's
    modalities: int = 0
    generated: int = 0                               # text tokens chosen and modality tokens generated
    done: bool = False

    def flush_text(self, num_text_tokens: Optional[int], *, last: bool = False) -> None:
        """Move the chosen ids into ``items``: the text ids only, or every id when ``num_text_tokens`` is None.
        The ``last`` segment is kept even when it held structure ids only (an empty text): the model did write
        after its last item, and the items line up with transfusion-pytorch's."""
        text = [t for t in self.text if num_text_tokens is None or t < num_text_tokens]
        if text or (last and self.text):
            self.items.append(torch.tensor(text, dtype=torch.long))
        self.text = []


class Sampler:
    def __init__(self, model: SamplingModel, *, max_length: int, text_temperature: float = 1.0, text_min_p: float = 0.1,
                 text_top_k: int = 0, text_top_p: float = 1.0, cfg_scale: float = 3.0, modality_steps: int = 16,
                 fixed_modality_shape: Optional[Shape] = None, max_modalities: Optional[int] = None,
                 return_unprocessed_modalities: bool = False, use_cache: bool = True, progress: bool = True,
                 generator: GeneratorLike = None, text_only: bool = False, objective_kwargs: Optional[dict] = None,
                 max_length_counts: LengthBudget = LengthBudget.TOTAL, keep_structure_tokens: bool = False,
                 init_modality_noise: Optional[Tensor] = None, compile: bool = False):
        """Every option is checked here, before any prompt is encoded or run."""
        check(max_length > 0, f"`max_length` must be positive, got {max_length}")
        check_compile(compile, use_cache)
        self.budget = as_enum(LengthBudget, max_length_counts, "max_length_counts")
        check(isinstance(keep_structure_tokens, bool),
              f"`keep_structure_tokens` must be a bool, got {describe(keep_structure_tokens)}")
        check_init_noise(init_modality_noise)
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
        self.compile = compile
        self.objective_kwargs = dict(objective_kwargs or {})
        self.keep_structure, self.init_noise = keep_structure_tokens, init_modality_noise
        self.names: Optional[Sequence[str]] = None  # how the caller calls each prompt in errors
        self.guided = cfg_scale != 1.0 and not text_only
        self.copies = 2 if self.guided else 1

    @torch.no_grad()
    def __call__(self, prompts: Sequence[List], forced: Sequence[List[int]],
                 names: Optional[Sequence[str]] = None) -> List[List]:
        """``names``: how the caller calls each prompt in errors (default ``prompt[i]``)."""
        self.names = names
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
            row.flush_text(self.kept_text_below, last=True)
        return [r.items for r in rows]

    @property
    def kept_text_below(self) -> Optional[int]:
        """Returned text keeps ids below this (None: every id, structure tokens included)."""
        return None if self.keep_structure else self.vocab.num_text_tokens

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
            self.mark_fed(row, row.fed[-1])
            row.requested = row.pending is not None
            self.warn_if_no_room(row, index)
            self.check_requested_modality(row, index)
        packed = model.pack_prompts(sequences)
        chunk = Chunk(packed.token_ids, packed.positions, TokenLayout(packed.layout.segment_ids, packed.layout.block_ids),
                      [LatentRun(g.modality, g.flat_index, g.tokens, g.coords) for g in packed.groups],
                      torch.full(packed.shape, model.objective.clean_time, device=model.device))
        self.decoder = Decoder(self.run, new_cache=model.new_cache, rows=len(sequences),
                               max_length=packed.shape[1] + self.max_length + 8, use_cache=self.use_cache,
                               compile=self.compile)
        return self.decoder.write(chunk)[:, -1]

    def name_of(self, index: int) -> str:
        return self.names[index] if self.names is not None else f"prompt[{index}]"

    def warn_if_no_room(self, row: Row, index: int) -> None:
        """Under ``max_length_counts='total'``, a prompt that fills ``max_length`` leaves nothing to generate
        (but the modality it starts): say so rather than return it silently."""
        if self.budget is LengthBudget.GENERATED:
            return
        if row.pending is None:
            if row.length < self.max_length:
                return
            what = f"has {row.length} tokens with its structure tokens: nothing is generated after it"
        else:
            needed = row.length + self.model.placement.length(row.pending[1]) + 1  # with its [eom]
            if needed <= self.max_length:
                return
            what = (f"and the modality it starts need {needed} tokens: that modality is generated, passing "
                    f"`max_length`, and nothing after it")
        warnings.warn(f"`{self.name_of(index)}` {what}, since `max_length` ({self.max_length}) counts prompt + "
                      f"output. Raise `max_length`, or pass `max_length_counts='generated'` to make it a budget after "
                      f"the prompt (transfusion-pytorch's meaning)", stacklevel=2)

    def check_requested_modality(self, row: Row, index: int) -> None:
        """A modality that the prompt (or ``force_modality_at_start``) starts is generated, never dropped:
        refuse, before any compute, one that cannot be."""
        if row.pending is None:
            return
        modality, shape = row.pending
        check(self.max_modalities is None or self.max_modalities > 0,
              f"`{self.name_of(index)}` starts a modality but `max_modalities` is {self.max_modalities}")
        self.check_init_noise_covers(modality, shape)

    def check_init_noise_covers(self, modality: int, shape: Shape) -> None:
        if self.init_noise is None:
            return
        count, dim_latent = token_count(shape), self.model.modalities[modality].dim_latent
        have = tuple(self.init_noise.shape)
        check(have[0] >= count and have[1] >= dim_latent,
              f"`init_modality_noise` of shape {have} is too small for a modality of type {modality} and shape "
              f"{shape}: it needs at least ({count}, {dim_latent}) (tokens, latent channels)")

    def initial_noise(self, modality: int, shape: Shape, rows: int) -> Tensor:
        """``[rows, count, dim_latent]`` starting noise: ``init_modality_noise``'s top-left corner, else drawn."""
        count, dim_latent = token_count(shape), self.model.modalities[modality].dim_latent
        device = self.model.device
        if self.init_noise is None:
            return torch.randn(rows, count, dim_latent, device=device, generator=self.generator)
        self.check_init_noise_covers(modality, shape)
        return self.init_noise[:count, :dim_latent].to(device, torch.float32).expand(rows, -1, -1).clone()

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
            if self.out_of_budget(row):
                row.done = True
                continue
            if token == self.vocab.eos and not self.text_only:
                row.text += [token] if self.keep_structure else []
                row.done = True
                continue
            if token == self.vocab.meta and self.fixed_shape is not None:
                row.forced = self.vocab.shape_ids(self.fixed_shape)
            row.text.append(token)
            row.next_token = token
            row.generated += 1
            starts_modality = self.vocab.som_modality(token) is not None and not self.text_only
            if self.out_of_budget(row, feeding=True) and not (starts_modality and self.budget is LengthBudget.GENERATED):
                row.done = True  # the budget ends with this token: no need to feed it

    def out_of_budget(self, row: Row, feeding: bool = False) -> bool:
        """Whether the row has used ``max_length`` (counting the chosen token about to be fed)."""
        if self.budget is LengthBudget.GENERATED:
            return row.generated >= self.max_length
        return row.length + feeding >= self.max_length

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
            out_of_room = (self.budget is LengthBudget.TOTAL and not rows[i].requested
                           and rows[i].length + length + 1 > self.max_length)  # the modality and its [eom]
            if out_of_room or (self.max_modalities is not None and rows[i].modalities >= self.max_modalities):
                rows[i].done = True
            else:
                group.append(i)
        if not group:
            return
        batch = len(rows)
        all_rows = [i + copy * batch for copy in range(self.copies) for i in group]
        noise = self.initial_noise(modality, shape, rows=len(group))
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
            row.flush_text(self.kept_text_below)
            row.items.append((modality, self.output_modality(modality, latent[k], shape)))
            row.position += model.placement.extent(shape)
            row.length += length
            row.generated += count
            row.modalities += 1
            row.pending, row.requested = None, False
            row.next_token = self.vocab.eom(modality)
            row.text += [row.next_token] if self.keep_structure else []
            limited = self.max_modalities is not None and row.modalities >= self.max_modalities
            if limited or (self.budget is LengthBudget.GENERATED and self.out_of_budget(row)):
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




def check_init_noise(noise) -> None:
    """``init_modality_noise``: None, or a finite float ``[tokens, channels]`` tensor whose top-left corner
    starts every generated modality."""
    if noise is None:
        return
    check(isinstance(noise, Tensor) and noise.is_floating_point() and noise.ndim == 2,
          f"`init_modality_noise` must be a float tensor [tokens, latent channels], got {describe(noise)}")
    check_finite("init_modality_noise", noise)


@dataclass
class ParsedPrompt:
    """A prompt in the form the model packs: text id tensors and modalities, with the structure tokens
    it spelled taken out (the packing writes them), and the ids that start a modality at its end."""

    parts: List = field(default_factory=list)               # 1-D text ids, float tensors, (type, tensor)
    wheres: List[str] = field(default_factory=list)         # where each part came from (for errors)
    start: List[int] = field(default_factory=list)          # [meta] shape [som_m] ending the prompt, or []
    spelled: Dict[int, Shape] = field(default_factory=dict)  # part index -> the shape spelled before it


class PromptParser:
    """One prompt in any form transfusion-pytorch takes -> :class:`ParsedPrompt`.

    A prompt is None, a text tensor (0-dim, ``[n]`` or ``[1, n]``), a modality (a float tensor or
    ``(type, tensor)``), or a list of those (None parts are skipped). Text may hold structure ids: a
    leading ``[sos]``; ``[meta] <shape chars> [som_m]`` (or ``[som_m]`` alone) right before a modality of
    type m (an untagged float tensor there takes type m), or at the end (the sample then starts with
    that modality: the spelled shape, else ``fixed_modality_shape``, else the default); ``[eom_m]`` right
    after a modality of type m.
    """

    def __init__(self, model: SamplingModel, *, name: str, fixed_shape: Optional[Shape] = None):
        self.model, self.vocab, self.name, self.fixed_shape = model, model.vocab, name, fixed_shape

    def __call__(self, prompt) -> ParsedPrompt:
        parsed, text = ParsedPrompt(), []
        header: Optional[List[int]] = None      # shape chars after a [meta], until its [som]
        started: Optional[Tuple[int, Optional[List[int]], str]] = None  # (type, chars, where) after a [som]
        closable: Optional[int] = None          # the type of a modality just placed (its [eom] may follow)
        last_where = self.name
        for position, (where, element) in enumerate(self.elements(prompt)):
            if not isinstance(element, int):
                element = self.placed_modality(element, started, where)
                if started is not None and started[1]:
                    parsed.spelled[len(parsed.parts) + bool(text)] = self.spelled_shape(started, where)
                self.flush(parsed, text, last_where)
                parsed.parts.append(element)
                parsed.wheres.append(where)
                header, started, closable = None, None, self.model.check_modality_type(
                    element[0] if isinstance(element, tuple) else 0, name=where)
                continue
            check(started is None, f"`{where}`: the [som] of modality {started and started[0]} must be followed by "
                                   f"that modality or end the prompt, got token id {element}")
            som = self.vocab.som_modality(element)
            if header is not None:
                check(som is not None or self.vocab.first_char <= element < self.vocab.size,
                      f"`{where}`: [meta] must be followed by the shape's characters and a [som] token, "
                      f"got token id {element}")
                header, started = (None, (som, header, where)) if som is not None else (header + [element], None)
            elif element < self.vocab.num_text_tokens:
                text.append(element)
            elif element == self.vocab.meta:
                header = []
            elif som is not None:
                started = (som, None, where)
            elif closable is not None and element == self.vocab.eom(closable):
                pass  # the packing closes every modality with its [eom]
            else:
                check(element == self.vocab.sos and position == 0,
                      f"`{where}`: token id {element} is not text (ids below {self.vocab.num_text_tokens}) nor a "
                      f"structure token in its place ([sos] first, [meta] shape [som] before a modality, [eom] "
                      f"right after it)")
            closable, last_where = None, where
        check(header is None, f"`{self.name}` ends inside a [meta] shape header: close it with a [som] token")
        self.flush(parsed, text, last_where)
        if started is not None:
            modality, chars, where = started
            spelled = self.spelled_shape(started, where) if chars else None
            shape = self.model.shape_for(modality, spelled, self.fixed_shape)
            parsed.start = [self.vocab.meta, *self.vocab.shape_ids(shape), self.vocab.som(modality)]
        return parsed

    def elements(self, prompt) -> List[Tuple[str, object]]:
        """The prompt as (where, token id or modality) in order."""
        if prompt is None:
            return []
        if isinstance(prompt, (Tensor, tuple)):
            parts = [(self.name, prompt)]
        else:
            check(isinstance(prompt, list), f"`{self.name}` must be None, a tensor, a (modality_type, tensor) "
                                            f"tuple or a list of them, got {describe(prompt)}")
            parts = [(f"{self.name}[{i}]", part) for i, part in enumerate(prompt) if part is not None]
        elements = []
        for where, part in parts:
            if isinstance(part, Tensor) and not part.is_floating_point():
                elements += [(where, token) for token in self.text_ids(part, where)]
            else:
                check(isinstance(part, (Tensor, tuple)), f"`{where}` must be a text tensor, a modality tensor or "
                                                         f"a (modality_type, tensor) tuple, got {describe(part)}")
                elements.append((where, part))
        return elements

    def text_ids(self, ids: Tensor, where: str) -> List[int]:
        check(ids.dtype in (torch.long, torch.int, torch.int16, torch.uint8),
              f"`{where}` must be a long tensor of token ids, got {describe(ids)}")
        check(ids.ndim <= 1 or (ids.ndim == 2 and ids.shape[0] == 1),
              f"`{where}`: text must be a 0-dim, [n] or [1, n] tensor of token ids, got shape {tuple(ids.shape)} "
              f"(pass several prompts as a list)")
        flat = ids.reshape(-1).tolist()
        check(all(0 <= token < self.vocab.size for token in flat),
              f"`{where}`: token ids must be in [0, {self.vocab.size}), got {flat}")
        return flat

    def placed_modality(self, element, started, where: str):
        """A modality right after a [som] takes its type (an explicit different type is refused)."""
        if started is None:
            return element
        if not isinstance(element, tuple):
            return (started[0], element)
        check(len(element) == 2 and self.model.check_modality_type(element[0], name=where) == started[0],
              f"`{where}` follows the [som] of modality {started[0]}, got a modality tagged {element[0]!r}")
        return element

    def spelled_shape(self, started, where: str) -> Shape:
        modality, chars, _ = started
        shape = self.vocab.parse_shape(chars, rank=self.model.modalities[modality].rank)
        check(shape is not None, f"`{where}`: the [meta] header spells "
                                 f"{''.join(chr(c - self.vocab.first_char) for c in chars)!r}, not a shape of "
                                 f"modality {modality} (comma-separated positive ints, one per grid axis)")
        return shape

    @staticmethod
    def flush(parsed: ParsedPrompt, text: List[int], where: str) -> None:
        if text:
            parsed.parts.append(torch.tensor(text, dtype=torch.long))
            parsed.wheres.append(where)
            text.clear()


def merge_text(parts: Sequence) -> List:
    """Adjacent text tensors joined into one (transfusion-pytorch's returned form)."""
    merged: List = []
    for part in parts:
        if isinstance(part, Tensor) and merged and isinstance(merged[-1], Tensor):
            merged[-1] = torch.cat((merged[-1], part.to(merged[-1].device)))
        else:
            merged.append(part)
    return merged
