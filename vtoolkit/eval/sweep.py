"""``vtoolkit sweep configs/sweeps/<sweep>.yaml``: a grid over methods x settings, each run over the benchmarks.

Sweep file (YAML, ``safe_load``)::

    name: fastervlm_yesno             # output folder name (default: the file stem)
    model: tiny:llava                 # or a local checkpoint path / hub id
    dtype: auto                       # optional: auto | float16 | bfloat16 | float32
    device_map: null                  # optional, e.g. auto
    benchmarks: [BENCH]               # registered names (vtoolkit list --benchmarks)
    data: {BENCH: /data/BENCH}        # per benchmark: a path or {path, images, annotations, gt, layout}
    protocol: {BENCH: {max_new_tokens: 10}}   # optional protocol overrides per benchmark
    limit: null
    batch_size: 8
    out: runs/fastervlm_yesno         # optional (default runs/<name>)
    prepare: python make_data.py      # optional: the command that writes ``data``; named when a data path is missing
    methods:
      - method: fastervlm
        preset: configs/methods/fastervlm.yaml   # optional: options from a preset, then the grid on top
        grid: {keep_ratio: [0.25, 0.1, 0.05]}   # cartesian product over the listed options
      - method: random
        options: {seed: 0}                      # fixed options for every grid point

A baseline (method ``none``) is always run first, whether listed or not. The model is loaded once; each grid point
applies its method, runs every benchmark into ``<out>/<run name>/`` and removes the method again. At the end a report
is written to ``<out>/report``.

Before anything runs, the whole sweep is checked (:func:`check_sweep`) and every problem is reported at once:
unknown keys (top level and method entries, with did-you-mean), unknown methods, misspelt or out-of-range options of
any grid point, methods that do not support the model, missing data paths, bad protocol overrides, limit, batch size,
dtype; then run folders that already hold results are refused unless ``resume`` (continue them; finished runs are only
re-scored) or ``overwrite`` (delete their results first). ``dry_run`` stops after these checks. What only the model
knows (FastV's ``K`` against its layer count, ``keep_tokens`` against the visual tokens of each benchmark's first
sample) is checked for every grid point right after the model is loaded, before the first run starts.
"""
from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vtoolkit.config import ConfigError, load_method_preset, load_yaml

__all__ = ["check_sweep", "expand_grid", "load_sweep", "run_sweep"]

SWEEP_KEYS = ("name", "model", "dtype", "device_map", "attn_implementation", "seed", "benchmarks", "data", "protocol",
              "limit", "batch_size", "out", "methods", "prepare")
ENTRY_KEYS = ("method", "preset", "options", "grid")


def _unknown_keys(keys, valid, where: str) -> list[str]:
    out = []
    for k in keys:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            out.append(f"{where}unknown key {k!r}.{hint} Valid: {', '.join(valid)}")
    return out


def _find_preset(preset: str, sweep_path: Path | None) -> Path:
    cands = [Path(preset)]
    if sweep_path is not None:
        cands.append(sweep_path.parent / preset)
    repo = Path(__file__).resolve().parents[2]
    cands += [repo / preset, repo / "configs" / "methods" / preset, repo / "configs" / "methods" / f"{preset}.yaml"]
    for c in cands:
        if c.is_file():
            return c
    raise ConfigError(f"method preset {preset!r} not found (looked in {', '.join(str(c) for c in cands)})")


def run_name(method: str, options: Mapping[str, Any]) -> str:
    if method == "none" and not options:
        return "baseline"
    parts = [method] + [f"{k}={v}" for k, v in sorted(options.items())]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join(parts))


