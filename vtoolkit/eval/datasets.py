"""Benchmark data for the runner: light records (no pixels) plus how to open their images.

A dataset is a deterministic list of light records plus ``open_image(record)``; the runner opens images batch by
batch, so ids are known up front (for ``--resume`` and sharding) and memory stays flat on big parquet files. Each
benchmark's layouts and loaders live in its own module in ``vtoolkit/eval/benchmarks/`` (see
:mod:`vtoolkit.eval.benchmark`); this module holds what they share.

Record (a dict; everything but ``_ref`` is copied into the predictions file)::

    id          stable sample id, unique in the dataset ("NAME/split/17")
    bench       the benchmark's registered name
    index       position in dataset order
    split       the benchmark's grouping (a file stem, a subtask, a category); may be None
    question    raw question text (None when the protocol has a fixed instruction)
    label       gold answer (None when the benchmark scores against other ground truth)
    image       image file name / id, for humans (None for a text-only question)
    question_id / image_id   ids of the original files when they have them
    error       None, or why the row cannot be evaluated (missing field, missing image, bad JSON line)
    _ref        how to load the pixels: ("path", file), ("parquet", file, row group, row), or
                :func:`text_only_ref` for a question asked without an image; internal

Bad rows are yielded with ``error`` set, never dropped and never fatal. ``limit`` (:meth:`Dataset.limit`,
``--limit N``) keeps N samples by the benchmark's rule (:meth:`~vtoolkit.eval.benchmark.Benchmark.select`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtoolkit.config import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

__all__ = ["DataSpec", "Dataset", "is_text_only", "load_dataset", "open_image", "public_record", "text_only_ref"]


@dataclass
class DataSpec:
    """Where a benchmark's data is: ``path`` plus layout-specific options."""

    bench: str
    path: str
    layout: str = "auto"
    images: str | None = None        # the image folder, when it is not where the benchmark looks by default
    annotations: str | None = None   # an annotation folder / file the benchmark scores against
    gt: str | None = None            # a prebuilt ground-truth file the benchmark scores against

    KEYS = ("path", "layout", "images", "annotations", "gt")

    @classmethod
    def from_any(cls, bench: str, value: Any) -> DataSpec:
        """A spec from a path or a mapping with :attr:`KEYS`; anything else (an unknown key, a misspelt layout)
        raises :class:`~vtoolkit.config.ConfigError` naming it."""
        if isinstance(value, DataSpec):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(bench=bench, path=str(value))
        if isinstance(value, Mapping):
            v = {k: x for k, x in value.items() if k != "bench"}   # to_dict() writes it
            unknown = [k for k in v if k not in cls.KEYS]
            if unknown:
                import difflib

                hint = "".join(f" Did you mean {m[0]!r} for {k!r}?" for k in unknown
                               if (m := difflib.get_close_matches(str(k), cls.KEYS, n=1)))
                raise ConfigError(f"data for {bench!r}: unknown key(s) {unknown}.{hint} Valid: {', '.join(cls.KEYS)}")
            if not v.get("path"):
                raise ConfigError(f"data for {bench!r} needs a 'path'")
            layout = v.pop("layout", None) or "auto"
            from vtoolkit.eval.benchmark import get_benchmark

            layouts = ("auto", *get_benchmark(bench).layouts)
            if layout not in layouts:
                raise ConfigError(f"data for {bench!r}: layout must be one of {', '.join(layouts)}, "
                                  f"got {layout!r}")
            return cls(bench=bench, layout=layout, **{k: (str(x) if x is not None else x) for k, x in v.items()})
        raise ConfigError(f"data for {bench!r} must be a path or a mapping, got {type(value).__name__}")

    def missing_paths(self) -> list[str]:
        """``key: path`` for each path of the spec that does not exist."""
        return [f"{k}: {p}" for k in ("path", "images", "annotations", "gt")
                if (p := getattr(self, k)) is not None and not os.path.exists(p)]

    def to_dict(self) -> dict:
        return {"bench": self.bench, "path": self.path, "layout": self.layout, "images": self.images,
                "annotations": self.annotations, "gt": self.gt}


