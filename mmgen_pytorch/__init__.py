"""mmgen_pytorch: Transfusion and its siblings on one shared transformer backbone."""

from .backbone import KVCache, TokenLayout, Transformer

__version__ = "0.1.0"

__all__ = ["KVCache", "TokenLayout", "Transformer", "__version__"]