def expand_grid(spec: Mapping, sweep_path: Path | None = None,
                problems: list[str] | None = None) -> list[tuple[str, dict, dict]]:
    """``[(method, options, grid point), ...]`` for the sweep's ``methods``, the baseline first (always present,
    once). ``options`` = preset + fixed options + grid point; runs are named by method + grid point.

    Each grid point's method and options are checked (name, option names, types, ranges). The problems are appended
    to ``problems`` (entries with problems are left out), or raised together as a ConfigError when it is None."""
    from vtoolkit.eval.validate import method_config, method_name

    collect: list[str] = [] if problems is None else problems
    where = f"{sweep_path.name}: " if sweep_path is not None else ""
    points: list[tuple[str, dict, dict]] = [("none", {}, {})]
    entries = spec.get("methods") or []
    if not isinstance(entries, list):
        collect.append(f"{where}methods: expected a list of method entries, got {type(entries).__name__}")
        entries = []
    for i, entry in enumerate(entries):
        at = f"{where}methods[{i}]: "
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, Mapping):
            collect.append(f"{at}expected a method name or a mapping with method:, got {entry!r}")
            continue
        bad = _unknown_keys(entry, ENTRY_KEYS, at)
        base: dict = {}
        method = entry.get("method")
        if entry.get("preset"):
            try:
                pname, popts = load_method_preset(_find_preset(str(entry["preset"]), sweep_path))
            except ConfigError as e:
                bad += [f"{at}preset: {p}" for p in e.problems]
            else:
                method = method or pname
                if pname != method:
                    bad.append(f"{at}preset {entry['preset']!r} is for {pname!r}, not {method!r}")
                base.update(popts)
        if not method:
            bad.append(f"{at}needs 'method:' (a registered method name)")
        options, grid = entry.get("options") or {}, entry.get("grid") or {}
        for key, val in (("options", options), ("grid", grid)):
            if not isinstance(val, Mapping):
                bad.append(f"{at}{key}: expected option: value pairs, got {val!r}")
        if bad:
            collect.extend(bad)
            continue
        try:
            name = method_name(method)
        except ConfigError as e:
            collect.extend(f"{at}{p}" for p in e.problems)
            continue
        base.update(options)
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        for combo in (itertools.product(*values) if keys else [()]):
            point = dict(zip(keys, combo))
            opts = {**base, **point}
            try:
                method_config(name, opts)
            except ConfigError as e:
                collect.extend(f"{at}{p}" for p in e.problems)
                continue
            if name == "none" and not opts:
                continue  # the baseline is already first
            if all((m, o) != (name, opts) for m, o, _ in points):
                points.append((name, opts, point))
    if problems is None and collect:
        raise ConfigError(list(dict.fromkeys(collect)))
    return points


