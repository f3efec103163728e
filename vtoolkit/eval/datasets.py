"""Benchmark datasets for the runner: POPE, MME and CHAIR in their official and Hugging Face (parquet) layouts.

A dataset is a deterministic list of light records (no pixels) plus ``load_image(record)``; the runner opens images
batch by batch, so ids are known up front (for ``--resume`` and sharding) and memory stays flat on big parquet files.

Record (a dict; everything but ``_ref`` is copied into the predictions file)::

    id          stable sample id, unique in the dataset ("pope/coco_pope_random/17", "mme/OCR/0001.jpg#1", "chair/42")
    bench       "pope" | "mme" | "chair"
    index       position in dataset order
    split       POPE split (file stem or lmms-lab ``category``), MME subtask; None for CHAIR
    question    raw question text (None for CHAIR: the protocol's fixed instruction is used)
    label       gold answer ("yes"/"no"; None for CHAIR)
    image       image file name / lmms-lab image id, for humans
    question_id / image_id   ids of the original files when they have them
    error       None, or why the row cannot be evaluated (missing field, missing image, bad JSON line)
    _ref        how to load the pixels (path or a parquet location); internal

Bad rows are yielded with ``error`` set, never dropped and never fatal.

Layouts (``layout="auto"`` picks by looking at the path)
--------------------------------------------------------
POPE  ``json``: one or more official question files (JSON Lines or one JSON array, LF or CRLF; keys ``question_id``,
      ``image``, ``text``, ``label``), images from ``images=`` (default: ``<file dir>/images``, ``<file dir>/val2014``).
      A directory of ``*.json``/``*.jsonl`` files is one split per file.
      ``parquet``: lmms-lab/POPE (``question_id``, ``question``, ``answer``, ``image`` (HF Image struct),
      ``category``, ``image_source``, ``id``); ``data/`` (config ``default``) is preferred over ``Full/``.
MME   ``folder``: the official ``MME_Benchmark_release_version`` (split subtasks ``<task>/images`` +
      ``<task>/questions_answers_YN``, the others ``<task>/<id>.{png,jpg}`` next to ``<task>/<id>.txt``, each .txt
      holding two ``question<TAB>Yes|No`` lines). ``parquet``: lmms-lab/MME (``question_id`` = image path,
      ``question``, ``answer``, ``category``, ``image``).
CHAIR ``coco``: a COCO val2014 image folder (``path`` itself or ``path/val2014``) and, for scoring, the annotation
      folder (``annotations=``, default ``path/annotations``) or a prebuilt per-image GT file (``gt=``). A seeded
      subset of ``protocol.n_images`` images is drawn from the *sorted* file list.

``limit`` (:meth:`Dataset.limit`, ``--limit N``) keeps N samples: for POPE N spread evenly over the splits (the first
records of each split, so the headline "mean over splits" averages every split once N >= the number of splits; with
fewer, the headline says which splits it averages), for MME and CHAIR the first N.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtoolkit.config import ConfigError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_TASKS = PERCEPTION + COGNITION
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

__all__ = ["DataSpec", "Dataset", "load_dataset", "open_image", "public_record"]


@dataclass
class DataSpec:
    """Where a benchmark's data is: ``path`` plus layout-specific options."""

    bench: str
    path: str
    layout: str = "auto"
    images: str | None = None        # POPE json: image folder; CHAIR: val2014 folder
    annotations: str | None = None   # CHAIR: COCO annotations folder (instances_/captions_val2014.json)
    gt: str | None = None            # CHAIR: prebuilt {image_id: [objects]} json(.gz)

    KEYS = ("path", "layout", "images", "annotations", "gt")
    LAYOUTS = {"pope": ("auto", "json", "parquet"), "mme": ("auto", "folder", "parquet"), "chair": ("auto", "coco")}

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
            if layout not in cls.LAYOUTS.get(bench, ("auto",)):
                raise ConfigError(f"data for {bench!r}: layout must be one of {', '.join(cls.LAYOUTS[bench])}, "
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
        """The first ``n`` samples (None: all); for POPE ``n`` spread evenly over the splits (see the module
        docstring). ``n`` must be a positive integer."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"limit must be a positive number of samples, got {n!r}")
        if n >= len(self.records):
            return self
        if self.bench == "pope":
            keep = _spread_over_splits(self.records, n)
            rule = "the first records of each split, n spread evenly over the splits"
        else:
            keep = set(range(n))
            rule = "the first n records"
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


def _spread_over_splits(records: list[dict], n: int) -> set[int]:
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


def open_image(record: Mapping):
    """The record's image as an RGB PIL image; raises (OSError/ValueError) with a clear message when unreadable."""
    from PIL import Image

    ref = record.get("_ref")
    if ref is None:
        raise ValueError(f"{record.get('id')}: no image reference")
    kind = ref[0]
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
def _parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(root.rglob("*.parquet"))


def _iter_parquet_rows(files: list[Path], columns: list[str]):
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


def _unique(ids_seen: dict, base: str) -> str:
    n = ids_seen.get(base, 0)
    ids_seen[base] = n + 1
    return base if n == 0 else f"{base}~{n}"


def _read_json_rows(path: Path) -> list[tuple[int, Any, str | None]]:
    """``(line_no, obj_or_None, error)`` per record of a JSON Lines file or a JSON array; bad lines -> error."""
    from vtoolkit.eval.scorers._io import decode_text

    raw = decode_text(path.read_bytes(), path)
    if not raw.strip():
        raise ConfigError(f"{path}: an empty question file (no records); give a POPE question file (JSON Lines or a "
                          f"JSON array)")
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


def _resolve_image(root: Path | None, name: str) -> Path | None:
    if root is None:
        return None
    p = root / name
    if p.suffix == "" and not p.exists():
        for ext in IMAGE_EXTS:
            if (root / (name + ext)).exists():
                return root / (name + ext)
    return p


def _detect_layout(bench: str, path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{bench} data not found: {path}")
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if bench == "pope":
            return "json"
        raise ConfigError(f"{bench}: expected a folder, got the file {path}")
    if _parquet_files(path):
        return "parquet"
    return {"pope": "json", "mme": "folder", "chair": "coco"}[bench]


# -------------------------------------------------------------------------------------------------- POPE
def _pope_json(spec: DataSpec) -> Dataset:
    path = Path(spec.path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"POPE: no question files (*.json, *.jsonl) in {path}")
    base = files[0].parent
    if spec.images:
        img_root = Path(spec.images)
    else:
        cands = [base / "images", base / "val2014", base]
        img_root = next((c for c in cands if c.is_dir() and c != base), base)
    records, seen, info_files = [], {}, []
    for f in files:
        split = f.name.split(".")[0]
        rows = _read_json_rows(f)
        info_files.append({"file": str(f), "split": split, "rows": len(rows)})
        for line_no, obj, err in rows:
            rec = {"bench": "pope", "split": split, "question_id": None, "image": None, "question": None,
                   "label": None, "error": err, "_ref": None}
            if err is None:
                if not isinstance(obj, dict):
                    err = f"{f.name} record {line_no}: expected an object, got {type(obj).__name__}"
                else:
                    rec["question_id"] = obj.get("question_id")
                    rec["image"] = obj.get("image", obj.get("image_source"))
                    rec["question"] = obj.get("text", obj.get("question"))
                    lab = obj.get("label", obj.get("answer"))
                    rec["label"] = lab.strip().lower() if isinstance(lab, str) else lab
                    missing = [k for k in ("image", "question", "label") if not rec[k]]
                    if missing:
                        err = f"{f.name} record {line_no}: missing field(s) {missing}"
                    elif rec["label"] not in ("yes", "no"):
                        err = f"{f.name} record {line_no}: label must be yes/no, got {lab!r}"
                    else:
                        rec["_ref"] = ("path", str(_resolve_image(img_root, str(rec["image"]))))
            rec["error"] = err
            qid = rec["question_id"] if rec["question_id"] is not None else f"line{line_no}"
            rec["id"] = _unique(seen, f"pope/{split}/{qid}")
            records.append(rec)
    return Dataset("pope", records, "json", {"files": info_files, "images": str(img_root),
                                             "splits": _split_sizes(records)})


def _split_sizes(records) -> dict:
    out: dict = {}
    for r in records:
        out[r.get("split")] = out.get(r.get("split"), 0) + 1
    return out


def _pope_parquet(spec: DataSpec) -> Dataset:
    root = Path(spec.path)
    files = _parquet_files(root)
    if root.is_dir() and (root / "data").is_dir() and _parquet_files(root / "data"):
        files = _parquet_files(root / "data")  # config "default" (9000 rows, all splits); Full/ duplicates it
    records, seen = [], {}
    cols = ["id", "question_id", "question", "answer", "category", "image_source"]
    for f, g, i, row in _iter_parquet_rows(files, cols):
        split = row.get("category") or f.name.split("-")[0]
        lab = row.get("answer")
        rec = {"bench": "pope", "split": split, "question_id": row.get("question_id"),
               "image": row.get("image_source"), "question": row.get("question"),
               "label": lab.strip().lower() if isinstance(lab, str) else lab, "error": None,
               "_ref": ("parquet", str(f), g, i)}
        missing = [k for k in ("question", "label") if not rec[k]]
        if missing:
            rec["error"] = f"{f.name} row {i} of group {g}: missing field(s) {missing}"
        elif rec["label"] not in ("yes", "no"):
            rec["error"] = f"{f.name} row {i} of group {g}: label must be yes/no, got {lab!r}"
        key = row.get("id") if row.get("id") is not None else row.get("question_id")
        key = key if key is not None else f"{f.stem}:{g}:{i}"
        rec["id"] = _unique(seen, f"pope/{split}/{key}")
        records.append(rec)
    return Dataset("pope", records, "parquet", {"files": [str(f) for f in files], "splits": _split_sizes(records)})


# -------------------------------------------------------------------------------------------------- MME
def _mme_task_dirs(root: Path) -> list[tuple[str, Path]]:
    for base in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        found = [(t, base / t) for t in MME_TASKS if (base / t).is_dir()]
        if found:
            return found
    raise FileNotFoundError(f"MME: no subtask folders ({', '.join(MME_TASKS[:3])}, ...) in {root} or one level below")


def _mme_folder(spec: DataSpec) -> Dataset:
    root = Path(spec.path)
    records, seen, sizes = [], {}, {}
    for task, tdir in _mme_task_dirs(root):
        if (tdir / "questions_answers_YN").is_dir():
            qdir, idir = tdir / "questions_answers_YN", tdir / "images"
        else:
            qdir, idir = tdir, tdir
        txts = sorted(qdir.glob("*.txt"))
        for txt in txts:
            stem = txt.stem
            img = next((idir / (stem + e) for e in IMAGE_EXTS if (idir / (stem + e)).is_file()), None)
            img_name = img.name if img else stem
            try:
                lines = [ln for ln in txt.read_text(encoding="utf-8-sig").replace("\r", "").split("\n") if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                lines, file_err = [], f"{task}/{txt.name}: unreadable ({e})"
            else:
                file_err = None if lines else f"{task}/{txt.name}: no questions"
            if file_err:
                records.append({"id": _unique(seen, f"mme/{task}/{img_name}#0"), "bench": "mme", "split": task,
                                "image": f"{task}/{img_name}", "question": None, "label": None,
                                "error": file_err, "_ref": None})
                continue
            for k, line in enumerate(lines):
                parts = line.split("\t")
                rec = {"id": _unique(seen, f"mme/{task}/{img_name}#{k}"), "bench": "mme", "split": task,
                       "image": f"{task}/{img_name}", "question": None, "label": None, "error": None,
                       "_ref": ("path", str(img)) if img else None}
                if len(parts) < 2 or not parts[0].strip():
                    rec["error"] = f"{task}/{txt.name} line {k + 1}: expected 'question<TAB>Yes|No'"
                else:
                    rec["question"] = parts[0].strip()
                    rec["label"] = parts[1].strip().lower()
                    if rec["label"] not in ("yes", "no"):
                        rec["error"] = f"{task}/{txt.name} line {k + 1}: answer must be Yes/No, got {parts[1]!r}"
                    elif img is None:
                        rec["error"] = f"{task}/{txt.name}: image {stem}.* not found in {idir}"
                records.append(rec)
                sizes[task] = sizes.get(task, 0) + 1
    return Dataset("mme", records, "folder", {"root": str(root), "subtasks": sizes, "n_questions": len(records)})


def _mme_parquet(spec: DataSpec) -> Dataset:
    files = _parquet_files(Path(spec.path))
    records, seen, sizes = [], {}, {}
    for f, g, i, row in _iter_parquet_rows(files, ["question_id", "question", "answer", "category"]):
        task = row.get("category")
        qid = row.get("question_id")
        lab = row.get("answer")
        rec = {"bench": "mme", "split": task, "image": qid, "question": row.get("question"),
               "label": lab.strip().lower() if isinstance(lab, str) else lab, "error": None,
               "_ref": ("parquet", str(f), g, i)}
        missing = [k for k, v in (("category", task), ("question_id", qid), ("question", rec["question"]),
                                  ("answer", lab)) if not v]
        if missing:
            rec["error"] = f"{f.name} row {i} of group {g}: missing field(s) {missing}"
        elif rec["label"] not in ("yes", "no"):
            rec["error"] = f"{f.name} row {i} of group {g}: answer must be Yes/No, got {lab!r}"
        elif task not in MME_TASKS:
            rec["error"] = f"{f.name} row {i} of group {g}: unknown MME category {task!r}"
        base = f"mme/{task}/{qid if qid else f'{f.stem}:{g}:{i}'}"
        k = seen.get(base + "#", 0)
        seen[base + "#"] = k + 1
        rec["id"] = _unique(seen, f"{base}#{k}")
        records.append(rec)
        sizes[task] = sizes.get(task, 0) + 1
    return Dataset("mme", records, "parquet", {"files": [str(f) for f in files], "subtasks": sizes,
                                               "n_questions": len(records)})


# -------------------------------------------------------------------------------------------------- CHAIR
_COCO_ID = re.compile(r"(\d+)\.[A-Za-z]+$")


def _chair_coco(spec: DataSpec, n_images: int | None, seed: int) -> Dataset:
    root = Path(spec.path)
    if spec.images:
        img_dir = Path(spec.images)
    else:
        img_dir = next((c for c in (root / "val2014", root / "images" / "val2014", root / "images") if c.is_dir()),
                       root)
    files = sorted(p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"CHAIR: no images in {img_dir}")
    total = len(files)
    if n_images is not None and n_images < total:
        picked = sorted(random.Random(seed).sample(range(total), n_images))
        files = [files[i] for i in picked]
    records = []
    for name in files:
        m = _COCO_ID.search(name)
        rec = {"id": None, "bench": "chair", "split": None, "image": name, "image_id": int(m.group(1)) if m else None,
               "question": None, "label": None, "error": None, "_ref": ("path", str(img_dir / name))}
        if m is None:
            rec["error"] = f"cannot parse a COCO image id from {name!r}"
            rec["id"] = f"chair/{name}"
        else:
            rec["id"] = f"chair/{rec['image_id']}"
        records.append(rec)
    ann = spec.annotations or (str(root / "annotations") if (root / "annotations").is_dir() else None)
    info = {"images": str(img_dir), "n_available": total, "n_images": n_images, "seed": seed,
            "selection": "random.Random(seed).sample over the sorted file list",
            "image_ids": [r["image_id"] for r in records], "annotations": ann, "gt": spec.gt}
    return Dataset("chair", records, "coco", info)


# -------------------------------------------------------------------------------------------------- entry
def load_dataset(bench: str, spec: Any, protocol=None) -> Dataset:
    """Load ``bench`` from ``spec`` (a path, a mapping or a :class:`DataSpec`); see the module docstring."""
    spec = DataSpec.from_any(bench, spec)
    layout = spec.layout if spec.layout != "auto" else _detect_layout(bench, Path(spec.path))
    if bench == "pope":
        if layout == "json":
            return _pope_json(spec)
        if layout == "parquet":
            return _pope_parquet(spec)
    elif bench == "mme":
        if layout == "folder":
            return _mme_folder(spec)
        if layout == "parquet":
            return _mme_parquet(spec)
    elif bench == "chair":
        if layout == "coco":
            n = protocol.n_images if protocol is not None else 500
            seed = protocol.seed if protocol is not None else 0
            return _chair_coco(spec, n, seed)
    else:
        raise ConfigError(f"unknown benchmark {bench!r}; choose pope, mme or chair")
    raise ConfigError(f"{bench}: unknown layout {layout!r}")
