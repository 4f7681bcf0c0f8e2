"""How the time of a modality's tokens reaches the backbone: one object per scheme.

:class:`Transfusion` embeds each distinct time of a forward once (``time_table [k, dim]``) and hands the
table, the row of every latent token in it, and the embedded latent runs to its ``time_injection``.

Reading order: :class:`TimeInjection` (the interface) -> :class:`PerBlockAdaLN` (Transfusion: adaLN in
every block) -> :class:`InputAdaLN` and :class:`TimeToken` (MonoFormer's two schemes).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..saving import Configurable
from .packing import LatentRun


class TimeInjection(Configurable, nn.Module):
    """``forward(x, time_table, time_index, latents) -> (x, backbone_kwargs)``.

    ``x [b, n, dim]``: the embedded sequence; ``time_table [k, dim]``: the embedded distinct times;
    ``time_index [b, n]``: each latent token's row of the table (-1 elsewhere); ``latents``: the embedded
    runs (:class:`~mmgen_pytorch.transfusion.packing.LatentRun`). Class attributes: ``time_tokens``, the
    tokens the placement reserves right before each modality's latents for this injection;
    ``block_conditioned``, the backbone's blocks take the time (per-block adaLN, built with ``dim_cond``).
    """

    time_tokens: int = 0
    block_conditioned: bool = False

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor,
                latents: List[LatentRun]) -> Tuple[Tensor, Dict[str, Tensor]]:
        raise NotImplementedError


class PerBlockAdaLN(TimeInjection):
    """Transfusion: every block modulates latent tokens by their time (adaLN-Zero inside the backbone)."""

    block_conditioned = True

    def __init__(self):
        super().__init__()

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor, latents: List[LatentRun]):
        return x, dict(cond=time_table, cond_index=time_index)


class InputAdaLN(TimeInjection):
    """MonoFormer's ``"adaln_before_decoder"`` (the released checkpoint): latent tokens enter the first
    block as ``x · (1 + b) + a`` with ``(a, b) = Linear(SiLU(t_emb)).chunk(2)``, zero-initialised. The
    first half acts as the SHIFT (upstream names the halves the other way round but passes them in this
    order)."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.to_modulation = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.to_modulation.weight)
        nn.init.zeros_(self.to_modulation.bias)

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor, latents: List[LatentRun]):
        shift, scale = self.to_modulation(F.silu(time_table)).chunk(2, dim=-1)
        index = (time_index.reshape(-1) >= 0).nonzero().squeeze(1)
        rows = time_index.reshape(-1)[index]
        flat = x.reshape(-1, x.shape[-1])
        modulated = flat[index] * (1 + scale[rows]) + shift[rows]
        return flat.index_copy(0, index, modulated.to(flat.dtype)).view_as(x), {}


class TimeToken(TimeInjection):
    """MonoFormer's ``"token"`` (the repository configs): one token right before each modality's latents,
    inside its bidirectional block, is ``Linear -> GELU -> Linear`` of the time embedding. The last layer
    starts at zero (zeroing both layers would leave the projector without gradient). Needs flat positions."""

    time_tokens = 1

    def __init__(self, *, dim: int):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.projector[2].weight)
        nn.init.zeros_(self.projector[2].bias)

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor, latents: List[LatentRun]):
        # the placement puts the time token right before each modality's first latent (coords all 0)
        firsts = [index[(coords == 0).all(-1)] for _, index, _, coords in latents]
        if not firsts:
            return x, {}
        firsts = torch.cat(firsts)
        tokens = self.projector(time_table)[time_index.reshape(-1)[firsts]]
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_copy(0, firsts - self.time_tokens, tokens.to(flat.dtype)).view_as(x), {}