def load_sweep(path: str | Path, overrides: Mapping | None = None,
               data_paths: Mapping[str, str] | None = None) -> dict:
    """The sweep file with ``overrides`` (top-level keys; None values ignored) and ``data_paths`` (benchmark ->
    path: replaces the ``path`` of that benchmark's data entry, keeping its other keys such as ``images:``)."""
    spec = load_yaml(path)
    spec = {**spec, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    spec.setdefault("name", Path(path).stem)
    if isinstance(spec.get("benchmarks"), str):
        spec["benchmarks"] = [b.strip() for b in spec["benchmarks"].split(",") if b.strip()]
    if data_paths:
        data = dict(spec.get("data") or {}) if isinstance(spec.get("data"), Mapping) else {}
        for b, p in data_paths.items():
            data[b] = {**data[b], "path": p} if isinstance(data.get(b), Mapping) else p
        spec["data"] = data
    return spec


def check_sweep(spec: Mapping, path: str | Path,
                names: Mapping[str, str] | None = None) -> list[tuple[str, dict, dict]]:
    """The grid points of ``spec`` (see :func:`expand_grid`) once everything is checked; otherwise one ConfigError
    listing every problem, each naming the key as ``path: key`` (or as ``names`` spells overridden keys, e.g.
    ``--limit``). Nothing is loaded but the registry: it takes well under a second."""
    from vtoolkit.eval.runner import resolve_config
    from vtoolkit.eval.validate import check_method_model, check_model

    path = Path(path)
    where = f"{path.name}: "
    problems = _unknown_keys(spec, SWEEP_KEYS, where)
    required = [f"{where}a sweep needs '{key}:'" for key in ("model", "benchmarks", "data") if key not in spec]
    problems += required
    if not required:
        n = {k: f"{where}{k}" for k in ("model", "benchmarks", "data", "limit", "batch_size", "dtype", "seed",
                                         "attn_implementation", "device_map")}
        n.update(method="method", method_options="options", protocol=f"{where}protocol", **(names or {}))
        try:
            resolve_config(model=spec["model"], benchmarks=spec["benchmarks"] or [], data=spec["data"],
                           protocol_overrides=spec.get("protocol"), limit=spec.get("limit"),
                           batch_size=spec.get("batch_size", 1), dtype=spec.get("dtype", "auto"),
                           device_map=spec.get("device_map"), attn_implementation=spec.get("attn_implementation"),
                           seed=spec.get("seed", 0), names=n)
        except ConfigError as e:
            problems += e.problems
    if isinstance(spec.get("prepare"), str) and any(" path: " in p and p.endswith("no such file or folder")
                                                    for p in problems):
        problems.append(f"{where}its data is written by (run it first, from the folder you run the sweep in): "
                        f"{spec['prepare']}")
    elif "prepare" in spec and not isinstance(spec["prepare"], str):
        problems.append(f"{where}prepare: must be a command (a string), got {spec['prepare']!r}")
    points = expand_grid(spec, path, problems)
    try:
        model_type = check_model(spec.get("model"))
    except ConfigError:
        model_type = None   # reported above
    for m in dict.fromkeys(m for m, _, _ in points):
        try:
            check_method_model(m, model_type)
        except ConfigError as e:
            problems += [f"{where}methods: {p}" for p in e.problems]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return points


def _check_on_model(model_and_processor, spec: Mapping, plan: list[dict], path: Path) -> None:
    """What only the loaded model knows (layer counts, visual tokens of each benchmark's first sample), for every run
    of the sweep before the first one starts: all problems together, a ConfigError (exit 2)."""
    from vtoolkit.eval.datasets import load_dataset
    from vtoolkit.eval.protocol import resolve_protocol
    from vtoolkit.eval.runner import check_method_on_model

    po = spec.get("protocol") or {}
    data = []
    for b in spec["benchmarks"]:
        protocol = resolve_protocol(b, po.get(b))
        data.append((load_dataset(b, spec["data"][b], protocol).limit(spec.get("limit")), protocol))
    model, processor = model_and_processor
    problems = []
    for p in plan:
        try:
            check_method_on_model(model, processor, p["method"], p["options"], data)
        except ConfigError as e:
            problems += [f"{path.name}: {p['name']}: {x}" for x in e.problems]
        except (ValueError, NotImplementedError) as e:
            problems.append(f"{path.name}: {p['name']}: {p['method']}: {e}")
    if problems:
        raise ConfigError(problems)


def run_sweep(path: str | Path, *, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
              retry_errors: bool = False, progress: bool = True, dry_run: bool = False,
              overrides: Mapping | None = None, data_paths: Mapping[str, str] | None = None,
              names: Mapping[str, str] | None = None, model_and_processor=None) -> dict:
    """Run every grid point of the sweep at ``path``; returns ``{"runs": [...], "rows": [...], "report": {...},
    "errors": [...], "warnings": [...]}`` (errors: benchmarks of runs that could not be scored)."""
    from vtoolkit.eval.report import write_report
    from vtoolkit.eval.runner import _earlier_results, dist_info, evaluate, load_model, resolve_config, run_problems

    path = Path(path)
    spec = load_sweep(path, overrides, data_paths)
    points = check_sweep(spec, path, names)
    out_root = Path(out or spec.get("out") or Path("runs") / spec["name"])
    plan = [{"name": run_name(m, g), "method": m, "options": o, "dir": str(out_root / run_name(m, g))}
            for m, o, g in points]
    run_names = [p["name"] for p in plan]
    if len(set(run_names)) != len(run_names):  # same grid point from two entries (e.g. two presets): disambiguate
        for i, p in enumerate(plan):
            if run_names.count(p["name"]) > 1:
                p["name"] = f"{p['name']}_{i}"
                p["dir"] = str(out_root / p["name"])
    dist = dist_info()
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the sweep's runs, or delete them "
                          "and start over")
    if not (resume or overwrite):
        held = [p["name"] for p in plan if _earlier_results(Path(p["dir"]), dist["rank"], dist["world_size"])]
        if held:
            raise ConfigError(f"{out_root} already holds results of run(s) {', '.join(held)}: pass --resume to "
                              f"continue them, --overwrite to delete them and start over, or choose another --out")
    if dry_run:
        return {"runs": plan, "rows": [], "report": None, "errors": [], "warnings": []}
    if model_and_processor is None:
        model_and_processor = load_model(spec["model"], dtype=spec.get("dtype", "auto"),
                                         device_map=spec.get("device_map"),
                                         attn_implementation=spec.get("attn_implementation"), seed=spec.get("seed", 0))
    _check_on_model(model_and_processor, spec, plan, path)
    errors, warnings = [], []
    for p in plan:
        cfg = resolve_config(model=spec["model"], method=p["method"], method_options=p["options"],
                             benchmarks=spec["benchmarks"], data=spec["data"],
                             protocol_overrides=spec.get("protocol"), limit=spec.get("limit"),
                             batch_size=spec.get("batch_size", 1), dtype=spec.get("dtype", "auto"),
                             device_map=spec.get("device_map"), attn_implementation=spec.get("attn_implementation"),
                             seed=spec.get("seed", 0))
        metrics = evaluate(cfg, p["dir"], resume=resume, overwrite=overwrite, retry_errors=retry_errors,
                           model_and_processor=model_and_processor, progress=progress,
                           names={"out": "--out", "resume": "--resume", "overwrite": "--overwrite"})
        if metrics is not None:
            e, w = run_problems(metrics)
            errors += [f"{p['name']}: {x}" for x in e]
            warnings += [f"{p['name']}: {x}" for x in w]
    if dist["rank"] != 0:
        return {"runs": plan, "rows": [], "report": None, "errors": [], "warnings": []}
    rep = write_report([p["dir"] for p in plan], out_root / "report")
    rows = rep["table"].to_dict("records")
    return {"runs": plan, "rows": rows, "report": {k: v for k, v in rep.items() if k != "table"},
            "errors": errors, "warnings": warnings + rep["warnings"]}
