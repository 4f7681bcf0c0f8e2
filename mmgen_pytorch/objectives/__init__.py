from .flow import RectifiedFlow, TimeEmbedding

__all__ = ["RectifiedFlow", "TimeEmbedding"]
