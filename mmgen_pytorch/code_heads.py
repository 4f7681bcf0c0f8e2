"""The output heads of the LlamaGen family: what turns the decoder's hidden states into image codes.

LlamaGen predicts one code per image position with one layer after the backbone (:class:`NextCodeHead`);
DnD-Transformer predicts ``D`` codes per position, coarse to fine, with one head per depth inside the
backbone (:class:`DepthHeads`). Everything else (the condition prefix, 2-D RoPE, the generation loop
and its CFG batch, the KV cache, saving and official checkpoints) is
:class:`~mmgen_pytorch.llamagen.LlamaGen`'s, which hands its ``code_heads`` whatever depends on the codes
of a position: checking them, embedding them as one input vector, the teacher-forced logits of training,
one generation step (guidance and sampling included), the tokenizer check and the words describing
them in mismatch messages.

The heads do not own the code embedding table: the model passes its ``token_embed`` to every call that
embeds codes (DnD injects the embedding of each predicted code into the residual stream).

Reading order: :class:`CodeHeads` (the interface) -> :class:`NextCodeHead` -> :class:`DepthHeads` and
:class:`DepthHead` -> the shared helpers.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ._utils import check, check_index_range, describe, is_index_tensor
from .backbone import RMSNorm
from .guidance import guide
from .sampling import sample_from_logits
from .saving import Checkpointable

if TYPE_CHECKING:
    from .backbone import Decoder, SequenceChunk

BlockHook = Callable[[int, Tensor], Optional[Tensor]]
Backbone = Callable[[Optional[BlockHook]], Tensor]  # backbone(block_hook) -> last hidden states [b, m, d]


class CodeHeads(Checkpointable, nn.Module):
    """The interface between a LlamaGen-style decoder and the codes it predicts.

    A subclass fixes what one image position holds (``code_depth``) and implements the methods below;
    the model calls them and nothing else of the heads.

    Args (keyword-only):
        dim: the width of the hidden states the heads read (the model's ``dim``).
        vocab_size: the codebook size: the heads predict logits over ``vocab_size`` codes.

    Attributes:
        code_depth: codes per position: None for one code (codes ``[b, n]``, logits ``[b, n, vocab]``),
            ``D`` for ``D`` codes (codes ``[b, n, D]``, logits ``[b, n, D, vocab]``).
        final_norm: whether the backbone ends with its own norm (read once, when the model builds its
            backbone); False when the heads normalise the hidden states they read themselves.
    """

    final_norm: ClassVar[bool] = True
    code_depth: Optional[int] = None

    def __init__(self, *, dim: int, vocab_size: int):
        super().__init__()
        check(dim > 0 and vocab_size > 0, f"`dim` and `vocab_size` must be positive, got {dim} and {vocab_size}")
        self.dim, self.vocab_size = dim, vocab_size

    def check_model(self, *, dim: int, depth: int, vocab_size: int) -> None:
        """Refuse a model these heads cannot serve (its constructor calls this before building anything):
        the width and codebook must match; a subclass also checks the backbone's ``depth`` (blocks)."""
        check(self.dim == dim and self.vocab_size == vocab_size,
              f"`code_heads` read width {self.dim} and predict {self.vocab_size} codes, but the model has "
              f"dim={dim} and vocab_size={vocab_size}")

    def check_codes(self, codes: Tensor, *, grid_size: int) -> Int[Tensor, "b n ..."]:
        """Training codes (a full ``grid_size`` grid or its first ``n`` positions in raster order) checked
        and flattened to ``[b, n, *code]`` int64; bad input raises naming ``codes``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `check_codes`")

    def embed_codes(self, codes: Int[Tensor, "b n ..."], embed: nn.Embedding) -> Float[Tensor, "b n d"]:
        """The input vector of every position from its codes, through the model's table ``embed``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `embed_codes`")

    def teacher_forced_logits(self, backbone: Backbone, codes: Int[Tensor, "b n ..."],
                              embed: nn.Embedding) -> Float[Tensor, "b n ... vocab"]:
        """fp32 logits of ``codes`` (checked) under teacher forcing. ``backbone(block_hook)`` runs the
        backbone over ``[prefix, codes[:, :-1]]`` (``block_hook(index, hidden)`` after every block, see
        :class:`~mmgen_pytorch.backbone.Transformer`) and returns its output; the last ``n`` positions
        predict ``codes``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `teacher_forced_logits`")

    def generation_step(self, decoder: "Decoder", chunk: "SequenceChunk", earlier: Sequence[Tensor], *,
                        embed: nn.Embedding, cfg_scale: float,
                        sampling: Dict[str, Any]) -> Tuple[Int[Tensor, "b ..."], Float[Tensor, "b ... vocab"]]:
        """Write ``chunk`` (the prefix, or the last position) to ``decoder`` and draw the codes of the next
        position of every sample from the logits of its last position: guided with :func:`guide` when
        ``cfg_scale`` is not 1 (the decoder's rows are then [conditional; unconditional]), drawn with
        :func:`sample_from_logits` (``sampling``: its keyword arguments). ``earlier``: the codes drawn
        so far, one tensor per position. Returns the codes ``[b, *code]`` and their logits."""
        raise NotImplementedError(f"{type(self).__name__} must implement `generation_step`")

    def init_weights(self, std: float) -> None:
        """Set the initial weights; the model calls it after drawing its own layers from N(0, std)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `init_weights`")

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer whose codes are not these (one that tells its ``codebook_size`` must have
        ``vocab_size`` codes), before a whole generation is spent."""
        size = getattr(tokenizer, "codebook_size", None)
        check(size is None or size == self.vocab_size,
              f"`tokenizer` has a codebook of {size} codes but the model's `vocab_size` is {self.vocab_size}: "
              f"the generated codes index that codebook, so the two must match")

    def describe(self) -> str:
        """What tells these heads apart, as constructor fields for messages (empty: nothing)."""
        return ""


class NextCodeHead(CodeHeads):
    """LlamaGen's output: the backbone's final RMSNorm (``final_norm``), then one bias-free linear layer
    ``to_logits`` (zero-initialised, as upstream) at every position: fp32 logits of the one code of the
    next position. Codes are ``[b, h, w]`` or ``[b, n]``."""

    def __init__(self, *, dim: int, vocab_size: int):
        super().__init__(dim=dim, vocab_size=vocab_size)
        self.to_logits = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, hidden: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
        return self.to_logits(hidden).float()

    def check_codes(self, codes: Tensor, *, grid_size: int) -> Int[Tensor, "b n"]:
        return checked_codes(codes, grid_size=grid_size, vocab_size=self.vocab_size)

    def embed_codes(self, codes: Int[Tensor, "b n"], embed: nn.Embedding) -> Float[Tensor, "b n d"]:
        return embed(codes)

    def teacher_forced_logits(self, backbone: Backbone, codes: Int[Tensor, "b n"],
                              embed: nn.Embedding) -> Float[Tensor, "b n vocab"]:
        return self(backbone(None)[:, -codes.shape[1]:])

    def generation_step(self, decoder: "Decoder", chunk: "SequenceChunk", earlier: Sequence[Tensor], *,
                        embed: nn.Embedding, cfg_scale: float,
                        sampling: Dict[str, Any]) -> Tuple[Int[Tensor, "b"], Float[Tensor, "b vocab"]]:
        return guided_sample(self(decoder.write(chunk)[:, -1]), cfg_scale, sampling)

    def init_weights(self, std: float) -> None:
        # drawn, then zeroed: the draws LlamaGen always made here, so a seeded model (and what is drawn after) stays
        nn.init.normal_(self.to_logits.weight, std=std)
        nn.init.zeros_(self.to_logits.weight)


class DepthHeads(CodeHeads):
    """DnD's output: ``D = len(head_positions)`` heads inside the backbone, one per code depth.

    Head ``k`` (:class:`DepthHead`: its own RMSNorm and a bias-free, zero-initialised linear layer) reads
    the residual stream after block ``head_positions[k]`` through the backbone's ``block_hook`` and predicts
    the depth-``k`` code of the next position. For ``k < D - 1`` the embedding of that code (the ground
    truth in training, the sampled code in generation, in every CFG row of its sample) is then added to
    the stream at the position that predicts it, before the next block; blocks after the last head run
    unused, and the backbone has no final norm. A position's input is the sum of its ``D`` code
    embeddings. Codes are ``[b, h, w, D]`` or ``[b, n, D]``.

    Args (keyword-only):
        dim, vocab_size: see :class:`CodeHeads`.
        head_positions: 0-based, strictly increasing block indices (checked against the model's depth by
            :meth:`check_model`).
        norm_eps: the heads' RMSNorm epsilon.
    """

    final_norm = False

    def __init__(self, *, dim: int, vocab_size: int, head_positions: Sequence[int], norm_eps: float = 1e-5):
        positions = _checked_head_positions(head_positions)
        super().__init__(dim=dim, vocab_size=vocab_size)
        self.head_positions, self.code_depth = positions, len(positions)
        self.head_after = {block: k for k, block in enumerate(positions)}
        self.depths = nn.ModuleList([DepthHead(dim=dim, vocab_size=vocab_size, norm_eps=norm_eps)
                                     for _ in positions])

    def check_model(self, *, dim: int, depth: int, vocab_size: int) -> None:
        super().check_model(dim=dim, depth=depth, vocab_size=vocab_size)
        check(all(0 <= p < depth for p in self.head_positions),
              f"`head_positions` must be 0-based block indices in [0, {depth}) (depth={depth}), "
              f"got {list(self.head_positions)}")

    def check_codes(self, codes: Tensor, *, grid_size: int) -> Int[Tensor, "b n D"]:
        return checked_codes(codes, grid_size=grid_size, vocab_size=self.vocab_size, depth=self.code_depth,
                             depth_hint=f"one per head, head_positions={self.head_positions}")

    def embed_codes(self, codes: Int[Tensor, "b n D"], embed: nn.Embedding) -> Float[Tensor, "b n d"]:
        return embed(codes).sum(dim=-2)

    def teacher_forced_logits(self, backbone: Backbone, codes: Int[Tensor, "b n D"],
                              embed: nn.Embedding) -> Float[Tensor, "b n D vocab"]:
        n, logits = codes.shape[1], []

        def at_head(k: int, hidden: Tensor) -> Tensor:
            logits.append(self.depths[k](hidden[:, -n:]))
            return codes[..., k]

        backbone(self._block_hook(at_head, embed))
        return torch.stack(logits, dim=2)

    def generation_step(self, decoder: "Decoder", chunk: "SequenceChunk", earlier: Sequence[Tensor], *,
                        embed: nn.Embedding, cfg_scale: float,
                        sampling: Dict[str, Any]) -> Tuple[Int[Tensor, "b D"], Float[Tensor, "b D vocab"]]:
        """One backbone step samples all ``D`` codes (head, sample, inject, next block). Without a cache the
        earlier positions are recomputed and get their own codes injected again."""
        codes: List[Tensor] = []
        logits: List[Tensor] = []

        def at_head(k: int, hidden: Tensor) -> Tensor:
            code, head_logits = guided_sample(self.depths[k](hidden[:, -1]), cfg_scale, sampling)
            codes.append(code)
            logits.append(head_logits)
            rows, recomputed = hidden.shape[0], hidden.shape[1] - 1
            earlier_codes = _recomputed_codes(earlier, recomputed, rows, self.code_depth)[..., k]
            return torch.cat((earlier_codes.to(code.device), copies_for_rows(code, rows)), dim=1)

        decoder.write(chunk, block_hook=self._block_hook(at_head, embed))
        return torch.stack(codes, dim=-1), torch.stack(logits, dim=1)

    def init_weights(self, std: float) -> None:
        for head in self.depths:
            # drawn, then zeroed: the draws of building these layers after the model's own init in earlier
            # versions, so a seeded model (and what is drawn after it) stays bit-identical
            head.to_logits.reset_parameters()
            nn.init.zeros_(head.to_logits.weight)

    def check_tokenizer(self, tokenizer: Any) -> None:
        depth = getattr(tokenizer, "depth", None)
        check(depth is None or depth == self.code_depth,
              f"`tokenizer` quantizes {depth} depths but the model predicts {self.code_depth} codes per position "
              f"(head_positions={self.head_positions})")
        super().check_tokenizer(tokenizer)

    def describe(self) -> str:
        return f"head_positions={self.head_positions}"

    def _block_hook(self, at_head: Callable[[int, Tensor], Tensor], embed: nn.Embedding) -> BlockHook:
        """After head ``k``'s block: ``at_head(k, hidden)`` reads the head and gives the depth-``k`` codes of
        the last positions of ``hidden``, whose embeddings are added there (nothing after the last head)."""

        def hook(index: int, hidden: Tensor) -> Optional[Tensor]:
            k = self.head_after.get(index)
            if k is None:
                return None
            codes = at_head(k, hidden)
            if k == self.code_depth - 1:
                return None
            embeds = embed(codes)
            return hidden + F.pad(embeds, (0, 0, hidden.shape[1] - embeds.shape[1], 0))

        hook.blocks = self.head_positions  # where it acts: a compiled decode step stops only there
        return hook


class DepthHead(nn.Module):
    """One depth's prediction head: RMSNorm, then a bias-free linear layer (zero-initialised, as upstream);
    fp32 logits. Built without drawing from the random generator (:meth:`DepthHeads.init_weights` draws)."""

    def __init__(self, *, dim: int, vocab_size: int, norm_eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.to_logits = nn.utils.skip_init(nn.Linear, dim, vocab_size, bias=False, device=torch.get_default_device())
        nn.init.zeros_(self.to_logits.weight)

    def forward(self, hidden: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
        return self.to_logits(self.norm(hidden)).float()


# shared helpers


def checked_codes(codes: Tensor, *, grid_size: int, vocab_size: int, depth: Optional[int] = None,
                  depth_hint: str = "") -> Int[Tensor, "b n ..."]:
    """``codes`` ``[b, h, w]`` / ``[b, n]`` (one code per position) or, with ``depth``, ``[b, h, w, D]`` /
    ``[b, n, D]``, checked and flattened to ``[b, n(, D)]`` int64 (``depth_hint``: why ``D`` codes)."""
    g, extra = grid_size, int(depth is not None)
    axis, unit = (", D", "positions") if extra else ("", "tokens")
    check(is_index_tensor(codes) and codes.ndim in (2 + extra, 3 + extra) and codes.shape[0] > 0,
          f"`codes` must be an integer tensor [b, h, w{axis}] or [b, n{axis}] with b >= 1, got {describe(codes)}")
    check(not extra or codes.shape[-1] == depth,
          f"`codes` must hold D={depth} codes per position in the last axis ({depth_hint}), "
          f"got {codes.shape[-1]} (shape {tuple(codes.shape)})")
    check(codes.ndim == 2 + extra or tuple(codes.shape[1:3]) == (g, g),
          f"`codes` [b, h, w{axis}] must be [b, {g}, {g}{f', {depth}' if extra else ''}] (grid_size={g}), "
          f"got {tuple(codes.shape)}")
    codes = codes.reshape(codes.shape[0], -1, *codes.shape[codes.ndim - extra:]).long()
    check(0 < codes.shape[1] <= g * g,
          f"`codes` must hold 1..{g * g} {unit} per sample (grid_size={g}), got {codes.shape[1]}")
    check_index_range("codes", codes, vocab_size, what="code ids" if extra else "token ids", bound="vocab_size")
    return codes


def guided_sample(logits: Float[Tensor, "rows vocab"], cfg_scale: float,
                  sampling: Dict[str, Any]) -> Tuple[Int[Tensor, "b"], Float[Tensor, "b vocab"]]:
    """The next code of every sample and its logits: ``[cond; uncond]`` rows mixed by :func:`guide` when
    ``cfg_scale`` is not 1 (else the rows are the samples), then :func:`sample_from_logits`."""
    logits = guide(logits, cfg_scale) if cfg_scale != 1.0 else logits
    return sample_from_logits(logits, **sampling), logits


def copies_for_rows(codes: Tensor, rows: int) -> Tensor:
    """A sample's codes for every copy of it among ``rows`` (both CFG halves), as a one-position chunk."""
    return torch.cat([codes] * (rows // codes.shape[0]))[:, None]


def _recomputed_codes(earlier: Sequence[Tensor], positions: int, rows: int, depth: int) -> Int[Tensor, "rows m D"]:
    """The codes predicted by the ``positions`` earlier positions of a step's chunk (all of them when the
    whole sequence is recomputed, none in a cached step): the last ones drawn, for every row."""
    if positions == 0 or not earlier:
        return torch.zeros(rows, 0, depth, dtype=torch.long)
    drawn = torch.stack(list(earlier), dim=1)
    return torch.cat([drawn] * (rows // drawn.shape[0]))[:, -positions:]


def _checked_head_positions(positions: Sequence[int]) -> Tuple[int, ...]:
    try:
        positions = tuple(operator.index(p) for p in positions)
    except TypeError:
        raise ValueError(f"`head_positions` must be a sequence of block indices, got {positions!r}") from None
    check(len(positions) > 0, "`head_positions` must name at least one block (one head per code depth)")
    check(all(a < b for a, b in zip(positions, positions[1:])),
          f"`head_positions` must be strictly increasing (head k predicts depth k), got {list(positions)}")
    return positions
