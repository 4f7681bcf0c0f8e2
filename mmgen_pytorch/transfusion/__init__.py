from .modalities import LinearLayers, ModalityFormat, ModalityLayers, ModalitySpec
from .model import LossBreakdown, TextLoss, Transfusion, print_modality_sample
from .noising import random_modality_length_to_time_fn
from .packing import Positions, UncondText, Vocabulary
from .patches import PatchedLatents, PatchLayers
from .time_injection import InputAdaLN, PerBlockAdaLN, TimeInjection, TimeToken

__all__ = ["InputAdaLN", "LinearLayers", "LossBreakdown", "ModalityFormat", "ModalityLayers", "ModalitySpec",
           "PatchLayers", "PatchedLatents", "PerBlockAdaLN", "Positions", "TextLoss", "TimeInjection", "TimeToken",
           "Transfusion", "UncondText", "Vocabulary", "print_modality_sample",
           "random_modality_length_to_time_fn"]
