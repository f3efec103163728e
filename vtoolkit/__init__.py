"""vtoolkit: training-free visual-token pruning and hallucination mitigation for stock Hugging Face multimodal LLMs.

>>> import vtoolkit as vt
>>> model, processor = vt.models.tiny.build("llava")
>>> h = vt.apply_method(model, "fastervlm", keep_ratio=0.25)
>>> # model.generate(**inputs) now prunes; h.stats says what was kept; h.remove() restores the model.

Attributes are imported lazily so that torch-free parts (the scorers, ``vtoolkit score``) start fast.
"""
from __future__ import annotations

import importlib

from vtoolkit.compat import TESTED_RANGE, check_transformers_version

__version__ = "0.1.0"

check_transformers_version(stacklevel=2)   # warns once when transformers is outside TESTED_RANGE

_LAZY = {
    "apply_method": "vtoolkit.api", "MethodHandle": "vtoolkit.api", "active_handles": "vtoolkit.api",
    "list_methods": "vtoolkit.registry", "get_method": "vtoolkit.registry", "register_method": "vtoolkit.registry",
    "MethodConfig": "vtoolkit.config",
}
_SUBMODULES = ("models", "hooks", "methods", "kernels", "eval", "bench", "config", "registry", "api")


def get_config_class(name: str):
    """The config dataclass of a registered method."""
    from vtoolkit.registry import get_method

    return get_method(name).config_cls


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"vtoolkit.{name}")
    else:
        raise AttributeError(f"module 'vtoolkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["TESTED_RANGE", "apply_method", "MethodHandle", "active_handles", "list_methods", "get_method", "get_config_class",
           "register_method", "MethodConfig", "models", "__version__"]
