"""DnD-Transformer (Chen et al. 2024, "2-D autoregression"): LlamaGen with depth heads.

An image is a ``grid x grid`` raster of residual-quantized (RQ-VAE) positions with ``D`` codes each
(coarse to fine). The model is :class:`~mmgen_pytorch.llamagen.LlamaGen`'s class-conditional decoder
(class prefix with a null class, 2-D RoPE zeroed on the prefix, the training forward, the generation
loop, CFG, KV cache, official-checkpoint plumbing: all inherited) with ``D`` prediction heads inside the
backbone (:class:`~mmgen_pytorch.code_heads.DepthHeads`, which LlamaGen takes as its ``code_heads``), so
all ``D`` codes of a position come out of ONE backbone pass. This module is only the public constructor.
Upstream conventions kept (see ``shared/reference/dnd.md``):

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

The heads are :mod:`mmgen_pytorch.code_heads`; the presets, head layouts and official config translation
are :mod:`mmgen_pytorch.pretrained.dnd`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from .code_heads import DepthHeads
from .llamagen import LlamaGen
from .pretrained import llamagen as gpt
from .pretrained.dnd import ARXIV_HEAD_POSITIONS, IMAGENET_HEAD_POSITIONS, PRESETS, official_config_dnd

__all__ = ["ARXIV_HEAD_POSITIONS", "IMAGENET_HEAD_POSITIONS", "PRESETS", "DnDTransformer", "official_config_dnd"]


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

    Training, generation and sampling are LlamaGen's (:meth:`~mmgen_pytorch.llamagen.LlamaGen.forward`,
    :meth:`~mmgen_pytorch.llamagen.LlamaGen.generate`, :meth:`~mmgen_pytorch.llamagen.LlamaGen.sample`) with
    ``[b, h, w, D]`` / ``[b, n, D]`` codes and ``class_labels``; the heads are ``code_heads``.
    """

    presets = PRESETS

    def __init__(self, *, dim: int, depth: int, heads: int, head_positions: Sequence[int],
                 kv_heads: Optional[int] = None, vocab_size: int = 16384, grid_size: int = 16,
                 num_classes: int = 1000, class_dropout_prob: float = 0.1, cls_token_num: int = 1,
                 ff_multiple_of: int = 256, ff_dim_multiplier: Optional[float] = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, token_dropout: float = 0.0, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, ff_dropout: float = 0.0, input_corruption: float = 0.0,
                 initializer_range: float = 0.02, tokenizer: Any = None, attn_backend: str = "auto"):
        code_heads = DepthHeads(dim=dim, vocab_size=vocab_size, head_positions=head_positions, norm_eps=norm_eps)
        super().__init__(dim=dim, depth=depth, heads=heads, kv_heads=kv_heads, vocab_size=vocab_size,
                         grid_size=grid_size, model_type="c2i", num_classes=num_classes,
                         class_dropout_prob=class_dropout_prob, cls_token_num=cls_token_num,
                         ff_multiple_of=ff_multiple_of, ff_dim_multiplier=ff_dim_multiplier, rope_base=rope_base,
                         norm_eps=norm_eps, token_dropout=token_dropout, attn_dropout=attn_dropout,
                         resid_dropout=resid_dropout, ff_dropout=ff_dropout, input_corruption=input_corruption,
                         initializer_range=initializer_range, tokenizer=tokenizer, attn_backend=attn_backend,
                         code_heads=code_heads)
        self.head_positions, self.code_depth = code_heads.head_positions, code_heads.code_depth

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
