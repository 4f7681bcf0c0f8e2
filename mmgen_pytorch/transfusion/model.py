"""Transfusion: one transformer, next-token prediction on text and flow matching on modalities.

Reading order: construction -> input normalisation -> forward (pack, noise, embed, backbone, losses)
-> the embedding / head helpers the sampler shares (``sampler.py``) -> sampling.

A sibling is Transfusion wired with other pieces, each passed in as an object or an enum, none by
overriding a method (MonoFormer, :mod:`mmgen_pytorch.monoformer`):

- ``objective``: a :class:`~mmgen_pytorch.objectives.base.ContinuousObjective` (default: rectified flow);
- ``time_injection``: a :class:`~mmgen_pytorch.transfusion.time_injection.TimeInjection` (default:
  per-block adaLN inside the backbone);
- ``modalities``: one record per modality type, which converts the user's tensors and builds the layers
  between its tokens and the backbone (:mod:`mmgen_pytorch.transfusion.modalities`; default: linear in /
  out, from transfusion-pytorch's per-argument lists);
- ``positions`` (:class:`Positions`), ``uncond_text`` (:class:`UncondText`), ``text_loss``
  (:class:`TextLoss`) and ``max_prompt_length``.
"""

from __future__ import annotations

import warnings
from enum import Enum
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import (GeneratorLike, as_enum, as_int, check, check_finite, check_index_range, default, describe,
                      eval_mode, pick_alias)
from ..backbone import KVCache, Transformer
from ..saving import Checkpointable
from ..objectives.base import ContinuousObjective
from ..objectives.flow import RectifiedFlow, TimeEmbedding, upstream_flow_objective
from .enc_dec import TrainableEncDec
from .modalities import ModalityFormat, check_modality_formats, modality_specs, nominal_rank
from .noising import (NoisedGroup, NoiseInput, TimesFn, TimesInput, grid_times, later_groups, noise_groups,
                      per_sample_times, times_from_fn)
from .packing import (LatentRun, Modality, PackedBatch, Placement, Positions, SampleSequence, Shape, UncondText,
                      Vocabulary, build_training_sequence, pack, shape_from_text)
from .sampler import (LengthBudget, ParsedPrompt, PromptParser, Sampler, forced_tokens, merge_text,
                      prompt_as_list)
from .time_injection import PerBlockAdaLN, TimeInjection

ModalityInput = Union[Tensor, Tuple[int, Tensor]]
UPSTREAM_PROCESSING_STRATEGIES = ("auto", "naive", "grouped", "flat", "hybrid")  # transfusion-pytorch's, all ignored


class LossBreakdown(NamedTuple):
    total: Tensor
    text: Tensor                    # mean cross-entropy over labelled text tokens
    flow: Tuple[Tensor, ...]        # mean objective (flow / diffusion) loss per modality type (0 where absent)
    text_per_sample: Tensor         # [b] mean text loss of each sample (nan if it has no labels)
    flow_per_sample: Tensor         # [b, M] mean objective loss of each sample per type (nan if absent)
    # per modality type (0 where absent); None unless forward got `velocity_consistency_ema_model`
    velocity: Optional[Tuple[Tensor, ...]] = None
    # per modality type, the mean over its instances (0 where absent); None unless reconstruction_loss_weight > 0
    recon: Optional[Tuple[Tensor, ...]] = None


class TextLoss(str, Enum):
    """Which samples' text the language-model loss trains on."""

    ALL_ROWS = "all_rows"                            # every sample's text (Transfusion)
    ROWS_WITHOUT_MODALITY = "rows_without_modality"  # a prompt before a modality only conditions (MonoFormer)