class Dataset:
    """A list of records plus how to open their images. ``info`` describes the data version (recorded per run)."""

    def __init__(self, bench: str, records: list[dict], layout: str, info: dict | None = None):
        self.bench = bench
        self.records = records
        self.layout = layout
        self.info = dict(info or {})
        ids = [r["id"] for r in records]
        if len(set(ids)) != len(ids):  # pragma: no cover - loaders dedupe; this guards future layouts
            raise ValueError(f"{bench}: duplicate sample ids")
        for i, r in enumerate(records):
            r["index"] = i

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` samples (None: all); by the benchmark's rule (see the module
        docstring). ``n`` must be a positive integer."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"limit must be a positive number of samples, got {n!r}")
        if n >= len(self.records):
            return self
        from vtoolkit.eval.benchmark import get_benchmark

        keep, rule = get_benchmark(self.bench).select(self.records, n)
        info = {**self.info, "limit": n, "limit_rule": rule, "n_before_limit": len(self.records)}
        return Dataset(self.bench, [dict(r) for i, r in enumerate(self.records) if i in keep], self.layout, info)

    def fingerprint(self) -> str:
        """A short hash of what the samples are (ids, questions, labels, images, row errors), in order: two runs
        with the same fingerprint asked the same questions."""
        keys = ("id", "split", "question", "label", "image", "image_id", "error")
        text = json.dumps([[r.get(k) for k in keys] for r in self.records], default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def n_errors(self) -> int:
        return sum(r.get("error") is not None for r in self.records)


def spread_over_splits(records: list[dict], n: int) -> set[int]:
    """Indices of ``n`` (< len(records)) records: the first records of each split, the count shared as evenly as the
    splits' sizes allow (splits in order of first appearance; earlier splits take the remainder)."""
    by_split: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        by_split.setdefault(r.get("split"), []).append(i)
    quota = dict.fromkeys(by_split, 0)
    for _ in range(n):   # one at a time to the open split holding the fewest so far
        s = min((s for s in by_split if quota[s] < len(by_split[s])), key=quota.__getitem__)
        quota[s] += 1
    return {i for s, idx in by_split.items() for i in idx[:quota[s]]}


def public_record(r: Mapping) -> dict:
    """The JSON-able fields of a record (drops the internal ``_ref``)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


# -------------------------------------------------------------------------------------------------- images
_PQ_CACHE: dict = {}


def text_only_ref() -> tuple:
    """The ``_ref`` of a record asked without an image (a text-only question): :func:`open_image` returns None and
    the runner prompts it without image placeholders, batched with the records that have images."""
    return ("text",)


def is_text_only(record: Mapping) -> bool:
    ref = record.get("_ref")
    return ref is not None and ref[0] == "text"


def open_image(record: Mapping):
    """The record's image as an RGB PIL image (None for a text-only record, see :func:`text_only_ref`); raises
    (OSError/ValueError) with a clear message when unreadable."""
    from PIL import Image

    ref = record.get("_ref")
    if ref is None:
        raise ValueError(f"{record.get('id')}: no image reference")
    kind = ref[0]
    if kind == "text":
        return None
    if kind == "path":
        path = ref[1]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")
    if kind == "parquet":
        _, file, row_group, row = ref
        key = (file, row_group)
        table = _PQ_CACHE.get(key)
        if table is None:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(file).read_row_group(row_group, columns=["image"]).column("image").to_pylist()
            _PQ_CACHE.clear()  # one row group at a time: reads are sequential
            _PQ_CACHE[key] = table
        cell = table[row]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            p = cell.get("path") if isinstance(cell, dict) else None
            if p and os.path.isfile(p):
                with Image.open(p) as im:
                    return im.convert("RGB")
            raise ValueError("parquet image cell has no bytes")
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    raise ValueError(f"unknown image reference {kind!r}")  # pragma: no cover


# -------------------------------------------------------------------------------------------------- helpers
def write_jsonl_atomic(path: Path, rows: Iterable[Mapping]) -> None:
    """Write ``rows`` as JSON Lines to ``path`` atomically (a temporary file, fsync, rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(root.rglob("*.parquet"))


def iter_parquet_rows(files: list[Path], columns: list[str]):
    """Yield ``(file, row_group, row_in_group, row_dict)`` for every row, reading only ``columns`` (no pixels)."""
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names]
        for g in range(pf.num_row_groups):
            rows = pf.read_row_group(g, columns=cols).to_pylist() if cols else [{}] * pf.metadata.row_group(g).num_rows
            for i, row in enumerate(rows):
                yield f, g, i, row


def unique_id(ids_seen: dict, base: str) -> str:
    n = ids_seen.get(base, 0)
    ids_seen[base] = n + 1
    return base if n == 0 else f"{base}~{n}"


def read_json_rows(path: Path, what: str = "a question file") -> list[tuple[int, Any, str | None]]:
    """``(line_no, obj_or_None, error)`` per record of a JSON Lines file or a JSON array; bad lines -> error;
    an empty file is a ConfigError saying to give ``what``."""
    from vtoolkit.eval.scorers._io import decode_text

    raw = decode_text(path.read_bytes(), path)
    if not raw.strip():
        raise ConfigError(f"{path}: an empty question file (no records); give {what} (JSON Lines or a JSON array)")
    if raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            return [(0, None, f"{path.name}: not a valid JSON array ({e})")]
        if not data:
            raise ConfigError(f"{path}: an empty question file (a JSON array with no records)")
        return [(i + 1, obj, None) for i, obj in enumerate(data)]
    out = []
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line), None))
        except json.JSONDecodeError as e:
            out.append((n, None, f"{path.name} line {n}: invalid JSON ({e.msg})"))
    return out


def resolve_image(root: Path | None, name: str) -> Path | None:
    if root is None:
        return None
    p = root / name
    if p.suffix == "" and not p.exists():
        for ext in IMAGE_EXTS:
            if (root / (name + ext)).exists():
                return root / (name + ext)
    return p


# -------------------------------------------------------------------------------------------------- entry
def load_dataset(bench: str, spec: Any, protocol=None) -> Dataset:
    """Load ``bench`` from ``spec`` (a path, a mapping or a :class:`DataSpec`) with the registered benchmark's
    loader (:meth:`vtoolkit.eval.benchmark.Benchmark.load`); ``protocol``: the resolved protocol (default: the
    benchmark's defaults)."""
    from vtoolkit.eval.benchmark import get_benchmark

    b = get_benchmark(bench)
    spec = DataSpec.from_any(b.name, spec)
    layout = spec.layout if spec.layout != "auto" else b.detect_layout(Path(spec.path))
    if layout not in b.layouts:
        raise ConfigError(f"{b.name}: unknown layout {layout!r}; choose from {', '.join(b.layouts)}")
    return b.load(spec, layout, protocol if protocol is not None else b.default_protocol())
