"""Model adapters (one per architecture family) and offline tiny models."""
from vtoolkit.models import llava, qwen, tiny  # noqa: F401  (register adapters)
from vtoolkit.models.base import ImageSpan, ModelAdapter, get_adapter, unwrap

__all__ = ["ImageSpan", "ModelAdapter", "get_adapter", "unwrap", "tiny"]
