from .model import LossBreakdown, Transfusion, print_modality_sample
from .packing import Vocabulary

__all__ = ["LossBreakdown", "Transfusion", "Vocabulary", "print_modality_sample"]
