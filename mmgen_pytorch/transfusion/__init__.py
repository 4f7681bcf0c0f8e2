from .._utils import exists
from .helpers import apply_fn_modality_type, filter_with_inverse, flex_attention, stack_same_shape_tensors_with_inverse
from .modalities import LinearLayers, ModalityFormat, ModalityLayers, ModalitySpec
from .model import LossBreakdown, ModalityInfo, TextLoss, Transfusion, print_modality_sample
from .packing import Positions, UncondText, Vocabulary
from .patches import PatchedLatents, PatchLayers
from .sampler import LengthBudget
from .time_injection import InputAdaLN, PerBlockAdaLN, TimeInjection, TimeToken

__all__ = ["InputAdaLN", "LengthBudget", "LinearLayers", "LossBreakdown", "ModalityFormat", "ModalityInfo",
           "ModalityLayers", "ModalitySpec", "PatchLayers", "PatchedLatents", "PerBlockAdaLN", "Positions", "TextLoss",
           "TimeInjection", "TimeToken", "Transfusion", "UncondText", "Vocabulary", "apply_fn_modality_type", "exists",
           "filter_with_inverse", "flex_attention", "print_modality_sample", "stack_same_shape_tensors_with_inverse"]
