"""The one place that knows how each supported transformers version names the internals vtoolkit hooks.

vtoolkit works through hooks on stock Hugging Face models, so it reads a few names that transformers does not
promise to keep. Every such name lives here; nothing else in vtoolkit branches on a transformers version.

=====================================  =======================  ======================================
what                                   transformers 5.23        5.24, 5.25 (+ deprecated alias)
=====================================  =======================  ======================================
KV-cache argument of model / layer     ``past_key_values``      ``cache`` (``past_key_values`` accepted
forwards (what hooks see in kwargs)                             until 5.40 and renamed by a decorator
                                                                *inside* forward, so a pre-hook can
                                                                still see the old name)
KV-cache field of model outputs        ``past_key_values``      ``cache``
vision-encoder field of VLM outputs    ``image_hidden_states``  ``image_outputs``
per-layer tensors of a DynamicCache    ``cache.layers[i].keys`` / ``.values`` (both)
per-row fields of model outputs       ``hidden_states``, ``attentions`` (both)
collector of the output-capturing     ``transformers.utils.output_capturing._active_collector``
hooks (``output_hidden_states``)      (a context variable; both)
=====================================  =======================  ======================================

Tested range: :data:`TESTED_RANGE` (also declared in ``pyproject.toml``; CI runs the suite on both ends). Outside it
:func:`check_transformers_version` warns once per process, naming the range; and whatever the version, a cache passed
under a name this module does not know raises :class:`UnsupportedTransformersError` instead of letting a method
mistake every decode step for a new prefill (the silent failure that 5.24's rename caused in vtoolkit 0.1.0).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Mapping
from typing import Any

# The declared range; keep in sync with pyproject.toml (a test checks that they agree).
MIN_VERSION = "5.23"
MAX_VERSION_EXCLUSIVE = "5.26"
TESTED_RANGE = f">={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE}"

# Newest name first.
CACHE_KWARGS = ("cache", "past_key_values")
CACHE_OUTPUT_FIELDS = ("cache", "past_key_values")
IMAGE_OUTPUT_FIELDS = ("image_outputs", "image_hidden_states")
# Fields of a model output with one entry per row that a side stream's extra rows reach (tuples of [rows, ...]).
PER_ROW_OUTPUT_FIELDS = ("hidden_states", "attentions")
# The context variable whose collector transformers' output-capturing hooks (output_hidden_states / _attentions) fill.
OUTPUT_COLLECTOR = ("transformers.utils.output_capturing", "_active_collector")

_warned = False
_collector = None   # OUTPUT_COLLECTOR, looked up once


class UnsupportedTransformersError(RuntimeError):
    """transformers changed an internal that vtoolkit's hooks rely on; the message names the version and the fix."""


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():   # 5.25.0rc1 / 5.25.0.dev0: stop at the first non-numeric part
            break
    return tuple(out)


def transformers_version() -> str | None:
    """The installed transformers version (read from package metadata: does not import transformers)."""
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # noqa: BLE001 - not installed / broken metadata
        return None


def in_tested_range(version: str | None) -> bool:
    if version is None:
        return False
    v = _version_tuple(version)
    return _version_tuple(MIN_VERSION) <= v < _version_tuple(MAX_VERSION_EXCLUSIVE)


def support_hint(version: str | None = None) -> str:
    version = version or transformers_version()
    return (f"vtoolkit is tested with transformers {TESTED_RANGE} and this is transformers {version}; install a "
            f"tested version (pip install 'transformers{TESTED_RANGE}') or report the incompatibility")


def check_transformers_version(*, stacklevel: int = 2) -> bool:
    """Warn once per process when the installed transformers is outside :data:`TESTED_RANGE`; True when inside."""
    global _warned
    version = transformers_version()
    ok = in_tested_range(version)
    if not ok and not _warned:
        _warned = True
        warnings.warn(f"vtoolkit: transformers {version} is outside the tested range {TESTED_RANGE}. Methods hook "
                      f"transformers internals; vtoolkit raises when a hook did not run as designed, but untested "
                      f"versions may fail. Install 'transformers{TESTED_RANGE}' for supported results.",
                      RuntimeWarning, stacklevel=stacklevel)
    return ok


# --------------------------------------------------------------------------------------------------- KV cache
def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


def get_cache(kwargs: Mapping[str, Any]):
    """The KV cache a model / layer forward was called with (``None`` when it has none), under either name.

    A :class:`transformers.Cache` passed under a name this module does not know means transformers renamed the
    argument again: raise instead of treating the call as cache-less (every decode step would look like a prefill).
    """
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    for name, value in kwargs.items():
        if _is_cache(value):
            raise UnsupportedTransformersError(
                f"a KV cache was passed as {name!r}, a name vtoolkit does not know (known: {', '.join(CACHE_KWARGS)}); "
                f"{support_hint()}")
    return None


