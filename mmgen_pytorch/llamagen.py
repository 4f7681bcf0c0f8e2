"""LlamaGen (Sun et al. 2024, arXiv 2406.06525): next-token image generation with a LLaMA decoder.

The sequence is a condition prefix of ``cls_token_num`` tokens (a class embedding, or projected
caption features) followed by the VQ codes of an image in raster order; there is no BOS token.
Upstream conventions kept exactly (see ``shared/reference/llamagen.md``):

- the shared backbone with RMSNorm, SwiGLU and 2-D RoPE (row pairs, then column pairs, adjacent
  channels) whose rotation is *zeroed* on the prefix, so the prefix queries and keys are zero vectors;
- a class table with a null row ``num_classes`` when class dropout > 0; captions go through
  ``fc2(gelu_tanh(fc1(.)))`` without biases, are left-padded with a mask, and the unconditional
  caption is a stored buffer;
- an untied output head with fp32 logits; training logits are sliced from ``cls_token_num - 1``
  (the output heads are a part of their own, :mod:`mmgen_pytorch.code_heads`: one code per position
  here, DnD's depth heads there);
- a CFG batch of [conditional; unconditional] rows, guidance mixed on fp32 logits before temperature
  and top-k / top-p.

Reading order: :class:`LlamaGen` (construction, training forward, generation, decoding to images,
presets and official checkpoints, internals) -> the condition prefixes and the optional x-transformers
caption encoder -> the running state of one generation. The presets and the official checkpoint key
maps and config translation are :mod:`mmgen_pytorch.pretrained.llamagen`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._utils import (GeneratorLike, as_generator, check, check_finite, check_finite_number, check_index_range, default,
                     describe, eval_mode, is_index_tensor)
from .backbone import PADDING, Decoder, KVCache, SequenceChunk, TokenLayout, Transformer, llamagen_positions
from .backbone.decoding import check_compile
from .backbone.masks import NO_BLOCK
from .code_heads import CodeHeads, NextCodeHead, copies_for_rows
from .guidance import check_cfg_scale
from .pretrained import llamagen as gpt
from .pretrained.llamagen import PRESETS, official_config
from .saving import Checkpointable
from .sampling import check_sampling_options

MODEL_TYPES = ("c2i", "t2i")


class LlamaGen(Checkpointable, nn.Module):
    """Class- (``"c2i"``) or caption-conditional (``"t2i"``) autoregressive image generator.

    Args (keyword-only):
        dim, depth, heads, kv_heads: transformer size (``kv_heads`` < ``heads``: grouped-query attention).
        vocab_size: size of the image tokenizer's codebook. grid_size: image tokens per side.
        model_type: ``"c2i"`` (class labels) or ``"t2i"`` (caption embeddings).
        num_classes, class_dropout_prob: c2i classes; with dropout > 0 the table gets the null row
            ``num_classes`` (needed for CFG). For t2i the probability of swapping the caption for the
            unconditional one.
        caption_dim: t2i caption feature width (default 2048, FLAN-T5-XL; or the caption encoder's).
        cls_token_num: prefix length (default 1 for c2i, 120 for t2i as upstream).
        ff_multiple_of, ff_dim_multiplier, rope_base, norm_eps: LLaMA details (upstream defaults).
        token_dropout, attn_dropout, resid_dropout, ff_dropout: dropout probabilities.
        input_corruption: in training mode, the chance that an input image position is replaced by
            uniformly random codes while its target stays the true code (not upstream; 0: off). It
            teaches the model to continue past codes it would not have chosen, as it must when sampling.
        initializer_range: std of the N(0, std) init (the output head starts at zero, as upstream).
        caption_encoder: optional trainable module ``ids [b, n] -> (embeds [b, n, caption_dim], mask)``,
            e.g. :class:`CaptionEncoder`; enables ``caption_ids=`` and integer conditions in ``generate``.
        tokenizer: optional image tokenizer with ``decode_code(codes [b, h, w]) -> images in [-1, 1]``,
            used by :meth:`sample`; not a submodule (not in ``state_dict``, not moved by ``.to``).
        attn_backend: the backbone's attention backend (``"auto"``, ``"sdpa"``, ``"flex"``).
        code_heads: the output heads (:class:`~mmgen_pytorch.code_heads.CodeHeads`), which decide what a
            position holds; default :class:`~mmgen_pytorch.code_heads.NextCodeHead` (one code, upstream
            LlamaGen). :class:`~mmgen_pytorch.dnd.DnDTransformer` passes its depth heads.
    """

    presets: ClassVar[Dict[str, Tuple[int, int, int]]] = PRESETS  # for from_preset and `gpt_model`
    # the keys of models saved before the output heads were a part of their own (read by `load`)
    legacy_keys: ClassVar[Dict[str, str]] = {"to_logits.": "code_heads.to_logits.",
                                             "depth_heads.": "code_heads.depths."}

    def __init__(self, *, dim: int, depth: int, heads: int, kv_heads: Optional[int] = None,
                 vocab_size: int = 16384, grid_size: int = 16, model_type: str = "c2i", num_classes: int = 1000,
                 class_dropout_prob: float = 0.1, caption_dim: Optional[int] = None,
                 cls_token_num: Optional[int] = None, ff_multiple_of: int = 256,
                 ff_dim_multiplier: Optional[float] = None, rope_base: float = 10000.0, norm_eps: float = 1e-5,
                 token_dropout: float = 0.0, attn_dropout: float = 0.0, resid_dropout: float = 0.0,
                 ff_dropout: float = 0.0, input_corruption: float = 0.0, initializer_range: float = 0.02,
                 caption_encoder: Optional[nn.Module] = None, tokenizer: Any = None, attn_backend: str = "auto",
                 code_heads: Optional[CodeHeads] = None):
        super().__init__()
        check(model_type in MODEL_TYPES, f"`model_type` must be one of {MODEL_TYPES}, got {model_type!r}")
        check(vocab_size > 0 and grid_size > 0,
              f"`vocab_size` and `grid_size` must be positive, got {vocab_size} and {grid_size}")
        check(0.0 <= class_dropout_prob < 1.0, f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}")
        check(0.0 <= input_corruption < 1.0, f"`input_corruption` must be in [0, 1), got {input_corruption}")
        cls_token_num = default(cls_token_num, 1 if model_type == "c2i" else 120)
        check(cls_token_num >= 1, f"`cls_token_num` must be >= 1, got {cls_token_num}")
        caption_dim = default(caption_dim, getattr(caption_encoder, "dim", 2048))
        if code_heads is not None:
            check(isinstance(code_heads, CodeHeads),
                  f"`code_heads` must be a CodeHeads module (NextCodeHead, DepthHeads), "
                  f"got {type(code_heads).__name__}")
            code_heads.check_model(dim=dim, depth=depth, vocab_size=vocab_size)

        self.model_type, self.vocab_size, self.grid_size = model_type, vocab_size, grid_size
        self.cls_token_num, self.class_dropout_prob = cls_token_num, class_dropout_prob
        self.input_corruption = input_corruption
        self.num_image_tokens = grid_size * grid_size
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.prefix_embed = (ClassPrefix(num_classes=num_classes, dim=dim, tokens=cls_token_num,
                                         dropout_prob=class_dropout_prob) if model_type == "c2i"
                             else CaptionPrefix(caption_dim=caption_dim, dim=dim, tokens=cls_token_num))
        self.token_dropout = nn.Dropout(token_dropout)
        self.backbone = Transformer(dim=dim, depth=depth, heads=heads, kv_heads=kv_heads, norm="rmsnorm",
                                    norm_eps=norm_eps, ff="swiglu", ff_multiple_of=ff_multiple_of,
                                    ff_dim_multiplier=ff_dim_multiplier, attn_dropout=attn_dropout,
                                    resid_dropout=resid_dropout, ff_dropout=ff_dropout, rotary_axes=2,
                                    rotary_base=rope_base, attn_backend=attn_backend,
                                    final_norm=(NextCodeHead if code_heads is None else code_heads).final_norm)
        # the default is built here, after the backbone, where its layer's random draws always were
        self.code_heads = code_heads if code_heads is not None else NextCodeHead(dim=dim, vocab_size=vocab_size)
        self._init_weights(initializer_range)
        self.caption_encoder = self._checked_caption_encoder(caption_encoder)
        self._tokenizer = (None,)  # a tuple keeps a tokenizer module out of submodules and state_dict
        self.set_tokenizer(tokenizer)

    # training

    def forward(self, codes: Union[Int[Tensor, "b h w"], Int[Tensor, "b n"], Int[Tensor, "b h w D"],
                                   Int[Tensor, "b n D"]], *,
                class_labels: Optional[Int[Tensor, "b"]] = None,
                caption_embeds: Optional[Float[Tensor, "b m d"]] = None,
                caption_mask: Optional[Bool[Tensor, "b m"]] = None, caption_ids: Optional[Int[Tensor, "b m"]] = None,
                cond_drop_prob: Optional[float] = None, return_logits: bool = False):
        """Next-token cross-entropy in upstream's training convention: the input is
        ``[prefix, codes[:, :-1]]`` and ``logits[:, t]`` (sliced from position ``cls_token_num - 1``)
        predicts ``codes[:, t]``. With depth heads (DnD) a position's input is the sum of its ``D`` code
        embeddings, ``logits[:, t, k]`` predicts ``codes[:, t, k]`` and the ground-truth depth-``k`` codes
        are injected after head ``k``; the loss is the mean over all ``b * n * D`` predictions.

        Args:
            codes: image tokens ``[b, h, w]`` (the full grid) or ``[b, n]`` (the first n in raster order);
                with depth heads ``[b, h, w, D]`` or ``[b, n, D]``.
            class_labels: c2i class ids in ``[0, num_classes)``.
            caption_embeds, caption_mask: t2i caption features ``[b, m, caption_dim]`` (m <= cls_token_num)
                and their validity mask (default: all valid). Captions are left-padded as upstream: shorter
                ones are padded, and valid tokens after padding (right padding) are moved to the end.
            caption_ids: t2i caption token ids for the attached ``caption_encoder``.
            cond_drop_prob: chance of replacing a sample's condition by the null class / unconditional
                caption (default: ``class_dropout_prob`` in training mode, 0 in eval mode).
        Returns the mean loss, or ``(loss, logits [b, n, vocab_size] fp32)`` with ``return_logits``
        (``[b, n, D, vocab_size]`` with depth heads).
        """
        codes = self.code_heads.check_codes(codes, grid_size=self.grid_size)
        batch = codes.shape[0]
        drop = self._condition_dropout(batch, cond_drop_prob, codes.device)
        prefix, prefix_mask = self._prefix(batch, drop, class_labels=class_labels, caption_embeds=caption_embeds,
                                           caption_mask=caption_mask, caption_ids=caption_ids)
        inputs = self.code_heads.embed_codes(self._corrupted(codes[:, :-1]), self.token_embed)
        x = self.token_dropout(torch.cat((prefix, inputs), dim=1))
        logits = self.code_heads.teacher_forced_logits(
            lambda block_hook: self._transformer(x, prefix_mask, block_hook=block_hook), codes, self.token_embed)
        loss = F.cross_entropy(logits.flatten(0, -2), codes.flatten())
        return (loss, logits) if return_logits else loss

    # generation

    @torch.no_grad()
    def generate(self, condition: Union[Tensor, Sequence[int]], *, caption_mask: Optional[Bool[Tensor, "b m"]] = None,
                 max_new_tokens: Optional[int] = None, cfg_scale: float = 1.0, cfg_interval: float = -1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 generator: GeneratorLike = None, progress: bool = True, use_cache: bool = True,
                 compile: bool = False, return_logits: bool = False):
        """Sample the codes of one image position per step (prefill of the prefix, then single-position
        steps). With depth heads (DnD) all ``D`` codes of a position come out of its one backbone step:
        head ``k`` samples depth ``k`` and the code goes into every row of its sample before the next block.

        Args:
            condition: c2i class ids ``[b]``; t2i caption features ``[b, m, caption_dim]`` (with
                ``caption_mask``) or, with a ``caption_encoder``, caption token ids ``[b, m]``.
            max_new_tokens: number of positions (default: the whole grid, ``grid_size ** 2``).
            cfg_scale: classifier-free guidance ``uncond + scale * (cond - uncond)`` on the fp32 logits (of
                every head), before temperature and filtering; any value but 1 runs the [cond; uncond] batch
                (upstream LlamaGen guides only for ``cfg_scale > 1``); a sampled code goes into both halves.
            cfg_interval: a finite number >= -1; as upstream LlamaGen, ``> -1`` stops guiding after the
                first ``cfg_interval + 2`` positions (the prefill and decode steps ``0..cfg_interval``); the
                unconditional rows are then dropped. ``-1``: guide every step (upstream DnD parses the
                option but always guides).
            temperature, top_k, top_p: sampling, the same at every depth (``top_k=0`` / ``top_p=1``: off).
            greedy: argmax. generator: a torch.Generator or an int seed for the multinomial draws (one per
                depth, in depth order). progress: a tqdm bar.
            use_cache: static KV cache (default); ``False`` recomputes the whole sequence every step (the
                reference path).
            compile: run every step after the prefill as a compiled decode step (gpt-fast style: a
                fixed-shape cache, ``torch.compile`` with CUDA graphs on CUDA, the default mode on CPU;
                see :class:`~mmgen_pytorch.backbone.Decoder`): the same codes, faster once compiled. The
                first call compiles (seconds to minutes); later calls on the same model reuse the graphs.
                Dropping the unconditional rows (``cfg_interval``) compiles one more graph. Needs
                ``use_cache=True``.
            return_logits: also return the (guided) fp32 logits of every step ``[b, n, vocab_size]``
                (``[b, n, D, vocab_size]`` with depth heads).
        Returns codes ``[b, grid, grid]`` (depth heads: ``[b, grid, grid, D]``) for a full grid, else
        ``[b, n]`` (``[b, n, D]``), int64.
        """
        steps = self._check_sampling(max_new_tokens, temperature, top_k, top_p)
        check_compile(compile, use_cache)
        check_cfg_scale(cfg_scale)
        check_finite_number("cfg_interval", cfg_interval, minimum=-1)
        generator = as_generator(generator, self.token_embed.weight.device)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)
        guide = cfg_scale != 1.0
        with eval_mode(self):
            batch, prefix, prefix_mask = self._generation_prefix(condition, caption_mask, guide)
            decoder = Decoder(self._run_chunk, new_cache=self.backbone.new_cache, rows=prefix.shape[0],
                              max_length=self.cls_token_num + steps - 1, use_cache=use_cache, compile=compile)
            table = llamagen_positions(self.grid_size, self.cls_token_num, device=prefix.device)
            rows = prefix.shape[0]
            codes, step_logits = [], []
            for step in tqdm(range(steps), disable=not progress, desc=type(self).__name__, leave=False):
                guided = guide and not (cfg_interval > -1 and step - 1 > cfg_interval)
                if not guided and rows != batch:  # guidance stops: drop the unconditional rows
                    rows = batch
                    decoder.keep_rows(range(rows))
                chunk = (CodeChunk.at(table, 0, prefix[:rows], self._layout(prefix_mask, self.cls_token_num))
                         if step == 0 else CodeChunk.at(table, decoder.length, self.code_heads.embed_codes(
                             copies_for_rows(codes[-1], rows), self.token_embed)))
                token, logits = self.code_heads.generation_step(decoder, chunk, codes, embed=self.token_embed,
                                                                cfg_scale=cfg_scale if guided else 1.0,
                                                                sampling=sampling)
                codes.append(token)
                if return_logits:
                    step_logits.append(logits)
        codes = torch.stack(codes, dim=1)
        if steps == self.num_image_tokens:
            codes = codes.view(batch, self.grid_size, self.grid_size, *codes.shape[2:])
        return (codes, torch.stack(step_logits, dim=1)) if return_logits else codes

    @torch.no_grad()
    def sample(self, condition: Union[Tensor, Sequence[int]], **generate_kwargs) -> Float[Tensor, "b c H W"]:
        """:meth:`generate` a full grid and decode it with the attached tokenizer: images in [0, 1]."""
        check(self.tokenizer is not None,
              "`sample` decodes through a tokenizer: pass `tokenizer=` (anything with "
              "`decode_code(codes [b, h, w]) -> images in [-1, 1]`), or call `generate` for the codes")
        check(generate_kwargs.get("max_new_tokens") in (None, self.num_image_tokens)
              and not generate_kwargs.get("return_logits"),
              f"`sample` generates the whole {self.grid_size}x{self.grid_size} grid and returns images only; "
              f"use `generate` for partial grids or logits")
        codes = self.generate(condition, **generate_kwargs)
        images = self.tokenizer.decode_code(codes)
        return ((images.float() + 1) / 2).clamp(0, 1)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer[0]

    def set_tokenizer(self, tokenizer: Any) -> "LlamaGen":
        """Attach the tokenizer :meth:`sample` decodes with (None: detach); the heads refuse one whose codes
        are not theirs (a ``codebook_size`` other than ``vocab_size``, another ``depth``) here, not after a
        whole generation."""
        if tokenizer is not None:
            self.code_heads.check_tokenizer(tokenizer)
        self._tokenizer = (tokenizer,)
        return self

    # presets and official checkpoints

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "LlamaGen":
        """An upstream size by name (``"GPT-B"`` ... ``"GPT-7B"``, see ``PRESETS``); ``kwargs`` set the
        rest (vocab_size, grid_size, model_type, num_classes, ...)."""
        check(name in cls.presets, f"`name` must be one of {list(cls.presets)}, got {name!r}")
        fixed = sorted({"dim", "depth", "heads"} & set(kwargs))
        check(not fixed, f"preset {name} fixes dim, depth and heads, got {fixed} as well; "
                         f"build {cls.__name__}(dim=..., depth=..., heads=...) for a custom size")
        dim, depth, heads = cls.presets[name]
        return cls(dim=dim, depth=depth, heads=heads, **kwargs)

    @classmethod
    def from_official(cls, checkpoint, *, config: Union[Mapping[str, Any], str, None] = None, use_ema: bool = False,
                      **kwargs) -> "LlamaGen":
        """A model from an official LlamaGen GPT checkpoint, in eval mode.

        Args:
            checkpoint: a path (``torch.load(weights_only=True)``, ``argparse.Namespace`` allowed) or a
                mapping: a raw state dict (FSDP's ``consolidated.pth``) or a training checkpoint with
                ``"model"`` / ``"module"`` / ``"state_dict"`` / ``"ema"``. A stray ``freqs_cis`` is dropped.
            config: upstream ``ModelArgs`` fields by name (dim, n_layer, n_head, n_kv_head, multiple_of,
                ffn_dim_multiplier, rope_base, norm_eps, num_classes, caption_dim, class_dropout_prob,
                model_type, vocab_size, cls_token_num, block_size, dropouts, ...), plus ``gpt_model`` (a
                preset name), ``image_size`` and ``downsample_size``; or just a preset name. Fields the
                checkpoint's training ``"args"`` also give must agree with them. The RoPE grid is not
                stored in checkpoints: it comes from ``block_size`` or ``image_size / downsample_size``,
                and a disagreement between those is an error (a 384 px model needs ``block_size=576``).
            use_ema: load the ``"ema"`` weights of a training checkpoint.
            kwargs: passed to the constructor (``tokenizer``, ``caption_encoder``, ``attn_backend``).
        """
        return gpt.from_official(cls, checkpoint, config=config, use_ema=use_ema, translate=official_config, **kwargs)

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load upstream-named weights strictly; a mismatch names the upstream keys."""
        gpt.load_official_state_dict(self, state_dict, target=self._summary())

    def official_state_dict(self) -> Dict[str, Tensor]:
        """The weights under upstream's key names (without the caption encoder, which upstream lacks)."""
        return gpt.official_state_dict(self)

    # internals: inputs

    def _check_sampling(self, max_new_tokens: Optional[int], temperature: float, top_k: int, top_p: float) -> int:
        steps = default(max_new_tokens, self.num_image_tokens)
        check(0 < steps <= self.num_image_tokens,
              f"`max_new_tokens` must be in [1, {self.num_image_tokens}] (grid_size ** 2), got {steps}")
        check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p)
        return steps

    def _condition_dropout(self, batch: int, prob: Optional[float], device) -> Optional[Bool[Tensor, "b"]]:
        prob = default(prob, self.class_dropout_prob if self.training else 0.0)
        check(0.0 <= prob <= 1.0, f"`cond_drop_prob` must be in [0, 1], got {prob}")
        if prob == 0.0:
            return None
        check(self.prefix_embed.has_unconditional,
              "condition dropout needs the null class row: build the c2i model with `class_dropout_prob` > 0")
        return torch.rand(batch, device=device) < prob

    def _corrupted(self, inputs: Int[Tensor, "b n ..."]) -> Int[Tensor, "b n ..."]:
        """Teacher-forcing inputs with each position (all its codes) swapped for random codes with
        probability ``input_corruption`` in training mode; unchanged otherwise."""
        if not (self.training and self.input_corruption > 0):
            return inputs
        swap = torch.rand(inputs.shape[:2], device=inputs.device) < self.input_corruption
        swap = swap.view(*swap.shape, *(1,) * (inputs.ndim - 2))
        return torch.where(swap, torch.randint_like(inputs, self.vocab_size), inputs)

    # internals: the condition prefix

    def _prefix(self, batch: Optional[int], drop: Optional[Tensor], *, class_labels=None, caption_embeds=None,
                caption_mask=None, caption_ids=None) -> Tuple[Float[Tensor, "b p d"], Optional[Bool[Tensor, "b p"]]]:
        """Prefix embeddings and, for t2i, the prefix validity mask (None: all valid)."""
        if self.model_type == "c2i":
            check(caption_embeds is None and caption_mask is None and caption_ids is None,
                  "a c2i model is conditioned on `class_labels`, not on captions")
            labels = self.prefix_embed.check_labels(class_labels, batch, self.token_embed.weight.device)
            return self.prefix_embed(labels, drop), None
        check(class_labels is None, "a t2i model is conditioned on captions (`caption_embeds` + `caption_mask`, "
                                    "or `caption_ids`), not on `class_labels`")
        caption, mask = self._caption(batch, caption_embeds, caption_mask, caption_ids)
        return self.prefix_embed(caption, drop), (None if bool(mask.all()) else mask)

    def _caption(self, batch: Optional[int], embeds, mask, ids) -> Tuple[Tensor, Bool[Tensor, "b p"]]:
        if ids is not None:
            check(self.caption_encoder is not None, "`caption_ids` needs a `caption_encoder` (constructor argument)")
            check(embeds is None and mask is None,
                  "give `caption_ids` or `caption_embeds` (+ `caption_mask`), not both")
            check(isinstance(ids, Tensor) and ids.ndim == 2,
                  f"`caption_ids` must be integer ids [b, n], got {describe(ids)}")
            self.prefix_embed.check_length("caption_ids", ids.shape[1])  # before the encoder runs
            embeds, mask = self.caption_encoder(ids)
        return self.prefix_embed.check_caption(embeds, mask, batch)

    def _generation_prefix(self, condition, caption_mask, guide: bool):
        """``(batch, prefix, mask)``; under CFG the rows are [conditional; unconditional]."""
        kwargs = self._condition_kwargs(condition, caption_mask)
        prefix, mask = self._prefix(None, None, **kwargs)
        batch = prefix.shape[0]
        if guide:
            check(self.prefix_embed.has_unconditional,
                  "`cfg_scale` != 1 needs an unconditional prefix: build the c2i model with `class_dropout_prob` > 0 "
                  "(the null class row)")
            drop = torch.ones(batch, dtype=torch.bool, device=prefix.device)
            prefix = torch.cat((prefix, self._prefix(None, drop, **kwargs)[0]))
            mask = None if mask is None else torch.cat((mask, mask))
        return batch, prefix, mask

    def _condition_kwargs(self, condition, caption_mask) -> Dict[str, Any]:
        check(condition is not None, "`condition` is required (class ids, caption embeddings or caption ids)")
        if self.model_type == "c2i":
            check(caption_mask is None, "`caption_mask` is for t2i models")
            return {"class_labels": condition}
        if isinstance(condition, Tensor) and not condition.is_floating_point():
            check(caption_mask is None, "integer `condition` are caption ids; their mask comes from the encoder")
            return {"caption_ids": condition}
        return {"caption_embeds": condition, "caption_mask": caption_mask}

    # internals: the transformer

    def _run_chunk(self, chunk: "CodeChunk", *, cache: Optional[KVCache], write: bool,
                   block_hook=None) -> Float[Tensor, "rows c d"]:
        """The backbone over a chunk of a generation (the :class:`Decoder`'s model function)."""
        return self.backbone(chunk.embeds, layout=chunk.layout, positions=chunk.positions,
                             zero_rotation=chunk.zero_rotation, cache=cache, write_cache=write, block_hook=block_hook)

    def _transformer(self, x: Float[Tensor, "b n d"], prefix_mask: Optional[Tensor] = None, *,
                     cache=None, block_hook=None) -> Float[Tensor, "b n d"]:
        """The backbone over a chunk that starts at the cache's length (0 without a cache);
        ``block_hook(index, hidden)`` runs after every block (see :class:`Transformer`)."""
        batch, length = x.shape[:2]
        start = cache.length if cache is not None else 0
        positions, zero = llamagen_positions(self.grid_size, self.cls_token_num, device=x.device)
        positions, zero = positions[:, start:start + length], zero[:, start:start + length]
        zero = zero.expand(batch, -1) if start < self.cls_token_num else None
        layout = self._layout(prefix_mask, length) if start == 0 else None
        return self.backbone(x, layout=layout, positions=positions.expand(batch, -1, -1), zero_rotation=zero,
                             cache=cache, block_hook=block_hook)

    @staticmethod
    def _layout(prefix_mask: Optional[Tensor], length: int) -> Optional[TokenLayout]:
        """Caption padding as the backbone's padding segment: no token attends to it, and a padding
        query sees only itself (upstream's forced diagonal). None: plain causal."""
        if prefix_mask is None:
            return None
        batch, prefix = prefix_mask.shape
        segments = torch.zeros(batch, length, dtype=torch.long, device=prefix_mask.device)
        segments[:, :prefix] = torch.where(prefix_mask, 0, PADDING)
        return TokenLayout(segments, torch.full_like(segments, NO_BLOCK))

    def _init_weights(self, std: float) -> None:
        heads = set(self.code_heads.modules())
        for layer in self.modules():  # the caption encoder is attached afterwards and keeps its own init
            if isinstance(layer, (nn.Linear, nn.Embedding)) and layer not in heads:
                nn.init.normal_(layer.weight, std=std)
        self.code_heads.init_weights(std)

    def _checked_caption_encoder(self, encoder: Optional[nn.Module]) -> Optional[nn.Module]:
        if encoder is None:
            return None
        check(self.model_type == "t2i", "`caption_encoder` is for t2i models")
        width = getattr(encoder, "dim", None)
        check(width is None or width == self.prefix_embed.caption_dim,
              f"`caption_encoder` produces width {width} but `caption_dim` is {self.prefix_embed.caption_dim}")
        return encoder

    def _summary(self) -> str:
        b = self.backbone
        extra = (f"num_classes={self.prefix_embed.num_classes}" if self.model_type == "c2i"
                 else f"caption_dim={self.prefix_embed.caption_dim}")
        fields = ", ".join(filter(None, (extra, f"cls_token_num={self.cls_token_num}", self.code_heads.describe())))
        return (f"{type(self).__name__}(model_type={self.model_type!r}, dim={b.dim}, depth={b.depth}, "
                f"heads={b.heads}, kv_heads={b.kv_heads}, vocab_size={self.vocab_size}, {fields}) (check `config`)")


# condition prefixes


class ClassPrefix(nn.Module):
    """Class ids -> ``tokens`` prefix embeddings (upstream's LabelEmbedder; one token there). With
    ``dropout_prob > 0`` the table has the null class row ``num_classes``. Several tokens per class
    are one table row of ``tokens * dim``."""

    def __init__(self, *, num_classes: int, dim: int, tokens: int, dropout_prob: float):
        super().__init__()
        check(num_classes > 0, f"`num_classes` must be positive, got {num_classes}")
        self.num_classes, self.tokens = num_classes, tokens
        self.null_class = num_classes if dropout_prob > 0 else None
        self.table = nn.Embedding(num_classes + int(dropout_prob > 0), tokens * dim)

    @property
    def has_unconditional(self) -> bool:
        return self.null_class is not None

    def check_labels(self, labels, batch: Optional[int], device) -> Int[Tensor, "b"]:
        check(labels is not None, "a c2i model needs `class_labels`")
        labels = torch.as_tensor(labels, device=device)
        check(is_index_tensor(labels) and labels.ndim == 1 and labels.numel() > 0 and batch in (None, labels.shape[0]),
              f"`class_labels` must be integer class ids [batch={batch}], got {describe(labels)}")
        check_index_range("class_labels", labels, self.num_classes, bound="num_classes")
        return labels.long()

    def forward(self, labels: Int[Tensor, "b"], drop: Optional[Bool[Tensor, "b"]]) -> Float[Tensor, "b p d"]:
        if drop is not None:
            labels = torch.where(drop, self.null_class, labels)
        return rearrange(self.table(labels), "b (p d) -> b p d", p=self.tokens)


class CaptionPrefix(nn.Module):
    """Caption features -> prefix embeddings ``fc2(gelu_tanh(fc1(caption)))`` without biases
    (upstream's CaptionEmbedder). The unconditional caption is a buffer of ``tokens`` rows
    (upstream: always 120), initialised to ``randn / sqrt(caption_dim)``."""

    def __init__(self, *, caption_dim: int, dim: int, tokens: int):
        super().__init__()
        check(caption_dim > 0, f"`caption_dim` must be positive, got {caption_dim}")
        self.caption_dim, self.tokens = caption_dim, tokens
        self.fc1 = nn.Linear(caption_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)
        self.register_buffer("uncond_embedding", torch.randn(tokens, caption_dim) / math.sqrt(caption_dim))

    has_unconditional = True

    def check_length(self, name: str, length: int) -> None:
        """A caption fills at most the ``tokens`` prefix positions."""
        check(0 < length <= self.tokens, f"`{name}` must hold 1..{self.tokens} tokens (cls_token_num), got {length}")

    def check_caption(self, embeds, mask, batch: Optional[int]) -> Tuple[Float[Tensor, "b p c"], Bool[Tensor, "b p"]]:
        """Validate, zero the padding and left-pad to ``tokens``: the valid tokens are moved, in order, to
        the end (upstream's layout), since the last prefix token predicts the first image token."""
        check(isinstance(embeds, Tensor) and embeds.is_floating_point() and embeds.ndim == 3,
              f"a t2i model needs `caption_embeds` [b, m, caption_dim={self.caption_dim}], got {describe(embeds)}")
        b, m, width = embeds.shape
        check(width == self.caption_dim,
              f"`caption_embeds` must have width caption_dim={self.caption_dim}, got {width} "
              f"(shape {tuple(embeds.shape)})")
        self.check_length("caption_embeds", m)
        check(batch in (None, b), f"`caption_embeds` has batch {b}, expected {batch}")
        mask = torch.ones(b, m, dtype=torch.bool, device=embeds.device) if mask is None else mask
        check(isinstance(mask, Tensor) and tuple(mask.shape) == (b, m) and not mask.is_floating_point(),
              f"`caption_mask` must be a bool (or 0/1) tensor [{b}, {m}], got {describe(mask)}")
        weight = self.fc1.weight
        embeds = embeds.to(device=weight.device, dtype=weight.dtype)
        mask = mask.to(device=weight.device, dtype=torch.bool)
        embeds = torch.where(mask[..., None], embeds, 0)
        check_finite("caption_embeds", embeds)  # the valid tokens (padding is zeroed above)
        pad = self.tokens - m
        embeds = torch.cat((embeds.new_zeros(b, pad, width), embeds), dim=1)
        mask = torch.cat((mask.new_zeros(b, pad), mask), dim=1)
        order = torch.sort(mask.int(), dim=1, stable=True).indices  # padding first, valid tokens in order
        return embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)

    def forward(self, caption: Float[Tensor, "b p c"], drop: Optional[Bool[Tensor, "b"]]) -> Float[Tensor, "b p d"]:
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.fc2(F.gelu(self.fc1(caption), approximate="tanh"))


