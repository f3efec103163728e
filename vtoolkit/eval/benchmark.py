"""The benchmark interface and registry: one file per benchmark, the runner knows none by name.

A benchmark is a small class registered with :func:`register_benchmark` (the twin of
:func:`vtoolkit.registry.register_method`). It owns everything that differs between benchmarks:

- the data **layouts** it reads, how one is detected from a path (:meth:`Benchmark.detect_layout`) and how the
  records are built (:meth:`Benchmark.load`: a :class:`~vtoolkit.eval.datasets.Dataset` of light records; a record
  without an image is built with :func:`~vtoolkit.eval.datasets.text_only_ref` and runs as a text-only prompt);
- the default **protocol** (prompt, generation settings, scorer rule: :class:`~vtoolkit.eval.protocol.Protocol`),
  the scorer rule variants (:attr:`Benchmark.rules`) and the zero-division modes it accepts;
- ``--limit N`` (:meth:`Benchmark.select`: the first N by default);
- **scoring** (:meth:`Benchmark.score`: valid prediction rows -> a metrics dict with ``headline``,
  ``headline_name`` and ``higher_is_better``) and the files it writes into a run folder (:attr:`artifacts`);
- the **report**: headline name, unit, secondary metrics (:attr:`metrics`: ``(column, path into the metrics)``);
- optionally a ``vtoolkit score NAME`` sub-command (:meth:`Benchmark.add_score_command`).

Built-in benchmarks live in ``vtoolkit/eval/benchmarks/``; a package outside the repository adds one through the
entry-point group ``vtoolkit.benchmarks`` (the value names a module that calls :func:`register_benchmark`, or a
:class:`Benchmark` subclass). ``docs/benchmark-authors.md`` walks through writing one.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from vtoolkit.config import ConfigError

__all__ = ["Benchmark", "get_benchmark", "list_benchmarks", "register_benchmark"]

ENTRY_POINT_GROUP = "vtoolkit.benchmarks"
_REGISTRY: dict[str, Benchmark] = {}
_loaded = False


class Benchmark:
    """Base class of a benchmark (see the module docstring). Subclasses set the class attributes and override
    :meth:`load` and :meth:`score`; everything else has a default."""

    name: ClassVar[str] = ""                   # set by register_benchmark
    title: ClassVar[str] = ""                  # how humans write it (upper case, spaces)
    description: ClassVar[str] = ""
    layouts: ClassVar[tuple[str, ...]] = ()    # data layouts it reads ("auto" picks one by detect_layout)
    rules: ClassVar[tuple[str, ...]] = ("official",)
    zero_division: ClassVar[tuple] = (None, "raise", "zero")
    defaults: ClassVar[Mapping[str, Any]] = {}  # Protocol fields (bench is filled in)
    headline: ClassVar[str] = ""               # the headline metric, e.g. "F1 (mean over splits)"
    higher_is_better: ClassVar[bool] = True
    unit: ClassVar[str] = ""                   # of the headline, for axis labels ("0-1", "points")
    metrics: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()   # secondary report columns
    artifacts: ClassVar[tuple[str, ...]] = ()  # files / folders it writes into a run folder (besides predictions)
    data_example: ClassVar[str] = ""           # shown in errors: "--data NAME=PATH", e.g. "/data/NAME"

    # ------------------------------------------------------------------ data
    def detect_layout(self, path: Path) -> str:
        """The layout of the data at ``path`` (``layout="auto"``): ``parquet`` when the path is or holds parquet
        files and the benchmark reads parquet, else the first of :attr:`layouts`."""
        from vtoolkit.eval.datasets import parquet_files

        if not path.exists():
            raise FileNotFoundError(f"{self.name} data not found: {path}")
        if "parquet" in self.layouts and (path.suffix == ".parquet" or (path.is_dir() and parquet_files(path))):
            return "parquet"
        return next(x for x in self.layouts if x != "parquet")

    def load(self, spec, layout: str, protocol) -> Any:
        """The :class:`~vtoolkit.eval.datasets.Dataset` of ``spec`` (a :class:`~vtoolkit.eval.datasets.DataSpec`)
        in ``layout``; ``protocol`` is the resolved protocol (some benchmarks draw a seeded subset)."""
        raise NotImplementedError

    def check_data(self, spec) -> None:
        """Raise :class:`~vtoolkit.config.ConfigError` when ``spec`` lacks what scoring needs (checked before a model
        is built). Default: nothing to check."""

    def select(self, records: Sequence[Mapping], n: int) -> tuple[set[int], str]:
        """``--limit n`` (< len(records)): the indices kept and the rule, in words. Default: the first ``n``."""
        return set(range(n)), "the first n records"

    # ------------------------------------------------------------------ scoring
    def score(self, valid: Sequence[dict], protocol, dataset, out_dir: str | Path | None) -> dict:
        """Metrics of the valid prediction rows (each a record + ``prediction``): a dict with at least ``headline``
        (a number, or None with ``headline_note``), ``headline_name`` and ``higher_is_better``. ``dataset`` may be
        None (re-scoring without the data); ``out_dir`` (may be None) receives :attr:`artifacts`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ CLI
    def add_score_command(self, app) -> None:
        """Add ``vtoolkit score NAME`` to the typer app ``app`` (optional; default: none)."""

    # ------------------------------------------------------------------ derived
    def default_protocol(self):
        from vtoolkit.eval.protocol import Protocol

        return Protocol(bench=self.name, **dict(self.defaults))

    def describe(self) -> dict[str, Any]:
        """A row for ``vtoolkit list --benchmarks``."""
        return {"name": self.name, "title": self.title or self.name, "headline": self.headline,
                "higher_is_better": self.higher_is_better, "unit": self.unit,
                "metrics": [m for m, _ in self.metrics], "rules": list(self.rules),
                "layouts": list(self.layouts), "description": self.description,
                "module": type(self).__module__}


def register_benchmark(name: str):
    """Class decorator: register a :class:`Benchmark` subclass under ``name`` (lower case, no spaces)."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name or "," in name:
        raise ValueError(f"benchmark name must be a non-empty lower-case word, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
            raise TypeError(f"@register_benchmark({name!r}) decorates a Benchmark subclass, got {cls!r}")
        if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
            old = type(_REGISTRY[name])
            raise ValueError(f"benchmark {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        if not cls.layouts:
            raise ValueError(f"benchmark {name!r}: declare the data layouts it reads (layouts = (...))")
        _REGISTRY[name] = cls()
        return cls

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from vtoolkit.eval.benchmarks import BUILTIN

    for mod in BUILTIN:
        importlib.import_module(f"vtoolkit.eval.benchmarks.{mod}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is named, never fatal for the others
            print(f"warning: benchmark plug-in {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}",
                  file=sys.stderr)
            continue
        if isinstance(obj, type) and issubclass(obj, Benchmark) and not obj.name:
            register_benchmark(ep.name)(obj)


def list_benchmarks() -> list[str]:
    """The registered benchmark names, built-ins first, then plug-ins in the order they loaded."""
    _ensure_loaded()
    return list(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``; an unknown name is a ConfigError naming the closest one."""
    _ensure_loaded()
    key = str(name).strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(key), list(_REGISTRY), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown benchmark {name!r}; choose from {', '.join(_REGISTRY)}{hint}")
    return _REGISTRY[key]


def all_artifacts() -> tuple[str, ...]:
    """Every registered benchmark's run-folder artifacts (what a new run refuses to overwrite)."""
    return tuple(dict.fromkeys(a for b in map(get_benchmark, list_benchmarks()) for a in b.artifacts))
