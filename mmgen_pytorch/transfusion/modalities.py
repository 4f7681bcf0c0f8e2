"""One record per modality type: what Transfusion knows about it, and the conversions built on it.

Reading order: :class:`ModalitySpec` (fields, then ``to_latent`` / ``from_tokens``) ->
:func:`modality_specs` (transfusion-pytorch's per-argument lists -> one spec per modality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import check
from .packing import Shape


class FrozenWrapper(nn.Module):
    """Holds a frozen encoder/decoder without exposing its parameters to optimisers or state dicts."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = [module]  # a list keeps it out of .parameters() and .state_dict()
        module.requires_grad_(False).eval()

    @property
    def module(self) -> nn.Module:
        return self._module[0]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.module.to(x.device).eval()
        return self.module(x[None])[0]


@dataclass(frozen=True)
class ModalitySpec:
    """One modality type of a :class:`~mmgen_pytorch.Transfusion` model.

    dim_latent: channels of one latent token. channel_first: the user's tensors are ``[c, *grid]``
    (else ``[*grid, c]``). default_shape: the latent grid sampled when none is emitted or forced.
    rank: grid dimensions (None: any; inferred from ``default_shape``). encoder / decoder: frozen
    modules (one tensor in, one out; :class:`FrozenWrapper`) applied to a user's tensor before it is
    tokenised and to a sampled latent. add_pos_emb: a learned MLP of each token's grid coordinates
    is added to its embedding.
    """

    dim_latent: int
    channel_first: bool = False
    default_shape: Optional[Shape] = None
    rank: Optional[int] = None
    encoder: Optional[FrozenWrapper] = None
    decoder: Optional[FrozenWrapper] = None
    add_pos_emb: bool = False

    def to_latent(self, tensor: Tensor) -> Tensor:
        """A user's tensor -> its channel-last latent grid ``[*grid, c]`` (through the encoder)."""
        if self.encoder is not None:
            tensor = self.encoder(tensor)
        return tensor.movedim(0, -1) if self.channel_first else tensor

    def from_tokens(self, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor:
        """Channel-last tokens ``[n, c]`` -> the user's layout (channel-first if configured), through the
        decoder unless ``decode=False``."""
        latent = tokens.reshape(*shape, self.dim_latent)
        latent = latent.movedim(-1, 0) if self.channel_first else latent
        return self.decoder(latent) if decode and self.decoder is not None else latent


def modality_specs(*, dim_latent, channel_first_latent=False, modality_default_shape=None, modality_num_dim=None,
                   modality_encoder=None, modality_decoder=None, add_pos_emb=False) -> Tuple[ModalitySpec, ...]:
    """transfusion-pytorch's constructor arguments (each one value for every modality, or a list with one
    per modality; ``dim_latent`` decides how many) -> one :class:`ModalitySpec` per modality."""
    dims = tuple(dim_latent) if isinstance(dim_latent, (list, tuple)) else (dim_latent,)
    count = len(dims)
    shapes = [None if s is None else tuple(s) for s in _per_modality(modality_default_shape, count,
                                                                     "modality_default_shape")]
    ranks = (_per_modality(modality_num_dim, count, "modality_num_dim") if modality_num_dim is not None
             else [None] * count)
    return tuple(
        ModalitySpec(dim_latent=dim, channel_first=first, default_shape=shape,
                     rank=rank if rank is not None else (len(shape) if shape is not None else None),
                     encoder=FrozenWrapper(encoder) if encoder is not None else None,
                     decoder=FrozenWrapper(decoder) if decoder is not None else None, add_pos_emb=pos)
        for dim, first, shape, rank, encoder, decoder, pos in zip(
            dims, _per_modality(channel_first_latent, count, "channel_first_latent"), shapes, ranks,
            _per_modality(modality_encoder, count, "modality_encoder"),
            _per_modality(modality_decoder, count, "modality_decoder"),
            _per_modality(add_pos_emb, count, "add_pos_emb")))


def _per_modality(value, count: int, name: str) -> Sequence:
    """One value for every modality, or a list with one per modality (a default shape is itself a tuple
    of ints, so only a list of shapes is per modality)."""
    per_modality = isinstance(value, (list, tuple)) and not (
        name == "modality_default_shape" and value and isinstance(value[0], int))
    values = tuple(value) if per_modality else (value,) * count
    check(len(values) == count, f"`{name}` needs one entry per modality ({count}), got {len(values)}")
    return values
