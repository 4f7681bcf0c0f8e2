"""One record per modality type: its format (what a user's tensor looks like, how it becomes latent
tokens and back) and the layers between its tokens and the backbone, which the record builds.

A modality record is a frozen dataclass implementing :class:`ModalityFormat`; :class:`Transfusion`
takes a sequence of them (``modalities=``) or builds :class:`ModalitySpec` s from transfusion-pytorch's
per-argument lists. Two kinds ship: :class:`ModalitySpec` (channel-last or channel-first latents of any
rank, a linear layer in and out, an optional learned position MLP: Transfusion) and
:class:`~mmgen_pytorch.transfusion.patches.PatchedLatents` (``[C, H, W]`` latents cut into patches, a
fixed 2-D sin-cos embedding and DiT's final layer: MonoFormer).

Reading order: :class:`ModalityFormat` and :class:`ModalityLayers` (the interfaces) -> :class:`ModalitySpec`
and its :class:`LinearLayers` -> :func:`modality_specs` (transfusion-pytorch's per-argument lists -> one
spec per modality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import check, describe
from .packing import Shape


class ModalityLayers(nn.Module):
    """The trainable layers of one modality: ``embed`` its latent tokens into the backbone's width and
    read the objective's ``output`` back. ``time_conditioned``: ``output`` takes the embedded times."""

    time_conditioned: bool = False

    def embed(self, values: Tensor, coords: Tensor) -> Tensor:
        """``[k, dim_latent]`` latent tokens and their coordinates in the modality ``[k, axes]`` -> ``[k, dim]``."""
        raise NotImplementedError

    def output(self, hidden: Tensor, time_table: Optional[Tensor], rows: Optional[Tensor],
               coords: Optional[Tensor] = None) -> Tensor:
        """``[k, dim]`` hidden states of latent tokens -> the objective's prediction ``[k, output_dim]``;
        ``time_table [t, dim]`` and each token's row in it ``rows [k]`` when ``time_conditioned``;
        ``coords [k, axes]`` the tokens' coordinates in their modality (as ``embed`` got them)."""
        raise NotImplementedError