def cache_param(module) -> str:
    """The name of the cache parameter of ``module.forward`` (to pass a cache to a nested call)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise UnsupportedTransformersError(f"{type(module).__name__}.forward takes none of the cache arguments vtoolkit "
                                       f"knows ({', '.join(CACHE_KWARGS)}); {support_hint()}")


def cache_length(cache, layer: int | None = None) -> int:
    """Tokens held by ``cache`` (in ``layer`` when given); 0 for ``None``."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))
    try:  # legacy tuple cache
        return int(cache[0 if layer is None else layer][0].shape[-2])
    except Exception:  # noqa: BLE001  pragma: no cover
        return 0


def cache_layer_tensors(cache) -> list[tuple]:
    """``[(keys, values)]`` per layer of a ``DynamicCache`` (``[B, H_kv, L, d]`` each)."""
    return [(layer.keys, layer.values) for layer in _cache_layers(cache)]


def set_cache_layer_tensors(cache, layer: int, keys, values) -> None:
    """Replace one layer's cached keys / values (e.g. to join a second stream's rows)."""
    entry = _cache_layers(cache)[layer]
    entry.keys, entry.values = keys, values


def _cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None or (layers and not hasattr(layers[0], "keys")):
        raise UnsupportedTransformersError(f"{type(cache).__name__} has no per-layer keys/values where vtoolkit "
                                           f"expects them (cache.layers[i].keys); {support_hint()}")
    return layers


def cache_layer_kv(cache, layer: int):
    """``(keys, values)`` ``[B, H, len, d]`` of ``layer`` when it is a plain growing layer (``DynamicCache``'s
    ``DynamicLayer``, the same in 5.23 to 5.25) whose tensors may be replaced (:func:`set_cache_layer_tensors`);
    ``None`` for any other kind of layer or cache (static, sliding, quantized, offloaded, legacy tuples), which
    callers then leave untouched."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= layer < len(layers) or getattr(cache, "offloading", False):
        return None
    lay = layers[layer]
    if type(lay) is not DynamicLayer or not lay.is_initialized or lay.keys is None:
        return None
    return lay.keys, lay.values


def output_cache(outputs):
    """The KV cache field of a model output, under either name."""
    return _first_field(outputs, CACHE_OUTPUT_FIELDS)


def output_image_features(outputs):
    """The vision-encoder field of a VLM output (``image_outputs`` / ``image_hidden_states``)."""
    return _first_field(outputs, IMAGE_OUTPUT_FIELDS)


def _first_field(outputs, names):
    import dataclasses

    if dataclasses.is_dataclass(outputs):      # a ModelOutput: read the name its class declares (the old name is a
        declared = {f.name for f in dataclasses.fields(outputs)}    # deprecated alias that warns)
        names = [n for n in names if n in declared] or names
    for name in names:
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------------------------------------- output capture
@contextlib.contextmanager
def outputs_not_captured():
    """Run the block with transformers' output capturing switched off: a nested call of a decoder layer or attention
    module (a side stream's rows) is then not recorded into the ``hidden_states`` / ``attentions`` that the enclosing
    forward returns for ``output_hidden_states`` / ``output_attentions``. A nested *model* call still collects its own
    outputs (its decorator sets a collector of its own). Raises when the collector is not where this module expects
    it, instead of letting side rows reach the user's outputs."""
    global _collector
    if _collector is None:
        module, name = OUTPUT_COLLECTOR
        try:
            _collector = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise UnsupportedTransformersError(f"transformers' output collector {module}.{name} is missing: a side "
                                               f"stream cannot keep its rows out of hidden_states / attentions; "
                                               f"{support_hint()}") from None
    collector = _collector
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


# Attention implementations every transformers version takes without a registry entry.
BUILTIN_ATTENTION = ("eager", "sdpa")


def attention_implementations() -> list[str]:
    """The names ``attn_implementation`` / ``model.set_attn_implementation`` accept: ``eager``, ``sdpa`` and
    every entry of transformers' attention-function registry (``AttentionInterface``: flash_attention_2/3/4,
    flex_attention, paged|eager, ...), less the ``vtoolkit_*`` dispatchers vtoolkit registers itself (an
    implementation detail of method hooks, see :mod:`vtoolkit.hooks.attention`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vtoolkit.hooks.attention import PREFIX

    names = [*BUILTIN_ATTENTION, *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    return [n for n in dict.fromkeys(names) if not n.startswith(PREFIX)]
