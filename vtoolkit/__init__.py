"""vtoolkit: training-free visual-token pruning and hallucination mitigation for stock Hugging Face multimodal LLMs.

>>> import vtoolkit as vt
>>> model, processor = vt.models.tiny.build("llava")
>>> h = vt.apply_method(model, "fastervlm", keep_ratio=0.25)
>>> # model.generate(**inputs) now prunes; h.stats says what was kept; h.remove() restores the model.
"""
from vtoolkit import models
from vtoolkit.api import MethodHandle, active_handles, apply_method
from vtoolkit.config import MethodConfig
from vtoolkit.registry import get_method, list_methods, register_method

__version__ = "0.1.0"


def get_config_class(name: str):
    """The config dataclass of a registered method."""
    return get_method(name).config_cls


__all__ = ["apply_method", "MethodHandle", "active_handles", "list_methods", "get_method", "get_config_class",
           "register_method", "MethodConfig", "models", "__version__"]
