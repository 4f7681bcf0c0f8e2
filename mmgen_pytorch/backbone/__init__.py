from .attention import Attention, AttentionMask, attend, eager_flex_attention, flex_available
from .decoding import Decoder, SequenceChunk
from .kv_cache import CacheWindow, KVCache
from .masks import NO_BLOCK, PADDING, TokenLayout, visible
from .norms import RMSNorm, make_norm
from .positions import RotaryEmbedding, RotaryTable, grid_positions, llamagen_positions, sequence_positions
from .transformer import Block, FeedForward, Transformer, swiglu_hidden_dim

__all__ = [
    "Attention", "AttentionMask", "attend", "eager_flex_attention", "flex_available", "CacheWindow", "Decoder", "SequenceChunk", "KVCache", "NO_BLOCK", "PADDING", "TokenLayout",
    "visible", "RMSNorm", "make_norm", "RotaryEmbedding", "RotaryTable", "grid_positions", "llamagen_positions",
    "sequence_positions", "Block", "FeedForward", "Transformer", "swiglu_hidden_dim",
]
