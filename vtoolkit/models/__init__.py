"""Model adapters (one per architecture family), offline tiny models and the shipped reference model."""
from vtoolkit.models import internvl, llava, llava_onevision, qwen, reference, tiny  # noqa: F401  (register adapters)
from vtoolkit.models.base import ImageSpan, ModelAdapter, get_adapter, unwrap

__all__ = ["ImageSpan", "ModelAdapter", "get_adapter", "unwrap", "reference", "tiny"]
