from .._utils import exists
from .enc_dec import EncDecLayers, TrainableEncDec
from .helpers import apply_fn_modality_type, filter_with_inverse, flex_attention, stack_same_shape_tensors_with_inverse
from .modalities import LinearLayers, ModalityFormat, ModalityLayers, ModalitySpec
from .model import LossBreakdown, ModalityInfo, TextLoss, Transfusion, print_modality_sample
from .noising import random_modality_length_to_time_fn
from .packing import Positions, UncondText, Vocabulary
from .patches import PatchedLatents, PatchLayers
from .sampler import LengthBudget
from .self_flow import SelfMaskedRepTraining
from .time_injection import InputAdaLN, PerBlockAdaLN, TimeInjection, TimeToken

__all__ = ["EncDecLayers", "InputAdaLN", "LengthBudget", "LinearLayers", "LossBreakdown", "ModalityFormat",
           "ModalityInfo", "ModalityLayers", "ModalitySpec", "PatchLayers", "PatchedLatents", "PerBlockAdaLN",
           "Positions", "SelfMaskedRepTraining", "TextLoss", "TimeInjection", "TimeToken", "TrainableEncDec",
           "Transfusion", "UncondText", "Vocabulary", "apply_fn_modality_type", "exists", "filter_with_inverse",
           "flex_attention", "print_modality_sample", "random_modality_length_to_time_fn",
           "stack_same_shape_tensors_with_inverse"]
