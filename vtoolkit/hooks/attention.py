"""Attention interception without switching the model to eager.

transformers 5.x attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
mask, ...)`` with post-RoPE ``q [B, H, Lq, d]`` and ``k, v [B, H_kv, Lk, d]``. We register one dispatcher per base
implementation under the name ``vtoolkit_<base>`` (``vtoolkit_sdpa``, ``vtoolkit_eager``,
``vtoolkit_flash_attention_2``...), together with the base's mask builder, and switch a sub-model's config to it.
The dispatcher looks up the interceptors attached to *that module instance* (a weak map, so two models in one process
carry different methods) and otherwise calls the base implementation unchanged, so un-intercepted layers keep
SDPA/flash and stay bit-exact.

An interceptor is ``fn(module, query, key, value, attention_mask, kwargs) -> None | (out, weights)``: returning
``None`` observes only (e.g. computes one CLS row of scores from q/k); returning a tuple replaces the attention.
Every interceptor of a module sees every call (an observer of one method still runs when another method replaces
that module's attention); at most one may replace it in a call, two raise. :func:`base_attention` is the function
un-intercepted calls run, for an interceptor that replaces part of the work (some query rows) and leaves the rest
to it.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

PREFIX = "vtoolkit_"
_INTERCEPTORS: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()
_REGISTERED: set[str] = set()
# config object id -> [config, base implementation, number of users]
_SWITCHED: dict[int, list] = {}


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference eager attention (GQA-aware) returning ``(out [B, Lq, H, d], probs [B, H, Lq, Lk])``."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask[:, :, :, : key.shape[-2]], torch.finfo(w.dtype).min)
        else:
            w = w + attention_mask[:, :, :, : key.shape[-2]]
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(p, value).transpose(1, 2).contiguous()
    return out, p


def _base_function(base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager" or base not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return eager_attention
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_dispatcher(base: str) -> Callable:
    def dispatch(module, query, key, value, attention_mask, **kwargs):
        result = None
        for fn in tuple(_INTERCEPTORS.get(module, ())):
            res = fn(module, query, key, value, attention_mask, kwargs)
            if res is not None:
                if result is not None:
                    raise RuntimeError(f"two attention interceptors replaced the attention of {type(module).__name__} "
                                       f"(layer {getattr(module, 'layer_idx', '?')}) in one call: the methods that "
                                       f"installed them cannot be composed")
                result = res
        if result is not None:
            return result
        return _base_function(base)(module, query, key, value, attention_mask, **kwargs)

    dispatch.__name__ = f"{PREFIX}{base}"
    return dispatch


def _ensure_registered(base: str) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_dispatcher(base))
        mask_key = base if base in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys() else "eager"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_key])
        _REGISTERED.add(name)
    return name


def base_attention(config) -> Callable:
    """The attention function that un-intercepted calls of the modules under ``config`` run (``sdpa``, eager...)."""
    return _base_function(current_implementation(config))


def current_implementation(config) -> str:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return impl[len(PREFIX):] if impl.startswith(PREFIX) else impl


def intercept(hooks, config, modules, fn: Callable) -> None:
    """Attach ``fn`` to each attention module in ``modules`` (all sharing ``config``), via ``hooks`` (removable).

    The first interceptor on a config switches it to ``vtoolkit_<base>``; the last one removed switches it back.
    """
    key = id(config)
    entry = _SWITCHED.get(key)
    if entry is None:
        base = current_implementation(config)
        name = _ensure_registered(base)
        entry = _SWITCHED[key] = [config, base, 0]
        config._attn_implementation = name
    entry[2] += 1
    mods = list(modules)

    def interceptor(*args):          # inactive while the handle is disabled: the base attention runs untouched
        return fn(*args) if hooks.active else None

    for m in mods:
        _INTERCEPTORS.setdefault(m, []).append(interceptor)

    def restore():
        for m in mods:
            lst = _INTERCEPTORS.get(m)
            if lst is not None:
                try:
                    lst.remove(interceptor)
                except ValueError:
                    pass
                if not lst:
                    del _INTERCEPTORS[m]
        entry[2] -= 1
        if entry[2] == 0:
            entry[0]._attn_implementation = entry[1]
            _SWITCHED.pop(key, None)

    hooks.on_remove(restore)


def interceptor_count() -> int:
    """Total interceptors alive in this process (leak checks)."""
    return sum(len(v) for v in _INTERCEPTORS.values())
