"""Checks of user settings that run before any model is built: model name, method and options, dtype, counts.

Every check raises :class:`vtoolkit.config.ConfigError` with a message that names the setting and the fix; callers
prefix it with the option as the user wrote it (``--set``, ``sweep.yaml: methods[1]``). :class:`Collector` gathers
the problems of many checks so that a sweep reports all of them at once.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vtoolkit.config import ConfigError

DTYPES = ("auto", "float16", "bfloat16", "float32")


class Collector:
    """Collects the problems of several checks: ``with c.check("prefix: "): ...`` records a ConfigError's problems
    (prefixed) instead of raising; :meth:`raise_if_any` raises them together, each once, in order."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    @contextlib.contextmanager
    def check(self, prefix: str = "") -> Iterator[None]:
        try:
            yield
        except ConfigError as e:
            self.problems.extend(prefix + p for p in e.problems)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(list(dict.fromkeys(self.problems)))


def positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer >= 1 (or None when allowed); else ConfigError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_dtype(dtype: Any, name: str = "dtype") -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"{name} {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return dtype


# accelerate's placement strategies: a model of one device (tiny:ARCH) goes to the first GPU, else stays on the CPU
PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_attn_implementation(impl: Any, name: str = "attn_implementation") -> str | None:
    """``impl`` if it is None or a name transformers can run (:func:`vtoolkit.compat.attention_implementations`:
    eager, sdpa and its registry of attention functions); ConfigError listing the names otherwise."""
    if impl is None:
        return None
    from vtoolkit.compat import attention_implementations

    known = attention_implementations()
    if not isinstance(impl, str) or impl not in known:
        import difflib

        close = difflib.get_close_matches(str(impl), known, n=1) if isinstance(impl, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} {impl!r} is not an attention implementation transformers knows.{hint} Choose one "
                          f"of {', '.join(known)}")
    return impl


def check_device_map(device_map: Any, name: str = "device_map", *, tiny: bool = False) -> Any:
    """``device_map`` if this machine can place a model that way; ConfigError otherwise.

    None (one device per process), a placement strategy (:data:`PLACEMENTS`), or one device (``cpu``, ``cuda``,
    ``cuda:1``, ``mps``) that exists here; a mapping of module names to devices for checkpoints (accelerate's
    ``device_map`` dict), not for ``tiny:`` models (``tiny=True``), which run on one device."""
    if device_map is None or device_map in PLACEMENTS:
        return device_map
    if isinstance(device_map, Mapping):
        if tiny:
            raise ConfigError(f"{name}: a tiny: model runs on one device; give one (cpu, cuda:0) or auto")
        return device_map
    import torch

    try:
        dev = torch.device(device_map) if isinstance(device_map, str) else None
    except (RuntimeError, ValueError):
        dev = None
    if dev is None:
        raise ConfigError(f"{name} {device_map!r} is not a device nor a placement; give one device (cpu, cuda, "
                          f"cuda:0) or one of {', '.join(PLACEMENTS)}")
    if dev.type == "cpu":
        return device_map
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
    if not available:
        raise ConfigError(f"{name} {device_map!r}: this machine has no {dev.type.upper()} device "
                          f"(torch.{'backends.mps' if dev.type == 'mps' else dev.type}.is_available() is False); "
                          f"leave {name} out or pass cpu to run on the CPU")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ConfigError(f"{name} {device_map!r}: this machine has {count()} {dev.type.upper()} device(s) "
                          f"({dev.type}:0 .. {dev.type}:{count() - 1})")
    return device_map


# ------------------------------------------------------------------------------------------------ methods
def supported_model_types(method: str) -> list[str]:
    """The HF model types (``config.model_type``) with a vtoolkit adapter that ``method`` supports."""
    from vtoolkit.registry import adapter_class_for, get_method
    from vtoolkit.registry import supported_model_types as all_types

    archs = get_method(method).architectures
    return [t for t in all_types() if "*" in archs or t in archs or adapter_class_for(t).family in archs]