class ModalityFormat(Protocol):
    """What :class:`~mmgen_pytorch.Transfusion` asks of a modality record."""

    dim_latent: int                 # channels of one latent token
    default_shape: Optional[Shape]  # the latent grid sampled when none is emitted or forced
    rank: Optional[int]             # grid dimensions every input must have (None: any)

    def to_latent_grid(self, tensor: Tensor, *, name: str) -> Tensor:
        """A user's float tensor -> its channel-last latent grid ``[*grid, dim_latent]``; a tensor of the
        wrong form raises ValueError naming ``name``."""

    def from_tokens(self, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor:
        """Channel-last tokens ``[n, dim_latent]`` of grid ``shape`` -> the user's layout (decoded unless
        ``decode=False``)."""

    def check_shape(self, shape, *, name: str) -> Shape:
        """A grid shape the user asked for, checked (ValueError naming ``name``)."""

    def build_layers(self, *, dim: int, output_dim: int, axes: int) -> ModalityLayers:
        """The modality's layers for a backbone of width ``dim`` whose positions have ``axes`` axes."""


class FrozenWrapper(nn.Module):
    """Holds a frozen encoder/decoder without exposing its parameters to optimisers or state dicts."""

    def __init__(self, module: nn.Module, *, batch_dim: bool = True):
        super().__init__()
        self._module = [module]  # a list keeps it out of .parameters() and .state_dict()
        self.batch_dim = batch_dim  # the module takes (and returns) a batch of one
        module.requires_grad_(False).eval()

    @property
    def module(self) -> nn.Module:
        return self._module[0]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.differentiable(x)

    def differentiable(self, x: Tensor) -> Tensor:
        """The module on one unbatched tensor with autograd on (its weights stay frozen): a loss through it."""
        self.module.to(x.device).eval()
        return self.module(x[None])[0] if self.batch_dim else self.module(x)


@dataclass(frozen=True)
class ModalitySpec:
    """A Transfusion modality: latent tokens of ``dim_latent`` channels on a grid of any rank.

    channel_first: the user's tensors are ``[c, *grid]`` (else ``[*grid, c]``). default_shape: the latent
    grid sampled when none is emitted or forced; it does not restrict inputs. rank: the grid dimensions
    every input, forced and emitted shape must have (None: any). encoder / decoder: frozen modules (one
    tensor in, one out; :class:`FrozenWrapper`) applied to a user's tensor before it is tokenised and to a
    sampled latent. add_pos_emb: a learned MLP of each token's grid coordinates is added to its embedding.
    Layers: :class:`LinearLayers`.
    """

    dim_latent: int
    channel_first: bool = False
    default_shape: Optional[Shape] = None
    rank: Optional[int] = None
    encoder: Optional[FrozenWrapper] = None
    decoder: Optional[FrozenWrapper] = None
    add_pos_emb: bool = False

    def to_latent_grid(self, tensor: Tensor, *, name: str) -> Tensor:
        if self.encoder is not None:
            tensor = self.encoder(tensor)
        latent = tensor.movedim(0, -1) if self.channel_first else tensor
        text_hint = " (text must be a long tensor)" if tensor.ndim == 1 else ""
        check(latent.ndim >= 1 and latent.shape[-1] == self.dim_latent,
              f"`{name}`: the modality expects latents with {self.dim_latent} channels "
              f"({'first' if self.channel_first else 'last'} axis), got shape {tuple(tensor.shape)}{text_hint}")
        check_grid_rank(tuple(latent.shape[:-1]), self.rank, name=name)
        return latent

    def from_tokens(self, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor:
        latent = tokens.reshape(*shape, self.dim_latent)
        latent = latent.movedim(-1, 0) if self.channel_first else latent
        return self.decoder(latent) if decode and self.decoder is not None else latent

    def check_shape(self, shape, *, name: str) -> Shape:
        valid = isinstance(shape, (tuple, list)) and all(isinstance(s, int) and s > 0 for s in shape)
        check(valid and (self.rank is None or len(shape) == self.rank),
              f"`{name}` must be a tuple of {self.rank if self.rank is not None else 'any number of'} positive "
              f"ints, got {shape!r}")
        return tuple(shape)

    def build_layers(self, *, dim: int, output_dim: int, axes: int) -> "LinearLayers":
        return LinearLayers(dim_latent=self.dim_latent, dim=dim, output_dim=output_dim,
                            position_axes=axes if self.add_pos_emb else None)


def nominal_rank(modality: ModalityFormat) -> Optional[int]:
    """The grid dimensions a modality is built for: its fixed ``rank``, else its default shape's (None:
    neither). The model's rotary axes cover every modality's nominal rank; a modality without a fixed rank
    still takes grids of any rank (:func:`~mmgen_pytorch.transfusion.packing.placed_shape`)."""
    if modality.rank is not None:
        return modality.rank
    return None if modality.default_shape is None else len(modality.default_shape)


def check_grid_rank(shape: Shape, rank: Optional[int], *, name: str) -> None:
    """A latent grid of ``shape`` given to a modality whose inputs must have ``rank`` dimensions (None: any)."""
    check(rank is None or len(shape) == rank,
          f"`{name}`: the modality has rank {rank}, got a latent grid of shape {tuple(shape)}")


class LinearLayers(ModalityLayers):
    """Transfusion's modality layers: a linear layer in (plus, with ``position_axes``, a learned MLP of the
    token's grid coordinates) and a linear layer out; the output ignores the time."""

    def __init__(self, *, dim_latent: int, dim: int, output_dim: int, position_axes: Optional[int] = None):
        super().__init__()
        self.embed_latent = nn.Linear(dim_latent, dim)
        self.to_output = nn.Linear(dim, output_dim)
        self.pos_mlp = (nn.Sequential(nn.Linear(position_axes, dim), nn.SiLU(), nn.Linear(dim, dim))
                        if position_axes is not None else None)

    def embed(self, values: Tensor, coords: Tensor) -> Tensor:
        embedded = self.embed_latent(values)
        if self.pos_mlp is not None:
            embedded = embedded + self.pos_mlp(coords.to(values.dtype))
        return embedded

    def output(self, hidden: Tensor, time_table: Optional[Tensor], rows: Optional[Tensor],
               coords: Optional[Tensor] = None) -> Tensor:
        return self.to_output(hidden)


def modality_specs(*, dim_latent, channel_first_latent=False, modality_default_shape=None, modality_num_dim=None,
                   modality_encoder=None, modality_decoder=None, add_pos_emb=False,
                   modality_encoder_decoder_requires_batch_dim=True,
                   pre_post_transformer_enc_dec=None) -> Tuple[ModalityFormat, ...]:
    """transfusion-pytorch's constructor arguments (each one value for every modality, or a list with one
    per modality; ``dim_latent`` decides how many) -> one :class:`ModalitySpec` per modality (wrapped in
    :class:`~mmgen_pytorch.transfusion.enc_dec.TrainableEncDec` where ``pre_post_transformer_enc_dec``
    gives it an (encoder, decoder) pair). As in transfusion-pytorch, a modality's rank is fixed only by
    ``modality_num_dim`` or, with ``add_pos_emb``, by its default shape; otherwise it takes grids of any rank."""
    from .enc_dec import TrainableEncDec
    dims = tuple(dim_latent) if isinstance(dim_latent, (list, tuple)) else (dim_latent,)
    count = len(dims)
    shapes = [None if s is None else tuple(s) for s in _per_modality(modality_default_shape, count,
                                                                     "modality_default_shape")]
    ranks = (_per_modality(modality_num_dim, count, "modality_num_dim") if modality_num_dim is not None
             else [None] * count)
    for index, (shape, rank) in enumerate(zip(shapes, ranks)):
        check(shape is None or rank is None or len(shape) == rank,
              f"`modality_default_shape` {shape} of modality {index} has {len(shape or ())} dimensions, but "
              f"`modality_num_dim` says {rank}")
    batch_dim = modality_encoder_decoder_requires_batch_dim
    frozen = [[FrozenWrapper(m, batch_dim=batch_dim) if m is not None else None
               for m in _per_modality(modules, count, name)]
              for modules, name in ((modality_encoder, "modality_encoder"), (modality_decoder, "modality_decoder"))]
    specs = tuple(
        ModalitySpec(dim_latent=dim, channel_first=first, default_shape=shape,
                     rank=rank if rank is not None or not pos or shape is None else len(shape),
                     encoder=encoder, decoder=decoder, add_pos_emb=pos)
        for dim, first, shape, rank, encoder, decoder, pos in zip(
            dims, _per_modality(channel_first_latent, count, "channel_first_latent"), shapes, ranks, *frozen,
            _per_modality(add_pos_emb, count, "add_pos_emb")))
    pairs = _enc_dec_pairs(pre_post_transformer_enc_dec, count)
    return tuple(spec if pair is None else TrainableEncDec(spec, encoder=pair[0], decoder=pair[1])
                 for spec, pair in zip(specs, pairs))


def _enc_dec_pairs(value, count: int) -> Sequence:
    """``pre_post_transformer_enc_dec``: None, one (encoder, decoder) pair for every modality, or one pair
    (or None) per modality."""
    name = "pre_post_transformer_enc_dec"
    is_pair = lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(m, nn.Module) for m in v)
    if value is None or is_pair(value):
        return (value,) * count
    check(isinstance(value, (list, tuple)) and all(v is None or is_pair(v) for v in value),
          f"`{name}` must be an (encoder, decoder) pair of modules or one pair (or None) per modality, "
          f"got {describe(value)}")
    check(len(value) == count, f"`{name}` needs one entry per modality ({count}), got {len(value)}")
    return tuple(value)


def check_modality_formats(modalities) -> Tuple[ModalityFormat, ...]:
    """``modalities=`` given to a model: a non-empty sequence of modality records."""
    methods = ("to_latent_grid", "from_tokens", "check_shape", "build_layers")
    check(isinstance(modalities, (list, tuple)) and len(modalities) > 0
          and all(all(hasattr(m, name) for name in methods) for m in modalities),
          f"`modalities` must be a non-empty list of modality records (ModalitySpec, PatchedLatents, or anything "
          f"with {', '.join(methods)}), got {describe(modalities)}")
    return tuple(modalities)


def _per_modality(value, count: int, name: str) -> Sequence:
    """One value for every modality, or a list with one per modality (a default shape is itself a tuple
    of ints, so only a list of shapes is per modality)."""
    one_shape = (name == "modality_default_shape" and isinstance(value, (list, tuple))
                 and all(isinstance(size, int) for size in value)
                 and (len(value) > 0 or isinstance(value, tuple)))  # (): one 0-dim modality
    per_modality = isinstance(value, (list, tuple)) and not one_shape
    values = tuple(value) if per_modality else (value,) * count
    check(len(values) == count, f"`{name}` needs one entry per modality ({count}), got {len(values)}")
    return values
