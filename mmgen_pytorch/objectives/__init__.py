from .base import ContinuousObjective
from .flow import RectifiedFlow, TimeEmbedding
from .gaussian import GaussianDiffusion, GaussianObjective

__all__ = ["ContinuousObjective", "GaussianDiffusion", "GaussianObjective", "RectifiedFlow", "TimeEmbedding"]
