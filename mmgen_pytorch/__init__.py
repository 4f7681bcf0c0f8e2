"""mmgen_pytorch: Transfusion and its siblings on one shared transformer backbone."""

from .backbone import KVCache, TokenLayout, Transformer
from .transfusion import LossBreakdown, Transfusion, print_modality_sample

__version__ = "0.1.0"

__all__ = ["KVCache", "LossBreakdown", "TokenLayout", "Transformer", "Transfusion", "print_modality_sample",
           "__version__"]
