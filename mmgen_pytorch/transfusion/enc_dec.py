"""Trainable modules around the transformer (transfusion-pytorch's ``pre_post_transformer_enc_dec``):
an encoder from a modality's noised latent to the backbone's tokens and a decoder from the backbone's
hidden states to the objective's prediction, e.g. the Transfusion paper's U-Net down / up blocks.

They replace the modality's linear layers in and out and are trained with the model (unlike
``modality_encoder`` / ``modality_decoder``, which are frozen maps outside the flow). An encoder
that downsamples by ``f`` per grid axis turns a latent grid ``S`` into a token grid ``S / f``; this
record packs each ``f``-block of latent positions into one token of ``prod(f) * channels`` features,
so the packing, noising and losses of the model stay per token (a bijection of the latent's values:
the flow and its loss are unchanged) and the encoder / decoder see whole latents, one instance at a
time, in the record's channel layout with a batch dimension of one.

Reading order: the block helpers -> :class:`TrainableEncDec` (the record) -> :class:`EncDecLayers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._utils import check, describe
from .modalities import ModalityFormat, ModalityLayers, check_grid_rank, nominal_rank
from .packing import Shape


def to_blocks(latent: Tensor, factor: Shape) -> Tensor:
    """``[*S, c]`` -> ``[*(S / f), prod(f) * c]``: each ``f``-block of positions becomes one token,
    features ordered (block offsets row-major, then channels)."""
    rank = len(factor)
    grid = [size // f for size, f in zip(latent.shape[:rank], factor)]
    split = latent.reshape(*[d for pair in zip(grid, factor) for d in pair], latent.shape[-1])
    order = [*range(0, 2 * rank, 2), *range(1, 2 * rank, 2), 2 * rank]
    return split.permute(order).reshape(*grid, -1)


def from_blocks(tokens: Tensor, factor: Shape) -> Tensor:
    """The inverse of :func:`to_blocks`: ``[*s, prod(f) * c]`` -> ``[*(s * f), c]``."""
    rank = len(factor)
    grid = tokens.shape[:rank]
    split = tokens.reshape(*grid, *factor, -1)
    order = [axis for pair in zip(range(rank), range(rank, 2 * rank)) for axis in pair] + [2 * rank]
    return split.permute(order).reshape(*[s * f for s, f in zip(grid, factor)], -1)


@dataclass(frozen=True)
class TrainableEncDec:
    """A modality record (``inner``, e.g. a :class:`~mmgen_pytorch.transfusion.modalities.ModalitySpec`)
    whose latents go through a trainable ``encoder`` into the backbone and whose hidden states go
    through a trainable ``decoder`` out of it. The encoder takes ``[1, c, *S]`` (channel-first records)
    or ``[1, *S, c]`` and returns the backbone's width on a grid ``S / downsample`` in the same layout;
    the decoder maps that back to the objective's output channels on ``S``. ``downsample`` (one factor
    per grid axis) is found by running the encoder once on zeros of ``inner.default_shape`` when not
    given. Grid shapes at the model's level (``modality_default_shape`` aside, which is the latent grid
    ``S``) are token grids ``S / downsample``: ``fixed_modality_shape``, ``force_modality_at_start`` and
    the ``[meta]`` text; a sampled modality comes back as a latent of grid ``S``."""

    inner: ModalityFormat
    encoder: nn.Module
    decoder: nn.Module
    downsample: Optional[Shape] = None

    def __post_init__(self):
        check(isinstance(self.encoder, nn.Module) and isinstance(self.decoder, nn.Module),
              f"`pre_post_transformer_enc_dec` must be (encoder, decoder) modules, got "
              f"({describe(self.encoder)}, {describe(self.decoder)})")
        check(nominal_rank(self.inner) is not None, "a trainable encoder / decoder needs the modality's rank: "
                                                     "give `modality_num_dim` or `modality_default_shape`")
        factor = self.downsample if self.downsample is not None else self._probe_downsample()
        check(isinstance(factor, (list, tuple)) and len(factor) == self.rank
              and all(isinstance(f, int) and f > 0 for f in factor),
              f"`downsample` must be {self.rank} positive ints, got {factor!r}")
        object.__setattr__(self, "downsample", tuple(factor))

    def _probe_downsample(self) -> Shape:
        latent_shape = self.inner.default_shape
        check(latent_shape is not None, "a trainable encoder / decoder needs `modality_default_shape` (to find "
                                        "how much the encoder downsamples) or an explicit `downsample`")
        zeros = torch.zeros(1, *latent_shape, self.inner.dim_latent)
        was_training = self.encoder.training
        with torch.no_grad():
            out = self.encoder.eval()(zeros.movedim(-1, 1) if self.channel_first else zeros)
        self.encoder.train(was_training)
        grid = tuple(out.shape[2:] if self.channel_first else out.shape[1:-1])
        check(len(grid) == len(latent_shape) and all(g > 0 and s % g == 0 for s, g in zip(latent_shape, grid)),
              f"`pre_post_transformer_enc_dec`: the encoder maps a latent grid {tuple(latent_shape)} to {grid}; "
              f"each axis must shrink by a whole factor")
        return tuple(s // g for s, g in zip(latent_shape, grid))

    @property
    def channel_first(self) -> bool:
        return bool(getattr(self.inner, "channel_first", False))

    @property
    def dim_latent(self) -> int:
        return self.inner.dim_latent * math.prod(self.downsample)

    @property
    def rank(self) -> int:
        """Fixed: the encoder works on grids of one rank (the inner modality's nominal rank)."""
        return nominal_rank(self.inner)

    @property
    def default_shape(self) -> Optional[Shape]:
        shape = self.inner.default_shape
        return None if shape is None else self._token_grid(shape, name="modality_default_shape")

    def _token_grid(self, latent_shape: Shape, *, name: str) -> Shape:
        check(all(s % f == 0 for s, f in zip(latent_shape, self.downsample)),
              f"`{name}`: the latent grid {tuple(latent_shape)} must be divisible by the encoder's downsampling "
              f"{self.downsample}")
        return tuple(s // f for s, f in zip(latent_shape, self.downsample))

    def to_latent_grid(self, tensor: Tensor, *, name: str) -> Tensor:
        latent = self.inner.to_latent_grid(tensor, name=name)
        check_grid_rank(tuple(latent.shape[:-1]), self.rank, name=name)
        self._token_grid(tuple(latent.shape[:-1]), name=name)
        return to_blocks(latent, self.downsample)

    def from_tokens(self, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor:
        latent = from_blocks(tokens.reshape(*shape, -1), self.downsample)
        return self.inner.from_tokens(latent.reshape(-1, latent.shape[-1]), tuple(latent.shape[:-1]), decode=decode)

    def check_shape(self, shape, *, name: str) -> Shape:
        check(isinstance(shape, (tuple, list)) and len(shape) == self.rank,
              f"`{name}` must be a token grid of {self.rank} positive ints, got {shape!r}")
        latent_shape = self.inner.check_shape(tuple(s * f for s, f in zip(shape, self.downsample)), name=name)
        return self._token_grid(latent_shape, name=name)

    def build_layers(self, *, dim: int, output_dim: int, axes: int) -> "EncDecLayers":
        block = math.prod(self.downsample)
        check(output_dim % block == 0, f"the objective's output width {output_dim} must be a multiple of the "
                                       f"encoder's block size {block}")
        return EncDecLayers(encoder=self.encoder, decoder=self.decoder, downsample=self.downsample,
                            channel_first=self.channel_first, dim=dim, output_channels=output_dim // block,
                            position_axes=axes if getattr(self.inner, "add_pos_emb", False) else None)


class EncDecLayers(ModalityLayers):
    """The trainable encoder in and decoder out, run on each modality instance whole (instances are
    told apart by their tokens' coordinates: each starts at the grid's origin); with ``position_axes``
    a learned MLP of the token coordinates is added to the encoder's output."""

    def __init__(self, *, encoder: nn.Module, decoder: nn.Module, downsample: Shape, channel_first: bool, dim: int,
                 output_channels: int, position_axes: Optional[int] = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.downsample, self.channel_first = tuple(downsample), channel_first
        self.dim, self.output_channels = dim, output_channels
        self.pos_mlp = (nn.Sequential(nn.Linear(position_axes, dim), nn.SiLU(), nn.Linear(dim, dim))
                        if position_axes is not None else None)

    def embed(self, values: Tensor, coords: Tensor) -> Tensor:
        tokens = [self._run(self.encoder, from_blocks(values[start:end].reshape(*grid, -1), self.downsample),
                            grid, self.dim, "encoder")
                  for start, end, grid in self._instances(coords)]
        embedded = torch.cat(tokens)
        if self.pos_mlp is not None:
            embedded = embedded + self.pos_mlp(coords.to(embedded.dtype))
        return embedded

    def output(self, hidden: Tensor, time_table: Optional[Tensor], rows: Optional[Tensor],
               coords: Optional[Tensor] = None) -> Tensor:
        check(coords is not None, "a trainable decoder needs the tokens' `coords` to find each modality instance")
        latent_grid = lambda grid: tuple(g * f for g, f in zip(grid, self.downsample))
        outputs = [self._run(self.decoder, hidden[start:end].reshape(*grid, -1), latent_grid(grid),
                             self.output_channels, "decoder")
                   for start, end, grid in self._instances(coords)]
        return torch.cat([to_blocks(out, self.downsample).reshape(end - start, -1)
                          for out, (start, end, _) in zip(outputs, self._instances(coords))])

    def _run(self, module: nn.Module, grid_values: Tensor, out_grid: Shape, out_channels: int, what: str) -> Tensor:
        """``module`` on one channel-last grid ``[*G, c]`` (given a batch of one, in the record's channel
        layout); returns its channel-last output, checked to be ``[*out_grid, out_channels]``."""
        x = grid_values.movedim(-1, 0) if self.channel_first else grid_values
        out = module(x[None])[0]
        out = out.movedim(0, -1) if self.channel_first else out
        check(tuple(out.shape) == (*out_grid, out_channels),
              f"`pre_post_transformer_enc_dec`: the {what} must return {out_channels} channels on the grid "
              f"{tuple(out_grid)} ({'channel-first' if self.channel_first else 'channel-last'}), got "
              f"{tuple(out.shape)} for an input of {tuple(x.shape)}")
        return out.reshape(-1, out_channels) if what == "encoder" else out

    def _instances(self, coords: Tensor) -> List[Tuple[int, int, Shape]]:
        """``(start, end, token grid)`` of each instance in a run of tokens."""
        grid_coords = coords[:, coords.shape[1] - len(self.downsample):]  # a grid fills the LAST rotary axes
        starts = torch.nonzero((grid_coords == 0).all(-1)).flatten().tolist() + [coords.shape[0]]
        return [(start, end, tuple((grid_coords[start:end].amax(0) + 1).tolist()))
                for start, end in zip(starts, starts[1:])]