class Transfusion(Checkpointable, nn.Module):
    """Text (next-token prediction) and modalities (a continuous objective) in one transformer.

    The arguments follow transfusion-pytorch (see the README); the pieces a sibling model swaps:

    - ``objective``: a :class:`~mmgen_pytorch.objectives.base.ContinuousObjective` (default:
      ``RectifiedFlow()``; e.g. ``RectifiedFlow(time_sampling="logit_normal", ode_method="rk4")``);
    - ``time_injection``: a :class:`~mmgen_pytorch.transfusion.time_injection.TimeInjection` (default:
      per-block adaLN inside the backbone);
    - ``modalities``: one record per modality type (:class:`~mmgen_pytorch.transfusion.modalities.ModalitySpec`,
      :class:`~mmgen_pytorch.transfusion.patches.PatchedLatents`, ...), instead of the per-argument lists
      ``dim_latent`` ... ``add_pos_emb``;
    - ``positions``: ``"grid"`` (M-RoPE grid positions) or ``"flat"`` (consecutive 1-D positions);
    - ``uncond_text``: CFG's dropped text is ``"null"`` (``null_text`` ids) or ``"empty"`` (left out);
    - ``text_loss``: ``"all_rows"``, or ``"rows_without_modality"``, which leaves the text of samples
      that hold a modality out of the text loss;
    - ``max_prompt_length``: the most text tokens right before a modality (None: no limit).

    transfusion-pytorch's training options: ``model_output_clean`` (x-prediction: the network predicts the
    clean latent, the velocity is derived; ``RectifiedFlow(prediction="clean")``), ``eps`` (its floor of
    ``1 - t``), ``odeint_kwargs`` (torchdiffeq's ``method`` / ``rtol`` / ``atol`` / ``options`` for sampling;
    ``RectifiedFlow(ode_method=..., ode_kwargs=...)``): each given with an ``objective`` must agree with it.
    ``reconstruction_loss_weight``: weight of the squared error between the one-step clean estimate and the
    clean latent, both through the modality's decoder if it has one. ``velocity_consistency_loss_weight``:
    weight of the velocity consistency loss, used when ``forward`` gets ``velocity_consistency_ema_model``.
    ``modality_processing``: accepted for transfusion-pytorch's code and ignored: its names pick one of that
    library's internal batching strategies (``"auto"``, ``"naive"``, ``"grouped"``, ``"flat"``, ``"hybrid"``),
    while here one packing path serves every batch.
    """

    def __init__(self, *, num_text_tokens: int, transformer: Union[dict, Transformer],
                 dim_latent: Union[int, Sequence[int], None] = None,
                 channel_first_latent: Union[bool, Sequence[bool]] = False,
                 modality_default_shape=None, modality_num_dim: Union[int, Sequence[int], None] = None,
                 modality_encoder=None, modality_decoder=None, add_pos_emb: Union[bool, Sequence[bool]] = False,
                 modalities: Optional[Sequence[ModalityFormat]] = None,
                 text_loss_weight: float = 1.0, flow_loss_weight: float = 1.0,
                 modality_loss_weights: Optional[Sequence[float]] = None, prob_uncond: float = 0.1,
                 ignore_index: int = -1, attn_backend: str = "auto",
                 objective: Optional[ContinuousObjective] = None, time_injection: Optional[TimeInjection] = None,
                 positions: Union[str, Positions] = Positions.GRID,
                 uncond_text: Union[str, UncondText] = UncondText.NULL,
                 text_loss: Union[str, TextLoss] = TextLoss.ALL_ROWS, max_prompt_length: Optional[int] = None,
                 pre_post_transformer_enc_dec=None, modality_encoder_decoder_requires_batch_dim: bool = True,
                 to_modality_shape_fn=None, fallback_to_default_shape_if_invalid: bool = False,
                 model_output_clean: Optional[bool] = None, reconstruction_loss_weight: float = 0.0,
                 velocity_consistency_loss_weight: float = 0.1, odeint_kwargs: Optional[dict] = None,
                 eps: Optional[float] = None, modality_processing: str = "auto"):
        super().__init__()
        check(modality_processing in UPSTREAM_PROCESSING_STRATEGIES,
              f"`modality_processing` must be one of {UPSTREAM_PROCESSING_STRATEGIES} (transfusion-pytorch's names; "
              f"ignored here: one packing path serves every batch), got {modality_processing!r}")
        for name, weight in (("reconstruction_loss_weight", reconstruction_loss_weight),
                             ("velocity_consistency_loss_weight", velocity_consistency_loss_weight)):
            check(isinstance(weight, (int, float)) and 0.0 <= weight < float("inf"),
                  f"`{name}` must be a finite float >= 0, got {weight!r}")
        objective = upstream_flow_objective(objective, model_output_clean=model_output_clean,
                                            odeint_kwargs=odeint_kwargs, eps=eps)
        check(reconstruction_loss_weight == 0 or hasattr(objective, "predicted_clean"),
              f"`reconstruction_loss_weight` needs an objective with a clean estimate (RectifiedFlow), "
              f"got {type(objective).__name__}")
        check(num_text_tokens > 0, f"`num_text_tokens` must be positive, got {num_text_tokens}")
        check(0.0 <= prob_uncond <= 1.0, f"`prob_uncond` must be in [0, 1], got {prob_uncond}")
        check(max_prompt_length is None or max_prompt_length > 0,
              f"`max_prompt_length` must be None or positive, got {max_prompt_length}")
        positions = as_enum(Positions, positions, "positions")
        self.uncond_text = as_enum(UncondText, uncond_text, "uncond_text")
        self.text_loss = as_enum(TextLoss, text_loss, "text_loss")
        transformer_dim = transformer.dim if isinstance(transformer, Transformer) else transformer["dim"]
        self.modalities: Tuple[ModalityFormat, ...] = self._modality_records(
            modalities, transformer_dim, dim_latent=dim_latent, channel_first_latent=channel_first_latent,
            modality_default_shape=modality_default_shape, modality_num_dim=modality_num_dim,
            modality_encoder=modality_encoder, modality_decoder=modality_decoder, add_pos_emb=add_pos_emb,
            pre_post_transformer_enc_dec=pre_post_transformer_enc_dec,
            batch_dim=modality_encoder_decoder_requires_batch_dim)
        num_modalities = self.num_modalities = len(self.modalities)
        self.vocab = Vocabulary(num_text_tokens, num_modalities)
        self.time_injection = default(time_injection, PerBlockAdaLN())
        flat = positions is Positions.FLAT
        check(not flat or not any(isinstance(m, TrainableEncDec) for m in self.modalities),
              "`pre_post_transformer_enc_dec` needs grid positions (`positions='grid'`): its encoder sees each "
              "modality's grid")
        ranks = [nominal_rank(m) for m in self.modalities]
        self.rotary_axes = 1 if flat else max([1] + [r for r in ranks if r is not None])
        self.placement = Placement(axes=self.rotary_axes, flat=flat, time_tokens=self.time_injection.time_tokens)
        self.text_loss_weight, self.flow_loss_weight = text_loss_weight, flow_loss_weight
        self.modality_loss_weights = tuple(default(modality_loss_weights, (1.0,) * num_modalities))
        self.prob_uncond, self.ignore_index, self.max_prompt_length = prob_uncond, ignore_index, max_prompt_length
        self.to_modality_shape_fn = self._shape_functions(to_modality_shape_fn)
        self.fallback_to_default_shape_if_invalid = fallback_to_default_shape_if_invalid
        self.objective = objective
        self.reconstruction_loss_weight = reconstruction_loss_weight
        self.velocity_consistency_loss_weight = velocity_consistency_loss_weight

        self.transformer = self._build_transformer(transformer, attn_backend)
        dim = self.dim = self.transformer.dim
        self.token_emb = nn.Embedding(self.vocab.size, dim)
        self.modality_layers = nn.ModuleList(
            m.build_layers(dim=dim, output_dim=self.objective.output_dim(m.dim_latent), axes=self.rotary_axes)
            for m in self.modalities)
        self.time_emb = TimeEmbedding(dim)
        self.to_text_logits = nn.Linear(dim, self.vocab.size, bias=False)

    @staticmethod
    def _modality_records(modalities, transformer_dim: int, *, batch_dim: bool,
                          **per_argument_lists) -> Tuple[ModalityFormat, ...]:
        if modalities is None:
            return modality_specs(**{**per_argument_lists, "modality_encoder_decoder_requires_batch_dim": batch_dim,
                                     "dim_latent": default(per_argument_lists["dim_latent"], transformer_dim)})
        given = [name for name, value in per_argument_lists.items() if value is not None and value is not False]
        check(not given, f"give either `modalities` or the per-modality arguments, not both (got {given})")
        return check_modality_formats(modalities)

    def _shape_functions(self, to_modality_shape_fn) -> Tuple[Optional[Any], ...]:
        """One ``[meta]`` text -> shape function (or None: ``"3,3"`` -> ``(3, 3)``) per modality."""
        functions = (tuple(to_modality_shape_fn) if isinstance(to_modality_shape_fn, (list, tuple))
                     else (to_modality_shape_fn,) * self.num_modalities)
        check(len(functions) == self.num_modalities and all(f is None or callable(f) for f in functions),
              f"`to_modality_shape_fn` must be a function (text -> shape) or one per modality "
              f"({self.num_modalities}), got {describe(to_modality_shape_fn)}")
        return functions

    def create_ema(self, beta: float = 0.99, **ema_kwargs):
        """An ``ema_pytorch.EMA`` of this model (``beta`` and every other keyword of ``EMA`` passed on),
        whose ``sample`` / ``generate_*`` methods run the averaged model."""
        from ema_pytorch import EMA
        names = ("sample", "sample_one", "sample_many", "generate_text_only", "generate_modality_only")
        ema_kwargs.setdefault("forward_method_names", tuple(n for n in names if hasattr(self, n)))
        return EMA(self, beta=beta, **ema_kwargs)

    # saved folders of earlier versions

    @property
    def legacy_keys(self) -> Dict[str, str]:
        """Weights saved before the modality layers were one module per modality (see
        :func:`~mmgen_pytorch.saving.upgrade_legacy_keys`)."""
        keys = {"x_embedder.": "modality_layers.0.x_embedder.", "final_layer.": "modality_layers.0.final_layer."}
        for index in range(self.num_modalities):
            keys.update({f"latent_to_model.{index}.": f"modality_layers.{index}.embed_latent.",
                         f"model_to_latent.{index}.": f"modality_layers.{index}.to_output.",
                         f"pos_emb.{index}.": f"modality_layers.{index}.pos_mlp."})
        return keys

    @classmethod
    def upgraded_arguments(cls, arguments: Dict[str, Any]) -> Dict[str, Any]:
        """Arguments of earlier versions: ``time_sampling`` / ``ode_method`` / ``ode_kwargs`` became the
        ``objective``, ``flat_positions`` ``positions`` and ``text_loss_on_modality_rows`` ``text_loss``."""
        arguments = dict(arguments)
        flow = {name: arguments.pop(name) for name in ("time_sampling", "ode_method", "ode_kwargs") if name in arguments}
        if flow and arguments.get("objective") is None:
            arguments["objective"] = RectifiedFlow(**flow)
        if "flat_positions" in arguments:
            arguments["positions"] = Positions.FLAT if arguments.pop("flat_positions") else Positions.GRID
        if "text_loss_on_modality_rows" in arguments:
            on_all = arguments.pop("text_loss_on_modality_rows")
            arguments["text_loss"] = TextLoss.ALL_ROWS if on_all else TextLoss.ROWS_WITHOUT_MODALITY
        return arguments

    def _build_transformer(self, transformer, attn_backend: str) -> Transformer:
        block_conditioned = self.time_injection.block_conditioned
        if isinstance(transformer, Transformer):
            check(not block_conditioned or transformer.dim_cond == transformer.dim,
                  "a Transformer instance given to Transfusion needs `dim_cond=dim` (timestep adaLN)")
            axes = transformer.rotary.axes if transformer.rotary is not None else 0
            check(axes == self.rotary_axes,
                  f"`transformer`: the modalities' ranks {[nominal_rank(m) for m in self.modalities]} need a "
                  f"Transformer with `rotary_axes={self.rotary_axes}`, got one with rotary_axes={axes}")
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

    def to_items(self, sample, *, name: str = "sample", modality_type: int = 0,
                 names: Optional[Sequence[str]] = None) -> List[Union[Tensor, Modality]]:
        """Validate one ragged sample and turn its modalities into channel-last latent tokens; a bare
        float tensor is a modality of type ``modality_type``. ``names``: each item's name in errors
        (default ``name[i]``)."""
        check(isinstance(sample, (list, tuple)), f"`{name}` must be a list of text tensors and modalities, got {describe(sample)}")
        check(len(sample) > 0, f"`{name}` is empty: give at least one text tensor or modality")
        items = []
        for index, item in enumerate(sample):
            where = names[index] if names is not None else f"{name}[{index}]"
            if isinstance(item, tuple):
                check(len(item) == 2, f"`{where}` must be a (modality_type, tensor) tuple, got {describe(item)}")
                items.append(self.to_modality(item[1], item[0], name=where))
            elif isinstance(item, Tensor) and item.is_floating_point():
                items.append(self.to_modality(item, modality_type, name=where))
            else:
                items.append(self.check_text(item, name=where))
        if self.max_prompt_length is not None:
            for index, (item, following) in enumerate(zip(items, items[1:])):
                if isinstance(item, Tensor) and isinstance(following, Modality):
                    self.check_prompt(item, name=names[index] if names is not None else f"{name}[{index}]")
        return items

    def check_prompt(self, ids: Tensor, *, name: str) -> None:
        """Text right before a modality holds at most ``max_prompt_length`` tokens."""
        check(self.max_prompt_length is None or ids.numel() <= self.max_prompt_length,
              f"`{name}`: a prompt has at most `max_prompt_length` = {self.max_prompt_length} tokens, "
              f"got {ids.numel()}")

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
        latent = spec.to_latent_grid(tensor.to(self.device), name=name)
        shape = tuple(latent.shape[:-1])
        # a rank-free modality takes any grid (more dimensions than rotary axes are merged, packing.placed_shape);
        # a bare channel vector for one that has neither a rank nor a default shape is most likely float text
        check(nominal_rank(spec) is not None or len(shape) > 0 or self.placement.flat,
              f"`{name}`: modality {modality} got a latent grid of shape {shape}, but its rank is unknown: build "
              f"the model with `modality_num_dim` or `modality_default_shape` for it"
              + (" (text must be a long tensor)" if tensor.ndim == 1 else ""))
        check(all(size > 0 for size in shape), f"`{name}`: modality {modality} got an empty latent grid {shape}")
        # latents are float32 targets whatever the input precision (float64 would not mix with the losses)
        return Modality(modality, latent.reshape(-1, spec.dim_latent).float(), shape)

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
                prob_uncond: Optional[float] = None, num_modalities_to_times_fn: Optional[TimesFn] = None,
                velocity_consistency_ema_model: Optional[nn.Module] = None,
                velocity_consistency_delta_time: float = 1e-3, return_only_pred_flows: bool = False,
                return_embed: bool = False, return_hiddens: bool = False, return_times: bool = False):
        """Loss of a batch (see the README for the input forms).

        ``modality_type``: the type of every bare float tensor: of a ``Float[b, ...]`` batch (needed with
        several modalities), or of the untagged float tensors of a list batch (default 0; a
        ``(modality_type, tensor)`` tuple keeps its own type).

        ``times`` / ``noise``: per sample, one time in [0, 1] / one noise tensor (shaped like the latent,
        channel-last tokens ``[n, dim_latent]``) per NOISED modality of that sample, in order; drawn at
        random when not given. ``times`` may also be transfusion-pytorch's padded ``Float[b, m]`` tensor, or
        come from ``num_modalities_to_times_fn`` (``Long[b]`` modalities per sample -> ``Float[b, m]``, e.g.
        :func:`~mmgen_pytorch.transfusion.random_modality_length_to_time_fn`).

        ``velocity_consistency_ema_model``: a Transfusion (or an ``ema_pytorch.EMA`` of one) whose velocity
        at ``t + velocity_consistency_delta_time`` on the same noise path is the target of ours at ``t``
        (times are first scaled by ``1 - delta`` so the later time stays <= 1); the loss, weighted by
        ``velocity_consistency_loss_weight``, is ``LossBreakdown.velocity``.

        Returns the loss, or ``(loss, LossBreakdown)`` with ``return_breakdown``. ``return_loss=False``: the
        text logits and the per-modality network outputs of the packed batch. ``return_embed``: the final
        hidden states ``[b, n, dim]`` and ``{modality: [one function per noised instance]}``, each mapping
        hidden states to that instance's predicted flow. ``return_only_pred_flows``: per modality type, a
        list of each noised instance's predicted flow in the user's latent layout (in batch order).
        ``return_hiddens`` / ``return_times`` append the backbone's hidden states (its input, every block's
        output, the normed output) / each sample's modality times ``Float[b, m]`` (padded with 0) to the
        result, which becomes a tuple.

        A batch without any modality of some type (text-only pretraining steps) leaves that type's
        layers without a gradient: under DistributedDataParallel use ``find_unused_parameters=True``.
        """
        teacher = self._velocity_teacher(velocity_consistency_ema_model, velocity_consistency_delta_time)
        check(times is None or num_modalities_to_times_fn is None,
              "give `times` or `num_modalities_to_times_fn`, not both")
        samples, text_only = self.normalize_batch(x, modality_type)
        packed = self._pack(samples, text_only, prob_uncond)
        if num_modalities_to_times_fn is not None:
            times = times_from_fn(packed, num_modalities_to_times_fn)
        time_scale = 1.0 - velocity_consistency_delta_time if teacher is not None else 1.0
        groups, token_times = noise_groups(packed, self.objective, [m.dim_latent for m in self.modalities],
                                           times=times, noise=noise, time_scale=time_scale)
        hidden = self.run_backbone(packed.token_ids, packed.positions, packed.layout,
                                   [g.backbone_input() for g in groups], token_times, return_hiddens=return_hiddens)
        hidden, hiddens = hidden if return_hiddens else (hidden, None)
        extras = ((hiddens,) if return_hiddens else ()) + ((per_sample_times(packed, token_times),)
                                                          if return_times else ())
        with_extras = lambda result: (result, *extras) if extras else result  # noqa: E731
        if return_embed:
            return with_extras((hidden, self._flow_functions(packed, groups)))
        if return_only_pred_flows:
            return self._predicted_flows(packed, groups, hidden)
        text_logits = self.to_text_logits(hidden)
        if text_only:
            text_logits = text_logits[..., :self.vocab.num_text_tokens]
        outputs = [self.modality_output(hidden, g.modality, g.flat_index, g.times, coords=g.coords) for g in groups]
        if not return_loss:
            return with_extras((text_logits, outputs))
        later = (self._teacher_velocities(teacher, packed, groups, velocity_consistency_delta_time)
                 if teacher is not None else None)
        breakdown = self._losses(packed, text_logits, outputs, groups, later)
        if not (return_breakdown or extras):
            return breakdown.total
        return (breakdown.total, *((breakdown,) if return_breakdown else ()), *extras)

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

    def _losses(self, packed: PackedBatch, text_logits: Tensor, outputs: List[Tensor], groups: List[NoisedGroup],
                teacher_velocities: Optional[List[Tensor]] = None) -> LossBreakdown:
        batch = packed.shape[0]
        token_ce = F.cross_entropy(text_logits.transpose(1, 2).float(), packed.labels,
                                   ignore_index=self.ignore_index, reduction="none")
        labelled = packed.labels != self.ignore_index
        if self.text_loss is TextLoss.ROWS_WITHOUT_MODALITY:
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
        total = self.text_loss_weight * text + self.flow_loss_weight * self._per_type_sum(flow)
        velocity = recon = None
        if teacher_velocities is not None:
            velocity = self._velocity_losses(groups, outputs, teacher_velocities)
            total = total + self.velocity_consistency_loss_weight * self._per_type_sum(velocity)
        if self.reconstruction_loss_weight > 0:
            recon = self._reconstruction_losses(packed, groups, outputs)
            total = total + self.reconstruction_loss_weight * self._per_type_sum(recon)
        return LossBreakdown(total, text, tuple(flow), text_per_sample, flow_per_sample, velocity, recon)

    def _per_type_sum(self, per_type: Sequence[Tensor]) -> Tensor:
        """Per-modality-type losses summed with ``modality_loss_weights``."""
        return sum(w * loss for w, loss in zip(self.modality_loss_weights, per_type))

    def _zeros_per_type(self) -> List[Tensor]:
        return [torch.zeros((), device=self.device) for _ in range(self.num_modalities)]

    # transfusion-pytorch's extra losses and returns

    def _velocity_teacher(self, model: Optional[nn.Module], delta: float) -> Optional["Transfusion"]:
        """The EMA model of ``forward(velocity_consistency_ema_model=...)``, checked before any work."""
        if model is None:
            return None
        name = "velocity_consistency_ema_model"
        model = model.ema_model if isinstance(getattr(model, "ema_model", None), nn.Module) else model
        check(isinstance(model, Transfusion), f"`{name}` must be a Transfusion or an ema_pytorch.EMA of one, "
                                              f"got {describe(model)}", error=TypeError)
        check(isinstance(self.objective, RectifiedFlow) and isinstance(model.objective, RectifiedFlow),
              f"`{name}`: velocity consistency needs rectified flow objectives, got "
              f"{type(self.objective).__name__} and {type(model.objective).__name__}")
        same = (model.vocab == self.vocab and model.placement == self.placement and model.dim == self.dim
                and [m.dim_latent for m in model.modalities] == [m.dim_latent for m in self.modalities])
        check(same, f"`{name}` must be a copy of this model's architecture (vocabulary, positions, width, "
                    f"modalities), e.g. an EMA of it")
        check(model.device == self.device, f"`{name}` is on {model.device}, the model on {self.device}")
        check(isinstance(delta, (int, float)) and 0.0 < delta < 1.0,
              f"`velocity_consistency_delta_time` must be a float in (0, 1), got {delta!r}")
        return model

    @staticmethod
    @torch.no_grad()
    def _teacher_velocities(teacher: "Transfusion", packed: PackedBatch, groups: List[NoisedGroup],
                            delta: float) -> List[Tensor]:
        """The teacher's velocity at every latent token, ``delta`` later on the same noise paths, with the
        same packed sequences (the same dropped text)."""
        later = later_groups(groups, teacher.objective, delta)
        later_times = grid_times(packed, later, teacher.objective)
        with eval_mode(teacher):
            hidden = teacher.run_backbone(packed.token_ids, packed.positions, packed.layout,
                                          [g.backbone_input() for g in later], later_times)
            outputs = [teacher.modality_output(hidden, g.modality, g.flat_index, g.times, coords=g.coords)
                       for g in later]
            return [teacher.objective.velocity(out, g.noised, g.times) for out, g in zip(outputs, later)]

    def _velocity_losses(self, groups: List[NoisedGroup], outputs: List[Tensor],
                         teacher_velocities: List[Tensor]) -> Tuple[Tensor, ...]:
        """Per type: the mean squared error between our velocity and the teacher's later one."""
        losses = self._zeros_per_type()
        for group, output, target in zip(groups, outputs, teacher_velocities):
            keep = group.trained
            if keep.any():
                ours = self.objective.velocity(output[keep], group.noised[keep], group.times[keep])
                losses[group.modality] = F.mse_loss(ours, target[keep])
        return tuple(losses)

    def _reconstruction_losses(self, packed: PackedBatch, groups: List[NoisedGroup],
                               outputs: List[Tensor]) -> Tuple[Tensor, ...]:
        """Per type: the mean over noised instances of the squared error between the one-step clean estimate
        and the clean latent, both through the modality's decoder if it has one."""
        losses = self._zeros_per_type()
        for modality, instances in self._noised_instances(packed, groups).items():
            per_instance = []
            for group_index, mask, shape in instances:
                group = groups[group_index]
                estimate = self.objective.predicted_clean(outputs[group_index][mask], group.noised[mask],
                                                          group.times[mask])
                decode = partial(self._decode_for_loss, modality, shape=shape)
                with torch.no_grad():
                    target = decode(group.clean[mask])
                per_instance.append(F.mse_loss(decode(estimate), target))
            losses[modality] = torch.stack(per_instance).mean()
        return tuple(losses)

    def _decode_for_loss(self, modality: int, tokens: Tensor, *, shape: Shape) -> Tensor:
        """Latent tokens -> the user's layout through the modality's frozen decoder, differentiably."""
        spec = self.modalities[modality]
        latent = spec.from_tokens(tokens, shape, decode=False)
        decoder = getattr(spec, "decoder", None)
        return decoder.differentiable(latent) if decoder is not None else latent

    @staticmethod
    def _noised_instances(packed: PackedBatch,
                          groups: List[NoisedGroup]) -> Dict[int, List[Tuple[int, Tensor, Shape]]]:
        """Per modality type, its noised instances in batch order: (group index, token mask in the group,
        latent grid shape)."""
        instances: Dict[int, List[Tuple[int, Tensor, Shape]]] = {}
        order = sorted((inst.row, inst.ordinal, i) for i, inst in enumerate(packed.instances) if inst.noised)
        group_of = {g.modality: index for index, g in enumerate(groups)}
        for _, _, i in order:
            inst = packed.instances[i]
            index = group_of[inst.modality]
            mask = packed.groups[index].instance == i
            instances.setdefault(inst.modality, []).append((index, mask, inst.shape))
        return instances

    def _instance_flow(self, hidden: Tensor, group: NoisedGroup, mask: Tensor, shape: Shape) -> Tensor:
        """One noised instance's predicted flow from hidden states ``[b, n, dim]``, in the user's latent layout."""
        output = self.modality_output(hidden, group.modality, group.flat_index[mask], group.times[mask],
                                      coords=group.coords[mask])
        flow = self.objective.velocity(output, group.noised[mask], group.times[mask])
        return self.modalities[group.modality].from_tokens(flow, shape, decode=False)

    def _flow_functions(self, packed: PackedBatch, groups: List[NoisedGroup]) -> Dict[int, List[Callable]]:
        """``forward(return_embed=True)``: per type, one function (hidden states -> predicted flow) per instance."""
        return {modality: [partial(self._instance_flow, group=groups[index], mask=mask, shape=shape)
                           for index, mask, shape in instances]
                for modality, instances in self._noised_instances(packed, groups).items()}

    def _predicted_flows(self, packed: PackedBatch, groups: List[NoisedGroup], hidden: Tensor) -> List[List[Tensor]]:
        """``forward(return_only_pred_flows=True)``: per modality type, each noised instance's predicted flow."""
        functions = self._flow_functions(packed, groups)
        return [[flow(hidden) for flow in functions.get(modality, [])] for modality in range(self.num_modalities)]

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
        return self.uncond_text is UncondText.EMPTY

    def new_cache(self, batch_size: int, max_length: int, *, static: bool = False, compiled: bool = False) -> KVCache:
        """An empty KV cache for the backbone (see :meth:`~mmgen_pytorch.backbone.Transformer.new_cache`)."""
        return self.transformer.new_cache(batch_size, max_length, static=static, compiled=compiled)

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
        time_table = self.embed_times(times)
        x, time_kwargs = self.time_injection(x, time_table, time_index, latents)
        out = self.transformer(x, layout=layout, positions=positions, **time_kwargs, **backbone_kwargs)
        if not backbone_kwargs.get("return_hiddens"):
            return out
        out, hiddens = out  # as transfusion-pytorch: the backbone's input, every block's output, the normed output
        return out, [x, *hiddens, out]

    def embed_latents(self, modality: int, values: Tensor, coords: Tensor) -> Tensor:
        """``[k, dim_latent]`` latent tokens (and their coordinates in the modality) -> ``[k, dim]``."""
        return self.modality_layers[modality].embed(values, coords)

    def embed_times(self, times: Tensor) -> Tensor:
        """``[t]`` times -> their embeddings ``[t, dim]``."""
        return self.time_emb(self.objective.time_embedding_input(times))

    def modality_output(self, hidden: Tensor, modality: int, flat_index: Tensor, times: Tensor,
                        coords: Optional[Tensor] = None) -> Tensor:
        """The objective's prediction (``[k, output_dim]``, float32) at latent tokens ``flat_index`` whose
        times are ``times [k]`` (used only by modality layers that are ``time_conditioned``) and whose
        coordinates in their modality are ``coords [k, axes]`` (needed by trainable decoders)."""
        layers = self.modality_layers[modality]
        tokens = hidden.reshape(-1, self.dim)[flat_index]
        if not layers.time_conditioned:
            return layers.output(tokens, None, None, coords).float()
        distinct, rows = torch.unique(times, return_inverse=True)
        return layers.output(tokens, self.embed_times(distinct), rows, coords).float()

    def emitted_shape(self, modality: int, ids: Sequence[int]) -> Optional[Shape]:
        """The shape the ``[meta]`` text ``ids`` spells for ``modality`` (through its
        ``to_modality_shape_fn``), or None (then the default shape) when it is no valid shape. A shape of
        the wrong rank raises unless ``fallback_to_default_shape_if_invalid``; every fallback warns."""
        text = "".join(chr(i - self.vocab.first_char) if self.vocab.first_char <= i < self.vocab.size else "\ufffd"
                       for i in ids)
        function, rank = self.to_modality_shape_fn[modality], self.modalities[modality].rank
        try:
            shape = tuple(function(text)) if function is not None else self.vocab.parse_shape(ids)
        except (ValueError, TypeError):
            shape = None
        valid_sizes = shape is not None and all(isinstance(s, int) and s > 0 for s in shape)
        if valid_sizes and (rank is None or len(shape) == rank):
            return shape
        check(not valid_sizes or self.fallback_to_default_shape_if_invalid,
              f"modality {modality}: the sampled shape {shape} has {len(shape or ())} dimensions, the modality "
              f"{rank}; build the model with `fallback_to_default_shape_if_invalid=True` to use its default shape "
              f"{self.modalities[modality].default_shape}, or pass `fixed_modality_shape`")
        warnings.warn(f"modality {modality}: the sampled shape text {text!r} is no valid shape; using the "
                      f"default shape {self.modalities[modality].default_shape}", stacklevel=2)
        return None

    def shape_for(self, modality: int, emitted: Optional[Shape], fixed: Optional[Shape]) -> Shape:
        """Fixed shape if forced, else the emitted one, else the default (error if none)."""
        if fixed is not None:
            return self.check_shape(modality, fixed, name="fixed_modality_shape")
        shape = emitted if emitted is not None else self.modalities[modality].default_shape
        check(shape is not None, f"modality {modality} has no valid shape: pass `fixed_modality_shape` "
                                 f"or build the model with `modality_default_shape`")
        return tuple(shape)

    def check_shape(self, modality: int, shape, *, name: str) -> Shape:
        """A latent grid shape given for ``modality``, checked by its record."""
        return self.modalities[modality].check_shape(shape, name=name)

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
               return_unprocessed_modalities: bool = False, use_cache: Optional[bool] = None,
               cache_kv: Optional[bool] = None, init_modality_noise: Optional[Tensor] = None,
               max_length_counts: Union[str, LengthBudget] = LengthBudget.TOTAL, keep_structure_tokens: bool = False,
               progress: bool = True, generator: GeneratorLike = None, objective_kwargs: Optional[dict] = None,
               compile: bool = False):
        """Generate interleaved text and modalities.

        ``prompt``: None, one prompt, or a list of prompts (batched). A prompt is a text tensor (0-dim,
        ``[n]`` or ``[1, n]``), a modality (float tensor or ``(modality_type, tensor)``), or a list of
        those, whose text may spell structure tokens as transfusion-pytorch's do (see
        :class:`~mmgen_pytorch.transfusion.sampler.PromptParser`). Returns one sample (a list of text
        tensors and ``(modality_type, tensor)``), or a list of samples for a list of prompts or a
        ``batch_size`` (which must then equal the number of prompts; an empty list is refused).

        ``max_length_counts``: ``"total"`` (default, like Hugging Face's ``max_length``: prompt + output; a
        prompt that already fills it warns and gets nothing more) or ``"generated"`` (transfusion-pytorch:
        a budget of tokens after the prompt; a modality the model starts is always finished). Under both, a
        modality the prompt or ``force_modality_at_start`` asks for is always generated, even past the cap. ``keep_structure_tokens``: False (default) returns the prompt as given plus the
        generated text ids and modalities (what the model wrote after its last item is returned even when it
        held structure ids only, as an empty tensor, so the items line up with transfusion-pytorch's); True returns transfusion-pytorch's form: the whole sequence,
        ``[sos]``, ``[meta]`` shape, ``[som]``, ``[eom]`` (and ``[eos]``) ids kept, adjacent text joined.
        ``force_modality_at_start`` (``m`` or ``(m, shape)``) starts every sample with that modality; it
        wins over a modality start that ends a prompt (whose ids stay in the sequence, as upstream).
        ``use_cache`` (alias ``cache_kv``; default True) only changes speed. ``init_modality_noise``
        ``[n, d]``: its top-left ``[tokens, dim_latent]`` corner starts every generated modality instead of
        drawn noise. ``objective_kwargs`` go to the objective's ``generate`` (Gaussian diffusion:
        ``temperature``, ``sampler``, ``eta``, ``clip_denoised``; rectified flow: none). ``generator``: a
        ``torch.Generator`` or an int seed. ``compile=True`` runs every text step and every denoising step
        after the prompt's prefill as a compiled decode step (gpt-fast style: a fixed-shape KV cache,
        ``torch.compile`` with CUDA graphs on CUDA, the default mode on CPU; see
        :class:`~mmgen_pytorch.backbone.Decoder`): the same samples, faster once compiled. The first call
        compiles one graph for text steps and one per modality shape; later calls reuse them. It needs the
        cache (``use_cache=False`` with it is an error). Every option is checked before any prompt is
        encoded or run.
        """
        check(batch_size is None or (isinstance(batch_size, int) and batch_size >= 1),
              f"`batch_size` must be an int >= 1, got {batch_size!r}")
        check(not (isinstance(prompt, list) and len(prompt) == 0),
              "`prompt` is an empty list: pass `prompt=None` for one unconditional sample, `batch_size=n` for n of "
              "them, or a list of prompts")
        batched = isinstance(prompt, list) and all(isinstance(p, list) or p is None for p in prompt)
        check(not batched or batch_size in (None, len(prompt)),
              f"`batch_size` ({batch_size}) disagrees with the {len(prompt) if batched else 0} prompts in `prompt`: "
              f"a list of prompts gives one sample each; `batch_size` repeats a single prompt")
        prompts = prompt if batched else [prompt] * default(batch_size, 1)
        samples = self._sample_prompts(
            prompts, names=[f"prompt[{i}]" for i in range(len(prompts))], max_length=max_length,
            text_temperature=text_temperature, text_min_p=text_min_p, text_top_k=text_top_k, text_top_p=text_top_p,
            cfg_scale=cfg_scale, modality_steps=modality_steps, fixed_modality_shape=fixed_modality_shape,
            force_modality_at_start=force_modality_at_start, max_modalities=max_modalities,
            return_unprocessed_modalities=return_unprocessed_modalities, use_cache=use_cache, cache_kv=cache_kv,
            init_modality_noise=init_modality_noise, max_length_counts=max_length_counts,
            keep_structure_tokens=keep_structure_tokens, progress=progress, generator=generator,
            objective_kwargs=objective_kwargs, compile=compile)
        return samples if batched or batch_size is not None else samples[0]

    @torch.no_grad()
    def sample_one(self, prompt=None, *, max_length_counts: Union[str, LengthBudget] = LengthBudget.GENERATED,
                   keep_structure_tokens: bool = True, **options) -> List:
        """transfusion-pytorch's ``sample_one``: one sample for one prompt (any form :meth:`sample` takes
        for one prompt; a list is always one prompt). Defaults are transfusion-pytorch's:
        ``max_length`` is a budget after the prompt and the whole sequence is returned with its
        structure tokens. ``options``: :meth:`sample`'s keywords (not ``batch_size``)."""
        return self._sample_prompts([prompt], names=["prompt"], max_length_counts=max_length_counts,
                                    keep_structure_tokens=keep_structure_tokens, **options)[0]

    @torch.no_grad()
    def sample_many(self, prompts=None, *, max_length_counts: Union[str, LengthBudget] = LengthBudget.GENERATED,
                    keep_structure_tokens: bool = True, **options) -> List[List]:
        """transfusion-pytorch's ``sample_many``: one sample per element of ``prompts`` (None: one
        unconditional sample; a tensor or a tuple: one prompt), all decoded together; the same samples as
        :meth:`sample_one` per prompt. Defaults and ``options`` as :meth:`sample_one`'s."""
        prompts = [None] if prompts is None else prompts if isinstance(prompts, list) else [prompts]
        check(len(prompts) > 0, "`prompts` is an empty list: pass `prompts=None` for one unconditional sample")
        return self._sample_prompts(prompts, names=[f"prompts[{i}]" for i in range(len(prompts))],
                                    max_length_counts=max_length_counts, keep_structure_tokens=keep_structure_tokens,
                                    **options)

    def _sample_prompts(self, prompts: Sequence, *, names: Sequence[str], max_length: int = 2048,
                        force_modality_at_start=None,
                        max_modalities: Optional[int] = None, use_cache: Optional[bool] = None,
                        cache_kv: Optional[bool] = None, **sampler_options) -> List[List]:
        """One sample per prompt through one :class:`Sampler`; every check before any compute."""
        check(max_modalities is None or max_modalities >= 0, f"`max_modalities` must be >= 0, got {max_modalities}")
        sampler = Sampler(self, max_length=max_length, max_modalities=max_modalities,
                          use_cache=pick_alias("use_cache", use_cache, "cache_kv", cache_kv, True), **sampler_options)
        forced = forced_tokens(self, force_modality_at_start)
        parsed = [PromptParser(self, name=name, fixed_shape=sampler.fixed_shape)(p) for p, name in zip(prompts, names)]
        items = [self._prompt_items(p, name=name) for p, name in zip(parsed, names)]
        with eval_mode(self):  # inputs are validated above, so a bad call leaves the mode untouched
            generated = sampler(items, [p.start + forced for p in parsed], names=names)
        if not sampler.keep_structure:
            return [[part for part in prompt_as_list(raw) if part is not None] + new
                    for raw, new in zip(prompts, generated)]
        return [merge_text(self._prompt_with_structure(p, i, start=p.start + forced) + new)
                for p, i, new in zip(parsed, items, generated)]

    def _prompt_items(self, parsed: ParsedPrompt, *, name: str) -> List:
        """A parsed prompt's parts as validated items; a spelled shape must be the modality's."""
        items = self.to_items(parsed.parts, name=name, names=parsed.wheres) if parsed.parts else []
        for index, shape in parsed.spelled.items():
            check(items[index].shape == shape, f"`{parsed.wheres[index]}`: the [meta] header before it spells shape "
                                               f"{shape}, but the modality's latent grid is {items[index].shape}")
        return items

    def _prompt_with_structure(self, parsed: ParsedPrompt, items: List, *, start: List[int]) -> List:
        """The prompt as the sequence holds it (``[sos]`` and structure ids included), with the user's
        modality tensors as given."""
        originals = [(item.modality, part[1] if isinstance(part, tuple) else part)
                     for part, item in zip(parsed.parts, items) if isinstance(item, Modality)]
        sequence = self.prompt_sequence(items, drop_text=False, sos=True)
        parts = [s.token_ids if s.modality is None else originals[s.ordinal] for s in sequence.segments]
        return parts + [torch.tensor(start, dtype=torch.long)]

    @torch.no_grad()
    def generate_text_only(self, prompt: Tensor, seq_len: int, *, temperature: float = 1.0, min_p: float = 0.1,
                           top_k: int = 0, top_p: float = 1.0, use_cache: Optional[bool] = None,
                           cache_kv: Optional[bool] = None, progress: bool = True,
                           generator: GeneratorLike = None) -> Tensor:
        """Text-only continuation of ``prompt`` (Int[b, n]) up to ``seq_len`` tokens; returns the new tokens.
        ``use_cache`` (alias ``cache_kv``; default True) only changes speed."""
        check(isinstance(prompt, Tensor) and prompt.ndim == 2 and not prompt.is_floating_point()
              and prompt.shape[0] > 0,
              f"`prompt` must be Int[batch, seq] with batch >= 1, got {describe(prompt)}")
        check(seq_len > prompt.shape[1], f"`seq_len` ({seq_len}) must exceed the prompt length ({prompt.shape[1]})")
        rows = [[self.check_text(p, name=f"prompt[{i}]")] for i, p in enumerate(prompt)]
        sampler = Sampler(self, max_length=seq_len, text_temperature=temperature, text_min_p=min_p, text_top_k=top_k,
                          text_top_p=top_p, use_cache=pick_alias("use_cache", use_cache, "cache_kv", cache_kv, True),
                          progress=progress, generator=generator, text_only=True)
        with eval_mode(self):
            out = sampler(rows, [[]] * len(rows))
        return torch.stack([sample[-1] for sample in out]).to(prompt.device)

    @torch.no_grad()
    def generate_modality_only(self, batch_size: int = 1, *, modality_type: Optional[int] = None,
                               fixed_modality_shape: Optional[Shape] = None, modality_steps: int = 16,
                               return_unprocessed_modalities: bool = False, progress: bool = True,
                               generator: GeneratorLike = None,
                               init_modality_noise: Optional[Tensor] = None) -> Tensor:
        """Unconditional modalities ``[batch_size, ...]`` (no text, no guidance)."""
        check(isinstance(batch_size, int) and batch_size >= 1, f"`batch_size` must be an int >= 1, got {batch_size!r}")
        modality = self.check_modality_type(modality_type)
        if fixed_modality_shape is not None:
            shape = self.check_shape(modality, fixed_modality_shape, name="fixed_modality_shape")
        else:
            shape = self.check_shape(modality, self.shape_for(modality, None, None), name="modality_default_shape")
        samples = self._sample_prompts(
            [None] * batch_size, names=["prompt"] * batch_size, max_length=1, max_length_counts=LengthBudget.GENERATED,
            cfg_scale=1.0, modality_steps=modality_steps, force_modality_at_start=(modality, shape), max_modalities=1,
            return_unprocessed_modalities=return_unprocessed_modalities, progress=progress, generator=generator,
            init_modality_noise=init_modality_noise)
        return torch.stack([next(item[1] for item in sample if isinstance(item, tuple)) for sample in samples])

    def decode_modality(self, modality: int, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor:
        """Channel-last tokens -> the user's layout (channel-first if configured), through the decoder
        unless ``decode=False``."""
        return self.modalities[modality].from_tokens(tokens, shape, decode=decode)

    # transfusion-pytorch's token ids and modality records

    @property
    def sos_id(self) -> int:
        return self.vocab.sos

    @property
    def eos_id(self) -> int:
        return self.vocab.eos

    @property
    def null_text_id(self) -> int:
        return self.vocab.null_text

    @property
    def som_ids(self) -> List[int]:
        """The ``[som]`` id of each modality type."""
        return [self.vocab.som(m) for m in range(self.num_modalities)]

    @property
    def eom_ids(self) -> List[int]:
        """The ``[eom]`` id of each modality type."""
        return [self.vocab.eom(m) for m in range(self.num_modalities)]

    @property
    def meta_id(self) -> int:
        """The ``[meta]`` id that opens a modality's shape header."""
        return self.vocab.meta

    def char_tokenizer(self, text: str, device=None) -> Tensor:
        """``text`` (ASCII, e.g. a shape ``"3,3"``) as the character ids a ``[meta]`` header holds."""
        check(isinstance(text, str) and text.isascii(), f"`text` must be an ASCII string, got {describe(text)}")
        return torch.tensor(self.vocab.char_ids(text), dtype=torch.long, device=device)

    def get_modality_info(self, modality_type: Optional[int] = None) -> "ModalityInfo":
        """transfusion-pytorch's record of one modality type (None: type 0, with one modality only)."""
        modality = self.check_modality_type(modality_type)
        spec, layers = self.modalities[modality], self.modality_layers[modality]
        return ModalityInfo(
            encoder=_unwrapped(getattr(spec, "encoder", None)), decoder=_unwrapped(getattr(spec, "decoder", None)),
            latent_to_model=getattr(layers, "embed_latent", layers), model_to_latent=getattr(layers, "to_output", layers),
            add_pos_emb=getattr(layers, "pos_mlp", None) is not None, pos_emb_mlp=getattr(layers, "pos_mlp", None),
            num_dim=nominal_rank(spec), dim_latent=spec.dim_latent, default_shape=spec.default_shape,
            som_id=self.vocab.som(modality), eom_id=self.vocab.eom(modality),
            to_shape_fn=self.to_modality_shape_fn[modality] or shape_from_text,
            channel_first_latent=getattr(spec, "channel_first", False), modality_type=modality)

    def get_all_modality_info(self) -> List["ModalityInfo"]:
        return [self.get_modality_info(m) for m in range(self.num_modalities)]


class ModalityInfo(NamedTuple):
    """One modality type as transfusion-pytorch describes it (:meth:`Transfusion.get_modality_info`)."""

    encoder: Optional[nn.Module]
    decoder: Optional[nn.Module]
    latent_to_model: nn.Module
    model_to_latent: nn.Module
    add_pos_emb: bool
    pos_emb_mlp: Optional[nn.Module]
    num_dim: Optional[int]
    dim_latent: int
    default_shape: Optional[Shape]
    som_id: int
    eom_id: int
    to_shape_fn: Any
    channel_first_latent: bool
    modality_type: int


def _unwrapped(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The user's module inside a frozen wrapper."""
    return getattr(module, "module", module)


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
