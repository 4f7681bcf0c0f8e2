from .enc_dec import EncDecLayers, TrainableEncDec
from .modalities import LinearLayers, ModalityFormat, ModalityLayers, ModalitySpec
from .model import LossBreakdown, TextLoss, Transfusion, print_modality_sample
from .noising import random_modality_length_to_time_fn
from .packing import Positions, UncondText, Vocabulary
from .patches import PatchedLatents, PatchLayers
from .self_flow import SelfMaskedRepTraining
from .time_injection import InputAdaLN, PerBlockAdaLN, TimeInjection, TimeToken

__all__ = ["EncDecLayers", "InputAdaLN", "LinearLayers", "LossBreakdown", "ModalityFormat", "ModalityLayers",
           "ModalitySpec", "PatchLayers", "PatchedLatents", "PerBlockAdaLN", "Positions", "SelfMaskedRepTraining",
           "TextLoss", "TimeInjection", "TimeToken", "TrainableEncDec", "Transfusion", "UncondText", "Vocabulary",
           "print_modality_sample", "random_modality_length_to_time_fn"]
