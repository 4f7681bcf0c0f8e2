"""DnD-Transformer (Chen et al. 2024, "2-D autoregression"): LlamaGen with depth heads.

An image is a ``grid x grid`` raster of residual-quantized (RQ-VAE) positions with ``D`` codes each
(coarse to fine). The model is :class:`~mmgen_pytorch.llamagen.LlamaGen`'s class-conditional decoder
(class prefix with a null class, 2-D RoPE zeroed on the prefix, the generation loop, CFG, KV cache,
official-checkpoint plumbing: all inherited) with ``D`` prediction heads inside the backbone, so all
``D`` codes of a position come out of ONE backbone pass. Upstream conventions kept (see
``shared/reference/dnd.md``):

- the input of a position is the sum of the embeddings of its ``D`` codes, from the one shared table
  that also embeds every injected code (no depth embedding, no scaling);
- head ``k`` (its own RMSNorm and a bias-free, zero-initialised linear layer) reads the residual stream
  after block ``head_positions[k]`` and predicts the depth-``k`` code of the next position;
- for ``k < D - 1`` the embedding of that depth-``k`` code (the ground truth in training, the sampled
  code in generation) is then added to the residual stream at the position that predicts it, before
  the next block; the last depth is not injected, and blocks after the last head run unused;
- the loss is one cross-entropy over all ``b * n * D`` predictions (the unweighted mean over depths);
- generation takes one backbone step per position and samples all ``D`` codes inside it (head, sample,
  inject, next block). Under CFG the logits of every head are mixed as ``uncond + (cond - uncond) * s``
  and the one sampled code is injected into both halves.

Reading order: :class:`DnDTransformer` (construction, training forward, generation, presets and official
checkpoints, internals) -> :class:`DepthHead`. The presets, head layouts and official config translation
are :mod:`mmgen_pytorch.pretrained.dnd`.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ._utils import GeneratorLike, check, check_index_range, describe, is_index_tensor
from .backbone import RMSNorm
from .backbone import Decoder
from .guidance import guide
from .llamagen import CodeChunk, LlamaGen, _copies
from .pretrained import llamagen as gpt
from .pretrained.dnd import ARXIV_HEAD_POSITIONS, IMAGENET_HEAD_POSITIONS, PRESETS, official_config_dnd
from .sampling import sample_from_logits


class DnDTransformer(LlamaGen):
    """Class-conditional generator of ``[grid, grid, D]`` RQ codes, ``D = len(head_positions)``.

    Args (keyword-only):
        dim, depth, heads, kv_heads: transformer size (``depth`` blocks).
        head_positions: 0-based, strictly increasing block indices; head ``k`` follows block
            ``head_positions[k]`` and predicts depth ``k`` (ImageNet: ``(39, 47)`` of 48 blocks).
            Blocks after the last head affect no output and get no gradient (DDP then needs
            ``find_unused_parameters=True``).
        vocab_size: the RQ-VAE's shared codebook size. grid_size: positions per side.
        num_classes, class_dropout_prob: classes; with dropout > 0 the table has the null class row
            ``num_classes`` (needed for CFG).
        cls_token_num: class prefix length (1 upstream).
        ff_multiple_of, ff_dim_multiplier, rope_base, norm_eps: LLaMA details (upstream defaults).
        token_dropout, attn_dropout, resid_dropout, ff_dropout: dropout probabilities.
        input_corruption: training-mode chance of replacing an input position's ``D`` codes by random
            codes (see :class:`~mmgen_pytorch.llamagen.LlamaGen`). The targets and the codes injected
            after each head stay true, so blocks after head 0 still see a swapped position's true codes
            through its injection; only the input sum is corrupted.
        initializer_range: std of the N(0, std) init (the heads start at zero, as upstream).
        tokenizer: optional RQ-VAE with ``decode_code(codes [b, h, w, D]) -> images in [-1, 1]``, used by
            :meth:`sample`; not a submodule (not in ``state_dict``).
        attn_backend: the backbone's attention backend (``"auto"``, ``"sdpa"``, ``"flex"``).
    """

    presets = PRESETS
    final_head = False  # the depth heads replace LlamaGen's final norm + output layer

    def __init__(self, *, dim: int, depth: int, heads: int, head_positions: Sequence[int],
                 kv_heads: Optional[int] = None, vocab_size: int = 16384, grid_size: int = 16,
                 num_classes: int = 1000, class_dropout_prob: float = 0.1, cls_token_num: int = 1,
                 ff_multiple_of: int = 256, ff_dim_multiplier: Optional[float] = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, token_dropout: float = 0.0, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, ff_dropout: float = 0.0, input_corruption: float = 0.0,
                 initializer_range: float = 0.02, tokenizer: Any = None, attn_backend: str = "auto"):
        positions = _checked_head_positions(head_positions, depth)
        super().__init__(dim=dim, depth=depth, heads=heads, kv_heads=kv_heads, vocab_size=vocab_size,
                         grid_size=grid_size, model_type="c2i", num_classes=num_classes,
                         class_dropout_prob=class_dropout_prob, cls_token_num=cls_token_num,
                         ff_multiple_of=ff_multiple_of, ff_dim_multiplier=ff_dim_multiplier, rope_base=rope_base,
                         norm_eps=norm_eps, token_dropout=token_dropout, attn_dropout=attn_dropout,
                         resid_dropout=resid_dropout, ff_dropout=ff_dropout, input_corruption=input_corruption,
                         initializer_range=initializer_range, attn_backend=attn_backend)
        self.head_positions, self.code_depth = positions, len(positions)
        self._head_after = {block: k for k, block in enumerate(positions)}
        self.depth_heads = nn.ModuleList([DepthHead(dim=dim, vocab_size=vocab_size, norm_eps=norm_eps)
                                          for _ in positions])
        self.set_tokenizer(tokenizer)

    # training

    def forward(self, codes: Union[Int[Tensor, "b h w D"], Int[Tensor, "b n D"]], *,
                class_labels: Int[Tensor, "b"], cond_drop_prob: Optional[float] = None, return_logits: bool = False):
        """Teacher-forced cross-entropy over every depth: the input is ``[class, codes[:, :-1]]`` (each
        position the sum of its ``D`` code embeddings); ``logits[:, t, k]`` predicts ``codes[:, t, k]``
        and the ground-truth depth-``k`` codes are injected after head ``k``.

        Args:
            codes: ``[b, h, w, D]`` (the full grid) or ``[b, n, D]`` (the first n positions in raster order).
            class_labels: class ids in ``[0, num_classes)``.
            cond_drop_prob: chance of replacing a label by the null class (default: ``class_dropout_prob``
                in training mode, 0 in eval mode).
        Returns the mean loss, or ``(loss, logits [b, n, D, vocab_size] fp32)`` with ``return_logits``.
        """
        codes = self._check_codes(codes)
        batch = codes.shape[0]
        drop = self._condition_dropout(batch, cond_drop_prob, codes.device)
        prefix, _ = self._prefix(batch, drop, class_labels=class_labels)
        x = self.token_dropout(torch.cat((prefix, self._embed_codes(self._corrupted(codes[:, :-1]))), dim=1))
        depth_logits: List[Tensor] = []
        self._transformer(x, block_hook=self._teacher_forcing_hook(codes, depth_logits))
        logits = torch.stack(depth_logits, dim=2)
        loss = F.cross_entropy(logits.flatten(0, 2), codes.flatten())
        return (loss, logits) if return_logits else loss

    # generation

    @torch.no_grad()
    def generate(self, condition: Union[Tensor, Sequence[int]], *, max_new_tokens: Optional[int] = None,
                 cfg_scale: float = 1.0, cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, greedy: bool = False, generator: GeneratorLike = None,
                 progress: bool = True, use_cache: bool = True, return_logits: bool = False):
        """Sample the codes of one position per backbone step, all ``D`` depths inside that step.

        Args:
            condition: class ids ``[b]``.
            max_new_tokens: number of positions (default: the whole grid, ``grid_size ** 2``).
            cfg_scale: classifier-free guidance ``uncond + scale * (cond - uncond)`` on the fp32 logits of
                every head, before temperature and filtering; the sampled code goes into both halves.
            cfg_interval: LlamaGen's option (``> -1`` stops guiding after ``cfg_interval + 2`` positions);
                upstream DnD parses it but always guides, as the default ``-1`` does.
            temperature, top_k, top_p: sampling, the same at every depth (``top_k=0`` / ``top_p=1``: off).
            greedy: argmax. generator: a torch.Generator or an int seed for the draws (one per depth, in depth order).
            progress: a tqdm bar. use_cache: static KV cache (default); ``False`` recomputes the whole
                sequence every step (the reference path).
            return_logits: also return the (guided) fp32 logits ``[b, n, D, vocab_size]``.
        Returns codes ``[b, grid, grid, D]`` for a full grid, else ``[b, n, D]`` (int64).
        """
        return super().generate(condition, max_new_tokens=max_new_tokens, cfg_scale=cfg_scale,
                                cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p,
                                greedy=greedy, generator=generator, progress=progress, use_cache=use_cache,
                                return_logits=return_logits)

    def set_tokenizer(self, tokenizer: Any) -> "DnDTransformer":
        depth = getattr(tokenizer, "depth", None)
        check(depth is None or depth == self.code_depth,
              f"`tokenizer` quantizes {depth} depths but the model predicts {self.code_depth} codes per position "
              f"(head_positions={self.head_positions})")
        return super().set_tokenizer(tokenizer)

    # presets and official checkpoints

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DnDTransformer":
        """DnD's ``"GPT-XXL"`` (dim 1536, 48 blocks, 24 heads) or ``"GPT-XXXL"`` (dim 2048, 48 blocks, 32
        heads; not LlamaGen's XXXL). ``head_positions`` defaults to the ImageNet 16x16x2 heads ``(39, 47)``;
        ``ARXIV_HEAD_POSITIONS`` gives the 8-depth arXiv-image layout. ``kwargs`` set the rest."""
        return super().from_preset(name, **{"head_positions": IMAGENET_HEAD_POSITIONS, **kwargs})

    @classmethod
    def from_official(cls, checkpoint, *, config: Union[Mapping[str, Any], str, None] = None, use_ema: bool = False,
                      **kwargs) -> "DnDTransformer":
        """A model from an official DnD GPT checkpoint, in eval mode: LlamaGen's
        :meth:`~mmgen_pytorch.llamagen.LlamaGen.from_official`, with upstream DnD's ``ModelArgs`` (LlamaGen's
        plus ``num_pred_heads`` / ``pred_head_positions``) and ``gpt_model`` names from ``PRESETS``. Loading
        is strict (upstream's sampler is not): a checkpoint with another number of heads is an error naming
        the head keys."""
        return gpt.from_official(cls, checkpoint, config=config, use_ema=use_ema, translate=official_config_dnd,
                                 **kwargs)

    # internals: the depth heads inside the backbone

    def _teacher_forcing_hook(self, codes: Int[Tensor, "b n D"], depth_logits: List[Tensor]):
        """After head ``k``'s block: its logits at the ``n`` predicting positions, then the ground-truth
        depth-``k`` codes injected there."""
        n = codes.shape[1]

        def hook(index: int, hidden: Tensor) -> Optional[Tensor]:
            k = self._head_after.get(index)
            if k is None:
                return None
            depth_logits.append(self.depth_heads[k](hidden[:, -n:]))
            return self._inject(hidden, codes[..., k], k)

        return hook

    def _generation_step(self, decoder: Decoder, chunk: CodeChunk, earlier: Sequence[Tensor], cfg_scale: float,
                         sampling: Dict[str, Any]) -> Tuple[Int[Tensor, "b D"], Float[Tensor, "b D vocab"]]:
        """One backbone step: head ``k`` samples depth ``k`` of the next position from the (guided) logits
        of the last position and the code goes into every row of its sample before the next block.
        Without a cache the earlier positions are recomputed and get their own codes injected again."""
        codes: List[Tensor] = []
        depth_logits: List[Tensor] = []

        def hook(index: int, hidden: Tensor) -> Optional[Tensor]:
            k = self._head_after.get(index)
            if k is None:
                return None
            logits = self.depth_heads[k](hidden[:, -1])
            logits = guide(logits, cfg_scale) if cfg_scale != 1.0 else logits
            code = sample_from_logits(logits, **sampling)
            codes.append(code)
            depth_logits.append(logits)
            recomputed = _recomputed_codes(earlier, hidden.shape[1] - 1, hidden.shape[0], self.code_depth)
            return self._inject(hidden, torch.cat((recomputed[..., k].to(code.device), _copies(code, hidden.shape[0])), dim=1), k)

        decoder.write(chunk, block_hook=hook)
        return torch.stack(codes, dim=-1), torch.stack(depth_logits, dim=1)

    def _inject(self, hidden: Float[Tensor, "b m d"], codes: Int[Tensor, "b n"], k: int) -> Optional[Tensor]:
        """Add the embeddings of depth-``k`` codes at the last ``n`` positions (those that predict them);
        nothing after the last head."""
        if k == self.code_depth - 1:
            return None
        embeds = self.token_embed(codes)
        return hidden + F.pad(embeds, (0, 0, hidden.shape[1] - embeds.shape[1], 0))

    def _embed_codes(self, codes: Int[Tensor, "b n D"]) -> Float[Tensor, "b n d"]:
        return self.token_embed(codes).sum(dim=-2)

    # internals: inputs and descriptions

    def _check_codes(self, codes: Tensor) -> Int[Tensor, "b n D"]:
        g, depth = self.grid_size, self.code_depth
        check(is_index_tensor(codes) and codes.ndim in (3, 4) and codes.shape[0] > 0,
              f"`codes` must be an integer tensor [b, h, w, D] or [b, n, D] with b >= 1, got {describe(codes)}")
        check(codes.shape[-1] == depth,
              f"`codes` must hold D={depth} codes per position in the last axis (one per head, head_positions="
              f"{self.head_positions}), got {codes.shape[-1]} (shape {tuple(codes.shape)})")
        check(codes.ndim == 3 or tuple(codes.shape[1:3]) == (g, g),
              f"`codes` [b, h, w, D] must be [b, {g}, {g}, {depth}] (grid_size={g}), got {tuple(codes.shape)}")
        codes = codes.reshape(codes.shape[0], -1, depth).long()
        check(0 < codes.shape[1] <= self.num_image_tokens,
              f"`codes` must hold 1..{self.num_image_tokens} positions per sample (grid_size={g}), "
              f"got {codes.shape[1]}")
        check_index_range("codes", codes, self.vocab_size, what="code ids", bound="vocab_size")
        return codes

    def _summary(self) -> str:
        b = self.backbone
        return (f"DnDTransformer(dim={b.dim}, depth={b.depth}, heads={b.heads}, kv_heads={b.kv_heads}, "
                f"vocab_size={self.vocab_size}, num_classes={self.prefix_embed.num_classes}, "
                f"head_positions={self.head_positions}) (check `config`: n_layer, num_pred_heads, pred_head_positions)")


class DepthHead(nn.Module):
    """One depth's prediction head: RMSNorm, then a bias-free linear layer (zero-initialised, as
    upstream); fp32 logits."""

    def __init__(self, *, dim: int, vocab_size: int, norm_eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.to_logits = nn.Linear(dim, vocab_size, bias=False)
        nn.init.zeros_(self.to_logits.weight)

    def forward(self, hidden: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
        return self.to_logits(self.norm(hidden)).float()


def _recomputed_codes(earlier: Sequence[Tensor], positions: int, rows: int, depth: int) -> Int[Tensor, "rows m D"]:
    """The codes predicted by the ``positions`` earlier positions of a step's chunk (all of them when the
    whole sequence is recomputed, none in a cached step): the last ones drawn, for every row."""
    if positions == 0 or not earlier:
        return torch.zeros(rows, 0, depth, dtype=torch.long)
    drawn = torch.stack(list(earlier), dim=1)
    return torch.cat([drawn] * (rows // drawn.shape[0]))[:, -positions:]


def _checked_head_positions(positions: Sequence[int], depth: int) -> Tuple[int, ...]:
    try:
        positions = tuple(operator.index(p) for p in positions)
    except TypeError:
        raise ValueError(f"`head_positions` must be a sequence of block indices, got {positions!r}") from None
    check(len(positions) > 0, "`head_positions` must name at least one block (one head per code depth)")
    check(all(0 <= p < depth for p in positions),
          f"`head_positions` must be 0-based block indices in [0, {depth}) (depth={depth}), got {list(positions)}")
    check(all(a < b for a, b in zip(positions, positions[1:])),
          f"`head_positions` must be strictly increasing (head k predicts depth k), got {list(positions)}")
    return positions
