"""Transfusion: one transformer, next-token prediction on text and flow matching on modalities.

Reading order: time injection -> construction -> input normalisation -> forward (pack, noise,
embed, backbone, losses) -> the embedding / head helpers the sampler shares (``sampler.py``).

The pieces a sibling model swaps (MonoFormer): the continuous ``objective``
(:class:`~mmgen_pytorch.objectives.base.ContinuousObjective`), the ``time_injection`` (how a
modality's time reaches the backbone), the placement of modality tokens (``flat_positions``), the
unconditional text (``uncond_text``), and the modality layers (``_build_modality_layers``,
``embed_latents``, ``modality_output``, ``to_modality``, ``decode_modality``).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import GeneratorLike, as_int, check, check_finite, check_index_range, default, describe, eval_mode
from ..backbone import KVCache, Transformer
from ..saving import Checkpointable
from ..objectives.base import ContinuousObjective
from ..objectives.flow import RectifiedFlow, TimeEmbedding
from .modalities import ModalitySpec, modality_specs
from .noising import NoisedGroup, NoiseInput, TimesInput, noise_groups
from .packing import (UNCOND_TEXT, LatentRun, Modality, PackedBatch, Placement, SampleSequence, Shape, Vocabulary,
                      build_training_sequence, pack)
from .sampler import Sampler, forced_tokens, prompt_as_list

ModalityInput = Union[Tensor, Tuple[int, Tensor]]


class LossBreakdown(NamedTuple):
    total: Tensor
    text: Tensor                    # mean cross-entropy over labelled text tokens
    flow: Tuple[Tensor, ...]        # mean objective (flow / diffusion) loss per modality type (0 where absent)
    text_per_sample: Tensor         # [b] mean text loss of each sample (nan if it has no labels)
    flow_per_sample: Tensor         # [b, M] mean objective loss of each sample per type (nan if absent)


class TimeInjection(nn.Module):
    """How the time of a modality's tokens reaches the backbone.

    ``forward(x, time_table, time_index, latents) -> (x, backbone_kwargs)``: ``time_table [k, dim]`` holds
    the embedded distinct times, ``time_index [b, n]`` the row of each latent token (-1 elsewhere),
    ``latents`` the embedded runs (:class:`LatentRun`). ``time_tokens``: tokens the placement reserves
    right before each modality's latents for this injection; ``block_conditioned``: the backbone's
    blocks take the time (per-block adaLN, built with ``dim_cond``).
    """

    time_tokens: int = 0
    block_conditioned: bool = False


class PerBlockAdaLN(TimeInjection):
    """Transfusion: every block modulates latent tokens by their time (adaLN-Zero inside the backbone)."""

    block_conditioned = True

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor, latents: List[LatentRun]):
        return x, dict(cond=time_table, cond_index=time_index)


class Transfusion(Checkpointable, nn.Module):
    """Text (next-token prediction) and modalities (a continuous objective) in one transformer.

    The arguments follow transfusion-pytorch (see the README); the pieces a sibling model swaps:

    - ``objective``: a :class:`~mmgen_pytorch.objectives.base.ContinuousObjective` (default: rectified
      flow from ``time_sampling`` / ``ode_method`` / ``ode_kwargs``);
    - ``time_injection``: a :class:`TimeInjection` (default: per-block adaLN inside the backbone);
    - ``flat_positions``: modality tokens take consecutive 1-D positions instead of M-RoPE grid positions;
    - ``uncond_text``: CFG's dropped text is ``"null"`` (``null_text`` ids) or ``"empty"`` (left out);
    - ``text_loss_on_modality_rows``: False leaves the text of samples that hold a modality out of the
      text loss (MonoFormer's rule); the default trains on every sample's text.
    """

    def __init__(self, *, num_text_tokens: int, transformer: Union[dict, Transformer],
                 dim_latent: Union[int, Sequence[int], None] = None,
                 channel_first_latent: Union[bool, Sequence[bool]] = False,
                 modality_default_shape=None, modality_num_dim: Union[int, Sequence[int], None] = None,
                 modality_encoder=None, modality_decoder=None, add_pos_emb: Union[bool, Sequence[bool]] = False,
                 text_loss_weight: float = 1.0, flow_loss_weight: float = 1.0,
                 modality_loss_weights: Optional[Sequence[float]] = None, prob_uncond: float = 0.1,
                 ignore_index: int = -1, time_sampling: str = "uniform", ode_method: str = "midpoint",
                 ode_kwargs: Optional[dict] = None, attn_backend: str = "auto",
                 objective: Optional[ContinuousObjective] = None, time_injection: Optional[TimeInjection] = None,
                 flat_positions: bool = False, uncond_text: str = "null", text_loss_on_modality_rows: bool = True):
        super().__init__()
        check(num_text_tokens > 0, f"`num_text_tokens` must be positive, got {num_text_tokens}")
        check(0.0 <= prob_uncond < 1.0, f"`prob_uncond` must be in [0, 1), got {prob_uncond}")
        check(uncond_text in UNCOND_TEXT, f"`uncond_text` must be one of {UNCOND_TEXT}, got {uncond_text!r}")
        transformer_dim = transformer.dim if isinstance(transformer, Transformer) else transformer["dim"]
        self.modalities: Tuple[ModalitySpec, ...] = modality_specs(
            dim_latent=default(dim_latent, transformer_dim), channel_first_latent=channel_first_latent,
            modality_default_shape=modality_default_shape, modality_num_dim=modality_num_dim,
            modality_encoder=modality_encoder, modality_decoder=modality_decoder, add_pos_emb=add_pos_emb)
        num_modalities = self.num_modalities = len(self.modalities)
        self.vocab = Vocabulary(num_text_tokens, num_modalities)
        self.time_injection = default(time_injection, PerBlockAdaLN())
        self.rotary_axes = 1 if flat_positions else max([1] + [m.rank for m in self.modalities if m.rank is not None])
        self.placement = Placement(axes=self.rotary_axes, flat=flat_positions,
                                   time_tokens=self.time_injection.time_tokens)
        self.uncond_text = uncond_text
        self.text_loss_weight, self.flow_loss_weight = text_loss_weight, flow_loss_weight
        self.text_loss_on_modality_rows = text_loss_on_modality_rows
        self.modality_loss_weights = tuple(default(modality_loss_weights, (1.0,) * num_modalities))
        self.prob_uncond, self.ignore_index = prob_uncond, ignore_index
        self.objective = objective if objective is not None else RectifiedFlow(
            time_sampling=time_sampling, ode_method=ode_method, ode_kwargs=ode_kwargs)

        self.transformer = self._build_transformer(transformer, attn_backend)
        dim = self.transformer.dim
        self.dim = dim
        self.token_emb = nn.Embedding(self.vocab.size, dim)
        self._build_modality_layers([m.dim_latent for m in self.modalities], [m.add_pos_emb for m in self.modalities])
        self.to_text_logits = nn.Linear(dim, self.vocab.size, bias=False)

    def _build_modality_layers(self, dims: Sequence[int], add_pos_emb: Sequence[bool]) -> None:
        """Linear in / out per modality, an optional learned position MLP, the time embedding."""
        dim = self.dim
        self.latent_to_model = nn.ModuleList(nn.Linear(d, dim) for d in dims)
        self.model_to_latent = nn.ModuleList(nn.Linear(dim, self.objective.output_dim(d)) for d in dims)
        self.pos_emb = nn.ModuleList(
            nn.Sequential(nn.Linear(self.rotary_axes, dim), nn.SiLU(), nn.Linear(dim, dim)) if use else None
            for use in add_pos_emb)
        self.time_emb = TimeEmbedding(dim)

    @property
    def flow(self) -> ContinuousObjective:
        """The continuous objective (Transfusion's rectified flow); kept under its historical name."""
        return self.objective

    def _build_transformer(self, transformer, attn_backend: str) -> Transformer:
        block_conditioned = self.time_injection.block_conditioned
        if isinstance(transformer, Transformer):
            check(not block_conditioned or transformer.dim_cond == transformer.dim,
                  "a Transformer instance given to Transfusion needs `dim_cond=dim` (timestep adaLN)")
            axes = transformer.rotary.axes if transformer.rotary is not None else 0
            check(axes == self.rotary_axes,
                  f"`transformer`: the modalities' ranks {[m.rank for m in self.modalities]} need a Transformer with "
                  f"`rotary_axes={self.rotary_axes}`, got one with rotary_axes={axes}")
            return transformer
        check(isinstance(transformer, dict) and "dim" in transformer and "depth" in transformer,
              f"`transformer` must be a Transformer or a dict with at least `dim` and `depth`, got {describe(transformer)}")
        config = dict(heads=8, attn_backend=attn_backend)
        config.update(transformer)
        dim_head = config.get("dim_head", config["dim"] // config["heads"])
        config.setdefault("dim_head", dim_head)
        config.update(rotary_axes=self.rotary_axes, rotary_dim=dim_head - dim_head % (2 * self.rotary_axes),
                      dim_cond=config["dim"] if block_conditioned else None)
        return Transformer(**config)

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    # input normalisation

    def to_items(self, sample, *, name: str = "sample", modality_type: int = 0) -> List[Union[Tensor, Modality]]:
        """Validate one ragged sample and turn its modalities into channel-last latent tokens; a bare
        float tensor is a modality of type ``modality_type``."""
        check(isinstance(sample, (list, tuple)), f"`{name}` must be a list of text tensors and modalities, got {describe(sample)}")
        check(len(sample) > 0, f"`{name}` is empty: give at least one text tensor or modality")
        items = []
        for index, item in enumerate(sample):
            where = f"{name}[{index}]"
            if isinstance(item, tuple):
                check(len(item) == 2, f"`{where}` must be a (modality_type, tensor) tuple, got {describe(item)}")
                items.append(self.to_modality(item[1], item[0], name=where))
            elif isinstance(item, Tensor) and item.is_floating_point():
                items.append(self.to_modality(item, modality_type, name=where))
            else:
                items.append(self.check_text(item, name=where))
        return items

    def check_text(self, ids, *, name: str) -> Tensor:
        check(isinstance(ids, Tensor) and ids.dtype in (torch.long, torch.int, torch.int16, torch.uint8),
              f"`{name}` must be a long tensor of text token ids, got {describe(ids)}")
        check(ids.ndim == 1, f"`{name}`: text must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        check_index_range(name, ids, self.vocab.num_text_tokens, what="text token ids", bound="num_text_tokens")
        return ids.long().to(self.device)

    def to_modality(self, tensor, modality: int, *, name: str) -> Modality:
        modality = self.check_modality_type(modality, name=name)
        check(isinstance(tensor, Tensor) and tensor.is_floating_point(),
              f"`{name}`: a modality must be a float tensor, got {describe(tensor)}")
        check_finite(name, tensor)
        spec = self.modalities[modality]
        tensor = tensor.to(self.device)
        if spec.encoder is not None:
            tensor = spec.encoder(tensor)
        latent = tensor.movedim(0, -1) if spec.channel_first else tensor
        dim_latent = spec.dim_latent
        check(latent.ndim >= 1 and latent.shape[-1] == dim_latent,
              f"`{name}`: modality {modality} expects latents with {dim_latent} channels "
              f"({'first' if spec.channel_first else 'last'} axis), got shape {tuple(tensor.shape)}"
              + (" (text must be a long tensor)" if tensor.ndim == 1 else ""))
        shape = tuple(latent.shape[:-1])
        rank = spec.rank
        check(rank is None or len(shape) == rank,
              f"`{name}`: modality {modality} has rank {rank}, got a latent grid of shape {shape}")
        check(rank is not None or 0 < len(shape) <= self.rotary_axes or self.placement.flat,
              f"`{name}`: modality {modality} got a latent grid of shape {shape}, but its rank is unknown and the "
              f"model has {self.rotary_axes} rotary axes: build the model with `modality_num_dim` or "
              f"`modality_default_shape` for it" + (" (text must be a long tensor)" if tensor.ndim == 1 else ""))
        check(all(size > 0 for size in shape), f"`{name}`: modality {modality} got an empty latent grid {shape}")
        # latents are float32 targets whatever the input precision (float64 would not mix with the losses)
        return Modality(modality, latent.reshape(-1, dim_latent).float(), shape)

    def normalize_batch(self, x, modality_type: Optional[int]) -> Tuple[List[List], bool]:
        """Returns (samples of items, text_only). ``modality_type`` is the type of every bare float tensor
        (``Float[b, ...]``, or untagged in a list batch, where it defaults to 0)."""
        check(not isinstance(x, Tensor) or (x.ndim >= 1 and x.shape[0] > 0),
              f"`x` must hold at least one sample, got {describe(x)}")
        if isinstance(x, Tensor) and not x.is_floating_point():
            check(x.ndim == 2, f"text-only input must be Int[batch, seq], got shape {tuple(x.shape)}")
            check(modality_type is None, f"`modality_type` ({modality_type!r}) is for modalities, but `x` is "
                                         f"text only ({describe(x)})")
            return [[self.check_text(row, name=f"x[{i}]")] for i, row in enumerate(x)], True
        if isinstance(x, Tensor):
            m = self.check_modality_type(modality_type)
            return [[self.to_modality(row, m, name=f"x[{i}]")] for i, row in enumerate(x)], False
        check(isinstance(x, (list, tuple)) and len(x) > 0,
              f"`x` must be a non-empty list of samples, an Int[b, n] or a Float[b, ...] tensor, got {describe(x)}")
        untagged = self.check_modality_type(modality_type) if modality_type is not None else 0
        return [self.to_items(sample, name=f"x[{i}]", modality_type=untagged) for i, sample in enumerate(x)], False

    # forward

    def forward(self, x, *, return_loss: bool = True, return_breakdown: bool = False,
                modality_type: Optional[int] = None, times: TimesInput = None, noise: NoiseInput = None,
                prob_uncond: Optional[float] = None):
        """Loss of a batch (see the README for the input forms).

        ``modality_type``: the type of every bare float tensor: of a ``Float[b, ...]`` batch (needed with
        several modalities), or of the untagged float tensors of a list batch (default 0; a
        ``(modality_type, tensor)`` tuple keeps its own type).

        ``times`` / ``noise``: per sample, one time in [0, 1) / one noise tensor (shaped like the latent,
        channel-last tokens ``[n, dim_latent]``) per NOISED modality of that sample, in order; drawn at
        random when not given. ``times`` may also be transfusion-pytorch's padded ``Float[b, m]`` tensor. Returns the loss, ``(loss, LossBreakdown)``, or with ``return_loss=False``
        the text logits and per-modality velocity predictions of the packed batch.

        A batch without any modality of some type (text-only pretraining steps) leaves that type's
        layers without a gradient: under DistributedDataParallel use ``find_unused_parameters=True``.
        """
        samples, text_only = self.normalize_batch(x, modality_type)
        packed = self._pack(samples, text_only, prob_uncond)
        groups, token_times = noise_groups(packed, self.objective, [m.dim_latent for m in self.modalities],
                                           times=times, noise=noise)
        hidden = self.run_backbone(packed.token_ids, packed.positions, packed.layout,
                                   [g.backbone_input() for g in groups], token_times)
        text_logits = self.to_text_logits(hidden)
        if text_only:
            text_logits = text_logits[..., :self.vocab.num_text_tokens]
        outputs = [self.modality_output(hidden, g.modality, g.flat_index, g.times) for g in groups]
        if not return_loss:
            return text_logits, outputs
        breakdown = self._losses(packed, text_logits, outputs, groups)
        return (breakdown.total, breakdown) if return_breakdown else breakdown.total

    def _pack(self, samples: List[List], text_only: bool, prob_uncond: Optional[float]) -> PackedBatch:
        """The samples as training sequences (text dropped for CFG with ``prob_uncond``) in one padded grid."""
        prob_uncond = default(prob_uncond, self.prob_uncond if self.training else 0.0)
        check(0.0 <= prob_uncond <= 1.0, f"`prob_uncond` must be in [0, 1], got {prob_uncond}")
        # drawn from torch's generator (not Python's `random`) so that torch.manual_seed alone reproduces
        # a forward; nothing is drawn without dropout, which leaves the times and noise drawn later unchanged
        draws = torch.rand(len(samples)) if prob_uncond > 0 else torch.ones(len(samples))
        drop = [bool(u < prob_uncond) and any(isinstance(i, Modality) for i in s) for u, s in zip(draws, samples)]
        sequences = [build_training_sequence(items, self.vocab, self.placement, drop_text=d,
                                             uncond_text=self.uncond_text, sos=not text_only, eos=not text_only)
                     for items, d in zip(samples, drop)]
        return pack(sequences, num_modalities=self.num_modalities, ignore_index=self.ignore_index, device=self.device)

    def _losses(self, packed: PackedBatch, text_logits: Tensor, outputs: List[Tensor],
                groups: List[NoisedGroup]) -> LossBreakdown:
        batch = packed.shape[0]
        token_ce = F.cross_entropy(text_logits.transpose(1, 2).float(), packed.labels,
                                   ignore_index=self.ignore_index, reduction="none")
        labelled = packed.labels != self.ignore_index
        if not self.text_loss_on_modality_rows:  # MonoFormer: only rows without a modality train the LM
            with_modality = torch.zeros(batch, dtype=torch.bool, device=self.device)
            with_modality[[inst.row for inst in packed.instances]] = True
            labelled &= ~with_modality[:, None]
        labelled = labelled.float()
        text = (token_ce * labelled).sum() / labelled.sum().clamp_min(1)
        text_per_sample = (token_ce * labelled).sum(1) / labelled.sum(1)

        flow = [torch.zeros((), device=self.device) for _ in range(self.num_modalities)]
        flow_per_sample = torch.full((batch, self.num_modalities), float("nan"), device=self.device)
        for group, output in zip(groups, outputs):
            keep = group.trained
            if not keep.any():
                continue
            per_token = self.objective.loss(output[keep], group.clean[keep], group.noise[keep], group.noised[keep],
                                            group.times[keep])
            flow[group.modality] = per_token.mean()
            token_rows = group.rows[keep]
            sums = torch.zeros(batch, device=self.device).index_add(0, token_rows, per_token)
            counts = torch.zeros(batch, device=self.device).index_add(0, token_rows, torch.ones_like(per_token))
            flow_per_sample[:, group.modality] = sums / counts
        weighted_flow = sum(w * f for w, f in zip(self.modality_loss_weights, flow))
        total = self.text_loss_weight * text + self.flow_loss_weight * weighted_flow
        return LossBreakdown(total, text, tuple(flow), text_per_sample, flow_per_sample)

    # the sampler's interface (:class:`~mmgen_pytorch.transfusion.sampler.SamplingModel`)

    def prompt_sequence(self, items: Sequence, *, drop_text: bool, sos: bool) -> SampleSequence:
        """A prompt's sequence as in training (text dropped for a CFG twin), open at its end."""
        return build_training_sequence(items, self.vocab, self.placement, drop_text=drop_text,
                                       uncond_text=self.uncond_text, sos=sos, eos=False, noise_last=False)

    def pack_prompts(self, sequences: Sequence[SampleSequence]) -> PackedBatch:
        """Prompts in one left-padded grid, so that every row continues at the same column."""
        return pack(sequences, num_modalities=self.num_modalities, ignore_index=self.ignore_index, pad_left=True,
                    device=self.device)

    @property
    def twin_skips_text(self) -> bool:
        return self.uncond_text == "empty"

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.transformer.new_cache(batch_size, max_length)

    def run_backbone(self, token_ids: Tensor, positions: Tensor, layout, latents: List[LatentRun],
                     token_times: Tensor, **backbone_kwargs) -> Tensor:
        """Embed text ids and latent tokens (``(modality, flat_index, values, coords_in_modality)``),
        inject the latent tokens' times, and run the transformer."""
        x = self.token_emb(token_ids)
        flat = x.reshape(-1, self.dim).clone()
        latent_mask = torch.zeros(token_ids.numel(), dtype=torch.bool, device=x.device)
        for modality, index, values, coords in latents:
            flat = flat.index_copy(0, index, self.embed_latents(modality, values.to(x.dtype), coords))
            latent_mask[index] = True
        x = flat.view_as(x)
        latent_mask = latent_mask.view(token_ids.shape)
        # every token of a modality shares its time: embed (and modulate) each distinct time once
        times, inverse = torch.unique(token_times[latent_mask], return_inverse=True)
        time_index = torch.full_like(token_ids, -1).masked_scatter(latent_mask, inverse)
        if times.numel() == 0:
            times = token_times.new_full((1,), self.objective.clean_time)
        time_table = self.time_emb(self.objective.time_embedding_input(times))
        x, time_kwargs = self.time_injection(x, time_table, time_index, latents)
        return self.transformer(x, layout=layout, positions=positions, **time_kwargs, **backbone_kwargs)

    def embed_latents(self, modality: int, values: Tensor, coords: Tensor) -> Tensor:
        """``[k, dim_latent]`` latent tokens (and their coordinates in the modality) -> ``[k, dim]``."""
        embedded = self.latent_to_model[modality](values)
        if self.pos_emb[modality] is not None:
            embedded = embedded + self.pos_emb[modality](coords.to(values.dtype))
        return embedded

    def modality_output(self, hidden: Tensor, modality: int, flat_index: Tensor, times: Tensor) -> Tensor:
        """The objective's prediction (``[k, output_dim]``, float32) at latent tokens ``flat_index`` whose
        times are ``times [k]`` (Transfusion's linear head ignores them)."""
        return self.model_to_latent[modality](hidden.reshape(-1, self.dim)[flat_index]).float()

    def shape_for(self, modality: int, emitted: Optional[Shape], fixed: Optional[Shape]) -> Shape:
        """Fixed shape if forced, else the emitted one, else the default (error if none)."""
        if fixed is not None:
            return self.check_shape(modality, fixed, name="fixed_modality_shape")
        shape = emitted if emitted is not None else self.modalities[modality].default_shape
        check(shape is not None, f"modality {modality} has no valid shape: pass `fixed_modality_shape` "
                                 f"or build the model with `modality_default_shape`")
        return tuple(shape)

    def check_shape(self, modality: int, shape, *, name: str) -> Shape:
        """A latent grid shape given for ``modality``: positive ints, as many as the modality's rank."""
        rank = self.modalities[modality].rank
        valid = isinstance(shape, (tuple, list)) and all(isinstance(s, int) and s > 0 for s in shape)
        check(valid and (rank is None or len(shape) == rank),
              f"`{name}` must be a tuple of {rank if rank is not None else 'any number of'} positive ints for "
              f"modality {modality}, got {shape!r}")
        return tuple(shape)

    def check_modality_type(self, modality, *, name: str = "modality_type") -> int:
        """A modality type in ``[0, num_modalities)`` (an int or a 0-dim integer tensor); None means 0 and
        is allowed with one modality only."""
        check(modality is not None or self.num_modalities == 1,
              f"`{name}` is needed when the model has {self.num_modalities} modalities")
        index = as_int(default(modality, 0))
        check(index is not None and 0 <= index < self.num_modalities,
              f"`{name}` must be a modality type in [0, {self.num_modalities}), got {modality!r}")
        return index

    # sampling

    @torch.no_grad()
    def sample(self, prompt=None, *, batch_size: Optional[int] = None, max_length: int = 2048,
               text_temperature: float = 1.0, text_min_p: float = 0.1, text_top_k: int = 0, text_top_p: float = 1.0,
               cfg_scale: float = 3.0, modality_steps: int = 16, fixed_modality_shape: Optional[Shape] = None,
               force_modality_at_start=None, max_modalities: Optional[int] = None,
               return_unprocessed_modalities: bool = False, use_cache: bool = True, progress: bool = True,
               generator: GeneratorLike = None, objective_kwargs: Optional[dict] = None):
        """Generate interleaved text and modalities.

        ``prompt``: None, one prompt (a list of text tensors / modalities, or a single tensor), or a list
        of prompts (batched). Returns one sample (a list of text tensors and ``(modality_type, tensor)``),
        or a list of samples for a list of prompts or a ``batch_size`` (which must then equal the number
        of prompts; an empty list is refused). ``objective_kwargs`` go to the objective's ``generate``
        (Gaussian diffusion: ``temperature``, ``sampler``, ``eta``, ``clip_denoised``; rectified flow: none).
        ``generator``: a ``torch.Generator`` or an int seed. Every option is checked before any prompt is
        encoded or run.
        """
        check(batch_size is None or (isinstance(batch_size, int) and batch_size >= 1),
              f"`batch_size` must be an int >= 1, got {batch_size!r}")
        check(max_modalities is None or max_modalities >= 0, f"`max_modalities` must be >= 0, got {max_modalities}")
        check(not (isinstance(prompt, list) and len(prompt) == 0),
              "`prompt` is an empty list: pass `prompt=None` for one unconditional sample, `batch_size=n` for n of "
              "them, or a list of prompts")
        batched = isinstance(prompt, list) and all(isinstance(p, list) or p is None for p in prompt)
        check(not batched or batch_size in (None, len(prompt)),
              f"`batch_size` ({batch_size}) disagrees with the {len(prompt) if batched else 0} prompts in `prompt`: "
              f"a list of prompts gives one sample each; `batch_size` repeats a single prompt")
        prompts = [prompt_as_list(p) for p in (prompt if batched else [prompt] * default(batch_size, 1))]
        sampler = Sampler(self, max_length=max_length, text_temperature=text_temperature, text_min_p=text_min_p,
                          text_top_k=text_top_k, text_top_p=text_top_p, cfg_scale=cfg_scale,
                          modality_steps=modality_steps, fixed_modality_shape=fixed_modality_shape,
                          max_modalities=max_modalities, return_unprocessed_modalities=return_unprocessed_modalities,
                          use_cache=use_cache, progress=progress, generator=generator,
                          objective_kwargs=objective_kwargs)
        forced = [forced_tokens(self, force_modality_at_start)] * len(prompts)
        items = [self.to_items(p, name=f"prompt[{i}]") if p else [] for i, p in enumerate(prompts)]
        with eval_mode(self):  # inputs are validated above, so a bad call leaves the mode untouched
            samples = [prompt + generated for prompt, generated in zip(prompts, sampler(items, forced))]
        return samples if batched or batch_size is not None else samples[0]

    @torch.no_grad()
    def generate_text_only(self, prompt: Tensor, seq_len: int, *, temperature: float = 1.0, min_p: float = 0.1,
                           top_k: int = 0, top_p: float = 1.0, use_cache: bool = True, progress: bool = True,
                           generator: GeneratorLike = None) -> Tensor:
        """Text-only continuation of ``prompt`` (Int[b, n]) up to ``seq_len`` tokens; returns the new tokens."""
        check(isinstance(prompt, Tensor) and prompt.ndim == 2 and not prompt.is_floating_point()
              and prompt.shape[0] > 0,
              f"`prompt` must be Int[batch, seq] with batch >= 1, got {describe(prompt)}")
        check(seq_len > prompt.shape[1], f"`seq_len` ({seq_len}) must exceed the prompt length ({prompt.shape[1]})")
        rows = [[self.check_text(p, name=f"prompt[{i}]")] for i, p in enumerate(prompt)]
        sampler = Sampler(self, max_length=seq_len, text_temperature=temperature, text_min_p=min_p, text_top_k=top_k,
                          text_top_p=top_p, use_cache=use_cache, progress=progress, generator=generator, text_only=True)
        with eval_mode(self):
            out = sampler(rows, [[]] * len(rows))
        return torch.stack([sample[-1] for sample in out]).to(prompt.device)

    @torch.no_grad()
    def generate_modality_only(self, batch_size: int = 1, *, modality_type: Optional[int] = None,
                               fixed_modality_shape: Optional[Shape] = None, modality_steps: int = 16,
                               return_unprocessed_modalities: bool = False, progress: bool = True,
                               generator: GeneratorLike = None) -> Tensor:
        """Unconditional modalities ``[batch_size, ...]`` (no text, no guidance)."""
        check(isinstance(batch_size, int) and batch_size >= 1, f"`batch_size` must be an int >= 1, got {batch_size!r}")
        modality = self.check_modality_type(modality_type)
        shape = self.shape_for(modality, None, fixed_modality_shape)
        max_length = self.placement.length(shape) + len(shape) * 8 + 8
        samples = self.sample([[] for _ in range(batch_size)], max_length=max_length,
                              cfg_scale=1.0, modality_steps=modality_steps, force_modality_at_start=(modality, shape),
                              max_modalities=1, return_unprocessed_modalities=return_unprocessed_modalities,
                              progress=progress, generator=generator)
        return torch.stack([next(item[1] for item in sample if isinstance(item, tuple)) for sample in samples])

    def decode_modality(self, modality: int, tokens: Tensor, shape: Shape) -> Tensor:
        """Channel-last tokens -> the user's layout (channel-first if configured), through the decoder."""
        return self.modalities[modality].from_tokens(tokens, shape)


def print_modality_sample(sample: List) -> None:
    """Print a sampled sequence as (kind, shape) lines; a batch (a list of samples, as ``sample`` returns
    for a list of prompts or a ``batch_size``) prints each sample under a ``sample i:`` header."""
    check(isinstance(sample, (list, tuple)), f"`sample` must be one sample (a list of text tensors and "
                                             f"(modality_type, tensor) tuples) or a list of them, got {describe(sample)}")
    if sample and all(isinstance(s, list) for s in sample):
        for index, one in enumerate(sample):
            print(f"sample {index}:")
            print_modality_sample(one)
        return
    for index, item in enumerate(sample):
        modality = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)
        check(modality or isinstance(item, Tensor),
              f"`sample[{index}]` must be a text tensor or a (modality_type, tensor) tuple, got {describe(item)}")
        print(f"modality {item[0]}: {tuple(item[1].shape)}" if modality else f"text: {tuple(item.shape)}")
