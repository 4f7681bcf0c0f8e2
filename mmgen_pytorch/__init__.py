"""mmgen_pytorch: Transfusion and its siblings on one shared transformer backbone."""

from .backbone import KVCache, TokenLayout, Transformer
from .checkpoint import load_training_state, save_training_state
from .diffloss import DiffLoss
from .dnd import DnDTransformer
from .llamagen import CaptionEncoder, LlamaGen
from .mar import MAR
from .monoformer import MonoFormer
from .objectives import ContinuousObjective, GaussianDiffusion, GaussianObjective, RectifiedFlow
from .saving import Checkpointable, load_model
from .tokenizers import RQVAE, VQVAE, AutoencoderKL
from .transfusion import (LossBreakdown, ModalitySpec, PatchedLatents, Positions, SelfMaskedRepTraining, TextLoss,
                          TrainableEncDec, Transfusion, UncondText, print_modality_sample)

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL", "CaptionEncoder", "Checkpointable", "ContinuousObjective", "DiffLoss", "DnDTransformer",
    "GaussianDiffusion", "GaussianObjective", "KVCache", "LlamaGen", "LossBreakdown", "MAR", "ModalitySpec", "MonoFormer",
    "PatchedLatents", "Positions", "RQVAE", "RectifiedFlow", "SelfMaskedRepTraining", "TextLoss", "TokenLayout", "TrainableEncDec",
    "Transformer", "Transfusion",
    "UncondText", "VQVAE", "load_model", "load_training_state",
    "print_modality_sample", "save_training_state",
    "__version__",
]