class CaptionEncoder(Checkpointable, nn.Module):
    """A small trainable caption encoder: x-transformers ``TransformerWrapper`` + ``Encoder`` over
    caption token ids, returning ``(embeddings [b, n, dim] with padding zeroed, mask [b, n])``.
    A light stand-in for upstream's frozen FLAN-T5 features that trains end to end with the GPT;
    ``encoder_kwargs`` go to ``Encoder`` (e.g. ``rotary_pos_emb=True``, ``attn_dim_head=32``)."""

    def __init__(self, *, num_tokens: int, dim: int = 256, depth: int = 2, heads: int = 4, max_seq_len: int = 120,
                 pad_id: int = 0, **encoder_kwargs):
        super().__init__()
        from x_transformers import Encoder, TransformerWrapper

        check(num_tokens > 0 and dim > 0 and max_seq_len > 0,
              f"`num_tokens`, `dim` and `max_seq_len` must be positive, got {num_tokens}, {dim}, {max_seq_len}")
        self.num_tokens, self.dim, self.max_seq_len, self.pad_id = num_tokens, dim, max_seq_len, pad_id
        self.net = TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len, return_only_embed=True,
                                      attn_layers=Encoder(dim=dim, depth=depth, heads=heads, **encoder_kwargs))

    def forward(self, ids: Int[Tensor, "b n"]) -> Tuple[Float[Tensor, "b n d"], Bool[Tensor, "b n"]]:
        check(isinstance(ids, Tensor) and not ids.is_floating_point() and ids.ndim == 2
              and 0 < ids.shape[1] <= self.max_seq_len,
              f"`caption_ids` must be integer ids [b, n <= {self.max_seq_len}], got {describe(ids)}")
        check_index_range("caption_ids", ids, self.num_tokens, bound="num_tokens")
        mask = ids != self.pad_id
        embeds = self.net(ids, mask=mask, return_embeddings=True)
        return embeds.masked_fill(~mask[..., None], 0.0), mask


# one generation


@dataclasses.dataclass
class CodeChunk(SequenceChunk):
    """Consecutive positions of a generation as the backbone takes them (see :class:`Decoder`)."""

    embeds: Float[Tensor, "rows c d"]
    positions: Int[Tensor, "rows c 2"]
    zero_rotation: Bool[Tensor, "rows c"]
    layout: Optional[TokenLayout] = None  # caption padding in the prefix; None: plain causal

    @classmethod
    def at(cls, table: Tuple[Tensor, Tensor], start: int, embeds: Tensor,
           layout: Optional[TokenLayout] = None) -> "CodeChunk":
        """``embeds`` placed at ``start``; ``table``: the sequence's positions and zero-rotation flags
        (:func:`llamagen_positions`, built once per generation)."""
        rows, end = embeds.shape[0], start + embeds.shape[1]
        positions, zero = table
        return cls(embeds, positions[:, start:end].expand(rows, -1, -1), zero[:, start:end].expand(rows, -1), layout)