def methods_markdown(rows: list[Mapping[str, Any]]) -> str:
    """The README's Markdown table: each method (rows of ``vt.list_methods()``) and the model types it supports."""
    from vtoolkit.registry import supported_model_types as all_types

    lines = ["| method | kind | stage | model types |", "|---|---|---|---|"]
    for r in rows:
        types_ = supported_model_types(r["name"])
        every = "*" in r["architectures"] or types_ == all_types()
        shown = f"any ({', '.join(types_)})" if every else ", ".join(types_)
        lines.append(f"| `{r['name']}` | {r['kind']} | {r['stage']} | {shown or '-'} |")
    return "\n".join(lines) + "\n"


def method_name(method: Any) -> str:
    """The registered name of ``method`` (a name or an alias); ConfigError with the closest name otherwise."""
    from vtoolkit.registry import get_method

    try:
        return get_method(method).name
    except (KeyError, TypeError) as e:
        raise ConfigError(str(e.args[0]) if e.args else str(e)) from None


def method_config(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The resolved config of the registered ``method`` with ``options`` (defaults included), as a dict.

    The options are checked against the method's config class: names (did-you-mean), types (see
    :mod:`vtoolkit.config`) and the method's own ``validate`` (ranges, combinations); ConfigError otherwise."""
    from vtoolkit.registry import get_method

    cls = get_method(method).config_cls
    if not isinstance(options, (Mapping, type(None))):
        raise ConfigError(f"{method} options must be name: value pairs, got {options!r}")
    opts = dict(options or {})
    try:
        cls.check_keys(opts)
        return cls(**opts).to_dict()
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{method}: {e}") from None


def check_method_model(method: str, model_type: str | None) -> None:
    """ConfigError when ``method`` does not support models of ``model_type`` (None: unknown, not checked)."""
    if model_type is None:
        return
    from vtoolkit.registry import supported_model_types as all_types

    if model_type not in all_types():
        raise ConfigError(f"vtoolkit has no adapter for model_type {model_type!r}; supported: "
                          f"{', '.join(all_types())}")
    ok = supported_model_types(method)
    if model_type not in ok:
        raise ConfigError(f"method {method!r} does not support {model_type!r} models; it supports "
                          f"{', '.join(ok) or 'none'} (vtoolkit list)")


# ------------------------------------------------------------------------------------------------ models
def _model_type_from(config_json: Path) -> str | None:
    try:
        mt = json.loads(config_json.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return mt if isinstance(mt, str) else None


def check_model(model: Any, name: str = "model") -> str | None:
    """The ``config.model_type`` of the model ``model`` names, when it can be known without loading it (None when
    not); ConfigError for a model that cannot load: an unknown ``tiny:`` name, a missing local folder, a hub id
    that is not in the local cache while ``HF_HUB_OFFLINE=1``."""
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{name} must be a checkpoint path, a hub id, tiny:ARCH or ref:shapes, got {model!r}")
    from vtoolkit.models import reference

    if reference.is_reference(model):
        try:
            model = reference.resolve(model)   # the package folder of ref:shapes, checked like any local folder
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{name}: {e}") from None
    if model.startswith("tiny:"):
        from vtoolkit.models.tiny import ARCHS

        arch = model.split(":", 1)[1]
        if arch not in ARCHS:
            raise ConfigError(f"{name} {model!r}: unknown tiny model; choose one of "
                              f"{', '.join('tiny:' + a for a in ARCHS)}")
        return arch
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name} {model!r}: a local checkpoint folder needs a config.json")
        return _model_type_from(path / "config.json")
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ConfigError(f"{name} {model!r}: no such folder")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:   # not a valid repo id
            raise ConfigError(f"{name} {model!r}: not a local folder nor a hub id (org/name)") from None
        if not isinstance(cached, str):
            raise ConfigError(f"{name} {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
                              f"download it first or give a local folder")
        return _model_type_from(Path(cached))
    return None
