"""``vtoolkit sweep configs/sweeps/<sweep>.yaml``: a grid over methods x settings, each run over the benchmarks.

Sweep file (YAML, ``safe_load``)::

    name: fastervlm_pope              # output folder name (default: the file stem)
    model: tiny:llava                 # or a local checkpoint path / hub id
    dtype: auto                       # optional: auto | float16 | bfloat16 | float32
    device_map: null                  # optional, e.g. auto
    benchmarks: [pope]
    data: {pope: /data/pope/coco}     # per benchmark: a path or {path, images, annotations, gt, layout}
    protocol: {pope: {max_new_tokens: 10}}   # optional protocol overrides per benchmark
    limit: null
    batch_size: 8
    out: runs/fastervlm_pope          # optional (default runs/<name>)
    methods:
      - method: fastervlm
        preset: configs/methods/fastervlm.yaml   # optional: options from a preset, then the grid on top
        grid: {keep_ratio: [0.25, 0.1, 0.05]}   # cartesian product over the listed options
      - method: random
        options: {seed: 0}                      # fixed options for every grid point

A baseline (method ``none``) is always run first, whether listed or not. The model is loaded once; each grid point
applies its method, runs every benchmark into ``<out>/<run name>/`` and removes the method again. ``resume=True``
continues interrupted runs (finished ones are only re-scored). At the end a report is written to ``<out>/report``.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vtoolkit.config import load_method_preset, load_yaml

__all__ = ["expand_grid", "load_sweep", "run_sweep"]


def _find_preset(preset: str, sweep_path: Path | None) -> Path:
    cands = [Path(preset)]
    if sweep_path is not None:
        cands.append(sweep_path.parent / preset)
    repo = Path(__file__).resolve().parents[2]
    cands += [repo / preset, repo / "configs" / "methods" / preset, repo / "configs" / "methods" / f"{preset}.yaml"]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"method preset {preset!r} not found (looked in {', '.join(str(c) for c in cands)})")


def run_name(method: str, options: Mapping[str, Any]) -> str:
    if method == "none" and not options:
        return "baseline"
    parts = [method] + [f"{k}={v}" for k, v in sorted(options.items())]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join(parts))


def expand_grid(spec: Mapping, sweep_path: Path | None = None) -> list[tuple[str, dict, dict]]:
    """``[(method, options, grid point), ...]`` for the sweep's ``methods``, the baseline first (always present,
    once). ``options`` = preset + fixed options + grid point; runs are named by method + grid point."""
    points: list[tuple[str, dict, dict]] = [("none", {}, {})]
    for entry in spec.get("methods") or []:
        if isinstance(entry, str):
            entry = {"method": entry}
        entry = dict(entry)
        base: dict = {}
        method = entry.get("method")
        if entry.get("preset"):
            pname, popts = load_method_preset(_find_preset(entry["preset"], sweep_path))
            method = method or pname
            if pname != method:
                raise ValueError(f"preset {entry['preset']!r} is for {pname!r}, not {method!r}")
            base.update(popts)
        if not method:
            raise ValueError(f"sweep entry {entry} needs 'method:'")
        base.update(entry.get("options") or {})
        grid = entry.get("grid") or {}
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        for combo in (itertools.product(*values) if keys else [()]):
            point = dict(zip(keys, combo))
            opts = {**base, **point}
            if method == "none" and not opts:
                continue  # the baseline is already first
            if all((m, o) != (method, opts) for m, o, _ in points):
                points.append((method, opts, point))
    return points


def load_sweep(path: str | Path, overrides: Mapping | None = None) -> dict:
    spec = load_yaml(path)
    spec = {**spec, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    spec.setdefault("name", Path(path).stem)
    for key in ("model", "benchmarks", "data"):
        if key not in spec:
            raise ValueError(f"{path}: a sweep needs '{key}:'")
    if isinstance(spec["benchmarks"], str):
        spec["benchmarks"] = [b.strip() for b in spec["benchmarks"].split(",")]
    return spec


def run_sweep(path: str | Path, *, out: str | Path | None = None, resume: bool = False, progress: bool = True,
              dry_run: bool = False, overrides: Mapping | None = None, model_and_processor=None) -> dict:
    """Run every grid point of the sweep at ``path``; returns ``{"runs": [...], "rows": [...], "report": {...}}``."""
    from vtoolkit.eval.report import write_report
    from vtoolkit.eval.runner import dist_info, evaluate, load_model, resolve_config

    path = Path(path)
    spec = load_sweep(path, overrides)
    out_root = Path(out or spec.get("out") or Path("runs") / spec["name"])
    points = expand_grid(spec, path)
    plan = [{"name": run_name(m, g), "method": m, "options": o, "dir": str(out_root / run_name(m, g))}
            for m, o, g in points]
    names = [p["name"] for p in plan]
    if len(set(names)) != len(names):  # same grid point from two entries (e.g. two presets): disambiguate
        for i, p in enumerate(plan):
            if names.count(p["name"]) > 1:
                p["name"] = f"{p['name']}_{i}"
                p["dir"] = str(out_root / p["name"])
    if dry_run:
        return {"runs": plan, "rows": [], "report": None}
    if model_and_processor is None:
        model_and_processor = load_model(spec["model"], dtype=spec.get("dtype", "auto"),
                                         device_map=spec.get("device_map"),
                                         attn_implementation=spec.get("attn_implementation"))
    rank = dist_info()["rank"]
    for p in plan:
        cfg = resolve_config(model=spec["model"], method=p["method"], method_options=p["options"],
                             benchmarks=spec["benchmarks"], data=spec["data"],
                             protocol_overrides=spec.get("protocol"), limit=spec.get("limit"),
                             batch_size=int(spec.get("batch_size", 1)), dtype=spec.get("dtype", "auto"),
                             device_map=spec.get("device_map"))
        run_dir = Path(p["dir"])
        done = (run_dir / "metrics.json").is_file()
        evaluate(cfg, run_dir, resume=resume or done, model_and_processor=model_and_processor, progress=progress)
    if rank != 0:
        return {"runs": plan, "rows": [], "report": None}
    rep = write_report([p["dir"] for p in plan], out_root / "report")
    rows = rep["table"].to_dict("records")
    return {"runs": plan, "rows": rows, "report": {k: v for k, v in rep.items() if k != "table"}}
