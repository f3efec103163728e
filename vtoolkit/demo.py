"""``vtoolkit demo``: every registered method on the reference model and the synthetic benchmarks, in minutes on a CPU.

What it does, offline (no download, no NLTK data):

1. writes held-out synthetic POPE / MME / CHAIR benchmarks (:mod:`vtoolkit.data.synthetic`) into ``OUT/data``;
2. loads the reference model ``ref:shapes`` (:mod:`vtoolkit.models.reference`) once;
3. evaluates the settings of :func:`demo_settings` -- the baseline, FasterVLM and random pruning at keep 25 / 10 /
   5 %, FastV at its official defaults, every other registered pruning method (DyVTE, with the routers shipped for
   the reference model) and every registered ``mitigate`` method that supports LLaVA (with
   :data:`MITIGATION_OPTIONS` or its config defaults) -- each into ``OUT/runs/<setting>`` with the harness
   (:func:`vtoolkit.eval.runner.evaluate`; a finished run is only re-scored, an interrupted one resumed);
4. prints the comparison table (``OUT/table.md``, ``OUT/table.csv``) and writes the report with its plots
   (``OUT/report``, :func:`vtoolkit.eval.report.write_report`).

A setting that fails (applying the method raises, a sample errors, a benchmark cannot be scored) becomes an error
row in the table and makes :func:`run_demo` report ``ok = False`` (``vtoolkit demo`` then exits with status 1);
it never disappears silently. A method listed in :data:`NOT_APPLICABLE` (VAR: the reference model has no
massive-activation dims) is not run; its row says why.

The latency column is paired, as ``vtoolkit bench`` pairs (:func:`paired_timing`): after the evaluations, each
setting runs :data:`TIMING_ROUNDS` rounds (``--quick``: none, its cells say ``not timed (--quick)``) of one baseline
batch then one batch with the setting applied (the same
``batch_size`` POPE-style prompts, :data:`TIMING_NEW_TOKENS` new tokens forced, so both do the same work); the cell
is the median of the per-round ratios. It is not printed as a measurement (:func:`latency_cell`, rules in
:mod:`vtoolkit.bench.verdict`) when the machine was loaded while that setting was timed (1-minute load average above
the cores used + 0.5: ``machine loaded (load L on N cores)``), when the rounds disagree (spread ``(max - min) /
median`` of the ratios > 0.25: ``unstable (spread X)``) or a time is not positive; the printed summary and
``demo.json`` (``latency``) say how many settings measured. The scores are unaffected by load.
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FULL", "MITIGATION_OPTIONS", "NOT_APPLICABLE", "QUICK", "comparison_table", "demo_settings", "latency_cell", "paired_timing",
           "run_demo"]

MODEL = "ref:shapes"
FULL = {"pope_images": 30, "mme_images": 15, "chair_images": 40}
QUICK = {"pope_images": 4, "mme_images": 2, "chair_images": 4}
KEEP_RATIOS = (0.25, 0.10, 0.05)
TIMING_ROUNDS = 3          # paired rounds (baseline batch, setting batch) per setting for the latency column
TIMING_NEW_TOKENS = 2      # new tokens per timed batch (min = max: EOS cannot change the work)
# demo setting of a mitigation method, where its config defaults do not suit a 4-layer LLM; empty: defaults
MITIGATION_OPTIONS: dict[str, dict[str, Any]] = {}
# registered methods that cannot run on the reference model, with the measured reason: a row that says so (not run,
# not a failure). Anything else that raises is an error row and fails the demo.
NOT_APPLICABLE: dict[str, str] = {
    "var": "n/a: ref:shapes has no massive-activation dims (discover_sink_dims: none at tau 6-20, peak normalised "
           "magnitude 5.9), so there are no visual sinks to redistribute",
}


def demo_settings() -> list[tuple[str, dict]]:
    """``[(method, options), ...]``: the baseline, pruning settings, then every registered mitigation method for
    LLaVA (looked up in the registry at call time, so newly registered methods appear automatically)."""
    import vtoolkit as vt

    settings: list[tuple[str, dict]] = [("none", {})]
    settings += [("fastervlm", {"keep_ratio": r}) for r in KEEP_RATIOS]
    settings += [("random", {"keep_ratio": r}) for r in KEEP_RATIOS]
    settings.append(("fastv", {}))
    settings.append(("dart", {}))
    listed = {m for m, _ in settings}
    rows = [r for r in vt.list_methods() if r["name"] not in listed and r["kind"] in ("prune", "mitigate")
            and ("llava" in r["architectures"] or "*" in r["architectures"])]
    # other pruning methods (DyVTE: with the routers shipped for the reference model), then every mitigation method
    for kind in ("prune", "mitigate"):
        settings += [(r["name"], dict(MITIGATION_OPTIONS.get(r["name"], {}))) for r in rows if r["kind"] == kind]
    return settings


def _label(method: str, options: Mapping) -> str:
    if method == "none":
        return "baseline"
    return " ".join([method] + [f"{k}={v}" for k, v in sorted(options.items())])


def _dirname(method: str, options: Mapping) -> str:
    from vtoolkit.eval.sweep import run_name

    return run_name(method, dict(options))


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _row(method: str, options: Mapping, kind: str, metrics: Mapping | None, error: str | None) -> dict:
    row: dict[str, Any] = {"setting": _label(method, options), "method": method, "kind": kind, "error": error}
    if metrics is None:
        return row
    b = metrics["benchmarks"]
    pope, mme, chair = b.get("pope", {}), b.get("mme", {}), b.get("chair", {})
    row["visual_tokens"] = pope.get("visual_tokens_after")
    for split, s in (pope.get("splits") or {}).items():
        row[f"pope_acc_{split.rsplit('_', 1)[-1]}"] = s.get("accuracy")
    row["pope_f1"] = pope.get("headline")
    for task, s in (mme.get("tasks") or {}).items():
        row[f"mme_{task}"] = s.get("score")
    row["mme_total"] = mme.get("headline")
    ov = chair.get("overall") or {}
    row["chair_s"], row["chair_i"], row["chair_recall"] = ov.get("CHAIRs"), ov.get("CHAIRi"), ov.get("Recall")
    timed = [(v["latency_s"], v["n_scored"]) for k, v in b.items()
             if k in ("pope", "mme") and _num(v.get("latency_s")) and v.get("n_scored")]
    n = sum(k for _, k in timed)
    row["_latency"] = sum(lat * k for lat, k in timed) / n if n else None   # seconds per short-answer sample
    problems = [f"{k}: {v['n_errors']} sample errors (e.g. {v['errors'][0]['error']})" for k, v in b.items()
                if v.get("n_errors")]
    problems += [f"{k}: not scored ({v['score_error']})" for k, v in b.items() if v.get("score_error")]
    if problems:
        row["error"] = "; ".join(problems)
    return row


# (row key, column header, format); CHAIR fractions are shown in %
COLUMNS = (("setting", "setting", "{}"), ("visual_tokens", "visual tokens", "{:.1f}"),
           ("pope_acc_random", "POPE acc rand", "{:.3f}"), ("pope_acc_popular", "POPE acc pop", "{:.3f}"),
           ("pope_acc_adversarial", "POPE acc adv", "{:.3f}"), ("pope_f1", "POPE F1", "{:.3f}"),
           ("mme_existence", "MME exist", "{:.0f}"), ("mme_count", "MME count", "{:.0f}"),
           ("mme_position", "MME pos", "{:.0f}"), ("mme_color", "MME color", "{:.0f}"),
           ("mme_total", "MME total", "{:.0f}"), ("chair_s", "CHAIRs %", "{:.1f}"), ("chair_i", "CHAIRi %", "{:.1f}"),
           ("latency_ratio", "latency x base", "{:.2f}"), ("error", "error / note", "{}"))


def comparison_table(rows: Sequence[Mapping]) -> tuple[str, list[dict]]:
    """(Markdown table, CSV-ready rows): one row per setting, latency as a ratio to the baseline's."""
    out = []
    for r in rows:
        r = dict(r)
        r.pop("_latency", None)
        timing = r.pop("_timing", None)
        r["latency_ratio"], r["latency_note"] = None, None
        if r.get("method") == "none" and not r.get("error"):
            r["latency_ratio"] = 1.0                       # the reference every ratio is paired with
        elif timing is not None:
            value, note = latency_cell(timing)
            r["latency_ratio"], r["latency_note"] = value, note
        out.append(r)
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in out:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key) if key != "error" else (r.get("error") or r.get("note"))
            if key == "latency_ratio" and v is None:
                v = r.get("latency_note")
            if _num(v):
                cells.append(fmt.format(100 * v if key in ("chair_s", "chair_i") else v))
            elif isinstance(v, str):
                cells.append(" ".join(v.replace("|", "/").split()))
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", out


def latency_cell(timing: Mapping) -> tuple[float | None, str | None]:
    """``(ratio, None)`` when a setting's paired timing measured, else ``(None, why)``.

    ``timing``: ``{"ratios": per-round setting / baseline, "times": every timed batch's seconds, "load": the highest
    1-minute load average seen while timing it, "cores": cores used}`` (:func:`paired_timing`). A loaded machine
    comes first (its ratios are not evidence), then :func:`vtoolkit.bench.verdict.judge`."""
    from vtoolkit.bench.verdict import judge, load_note

    if timing.get("skipped"):
        return None, timing["skipped"]
    note = load_note(timing.get("load"), int(timing.get("cores") or 1))
    if note:
        return None, note
    j = judge(timing.get("ratios") or [], timing.get("times") or [])
    return (j["value"], None) if j["status"] == "ok" else (None, j["note"] or "not timed")


def _timing_batch(model, processor, batch_size: int):
    from vtoolkit.data import scenes as S
    from vtoolkit.models import get_adapter

    images = [S.render(S.make_scene(S.TRAIN_SEED, i)) for i in range(batch_size)]
    return get_adapter(model).prepare_inputs(processor, images, ["Is there a star in the image?"] * batch_size,
                                             device=model.device)


def paired_timing(model, processor, settings: Sequence[tuple[str, dict]], batch_size: int,
                  rounds: int = TIMING_ROUNDS, new_tokens: int = TIMING_NEW_TOKENS, clock=None, load=None,
                  cores=None) -> dict[str, dict]:
    """Per setting label, the paired timing :func:`latency_cell` judges: ``rounds`` rounds of (one baseline batch,
    one batch with the setting applied through ``vt.apply_method``), ``new_tokens`` forced per batch.

    ``clock(fn) -> seconds`` times one batch (default: wall time), ``load() -> float | None`` reads the 1-minute load
    average (default ``os.getloadavg``; sampled before and after each setting), ``cores`` the cores used (default:
    torch's threads) -- injectable, so tests never depend on the machine. A setting that fails to apply is left out
    (its evaluation row already says why)."""
    import torch

    import vtoolkit as vt
    from vtoolkit.bench.verdict import load_average

    if clock is None:
        def clock(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    load = load or load_average
    if cores is None:
        cores = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    batch = _timing_batch(model, processor, batch_size)

    def gen():
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    out = {}
    for method, options in settings:
        if method == "none" or method in NOT_APPLICABLE:
            continue
        loads = [load()]
        ratios, times = [], []
        try:
            for _ in range(rounds):
                tb = clock(gen)
                with vt.apply_method(model, method, **options):
                    tm = clock(gen)
                ratios.append(tm / tb if tb > 0 else float("nan"))
                times += [tb, tm]
        except Exception:  # noqa: BLE001 - the evaluation row reports the failure
            continue
        loads.append(load())
        known = [x for x in loads if x is not None]
        out[_label(method, options)] = {"ratios": ratios, "times": times, "load": max(known) if known else None,
                                        "cores": cores}
    return out


def latency_summary(table_rows: Sequence[Mapping], timings: Mapping) -> dict:
    """What the latency column measured: ``{"rule", "measured", "not_measured": {setting: why}, "text"}``."""
    timed = [r for r in table_rows if r["setting"] in timings]
    bad = {r["setting"]: r["latency_note"] for r in timed if r.get("latency_ratio") is None}
    rounds = max((len(t.get("ratios") or []) for t in timings.values()), default=TIMING_ROUNDS) or TIMING_ROUNDS
    rule = (f"latency x base: median over {rounds} paired rounds (baseline batch, setting batch) of the time "
            f"ratio; not a measurement when the machine was loaded (load average > cores used + 0.5) or the "
            f"rounds spread by more than 0.25 ((max - min) / median)")
    skipped = {r["setting"] for r in timed if timings[r["setting"]].get("skipped")}
    if timed and len(skipped) == len(timed):
        text = f"latency x base: {timings[next(iter(skipped))]['skipped']}"
        return {"rule": rule, "measured": 0, "not_measured": bad, "text": text}
    text = f"{rule}; measured {len(timed) - len(bad)} of {len(timed)} settings"
    if bad:
        text += "; not measured: " + "; ".join(f"{k}: {v}" for k, v in bad.items())
    return {"rule": rule, "measured": len(timed) - len(bad), "not_measured": bad, "text": text}


def _warm_up(model, processor, batch_size: int) -> None:
    """One untimed batch through ``generate`` before the first setting, so that the baseline (measured first) does
    not pay the process's one-time costs (thread pool start, first allocations) that the later settings skip."""
    import torch

    from vtoolkit.data import scenes as S
    from vtoolkit.models import get_adapter

    images = [S.render(S.make_scene(S.TRAIN_SEED, i)) for i in range(batch_size)]
    batch = get_adapter(model).prepare_inputs(processor, images, ["Is there a star in the image?"] * batch_size,
                                              device=model.device)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False)


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, batch_size: int = 16, progress: bool = True,
             settings: Sequence[tuple[str, dict]] | None = None, echo=print, timing_rounds: int | None = None) -> dict:
    """Run the demo into ``out``; returns ``{"ok", "table", "rows", "report", "seconds", "out"}``.
    ``timing_rounds``: paired rounds per setting for the latency column (default :data:`TIMING_ROUNDS`; ``quick``:
    0, the cells say "not timed (--quick)")."""
    import pandas as pd
    from tqdm.auto import tqdm

    from vtoolkit.data import synthetic
    from vtoolkit.eval.report import write_report
    from vtoolkit.eval.runner import evaluate, load_model, resolve_config
    from vtoolkit.registry import get_method

    t0 = time.perf_counter()
    out = Path(out)
    sizes = QUICK if quick else FULL
    data = synthetic.write_benchmarks(out / "data", **sizes)
    settings = list(settings if settings is not None else demo_settings())
    model_and_processor = load_model(MODEL)
    _warm_up(*model_and_processor, batch_size)
    rows, run_dirs = [], []
    bar = tqdm(settings, desc="vtoolkit demo", unit="setting", disable=not progress, dynamic_ncols=True)
    for method, options in bar:
        bar.set_postfix_str(_label(method, options))
        run_dir = out / "runs" / _dirname(method, options)
        metrics, error, kind = None, None, "-"
        if method in NOT_APPLICABLE:
            rows.append({**_row(method, options, get_method(method).kind, None, None), "note": NOT_APPLICABLE[method]})
            continue
        try:
            kind = get_method(method).kind
            cfg = resolve_config(model=MODEL, method=method, method_options=options, benchmarks=list(data),
                                 data={b: str(p) for b, p in data.items()}, protocol_overrides=synthetic.PROTOCOL,
                                 batch_size=batch_size)
            metrics = evaluate(cfg, run_dir, resume=True, model_and_processor=model_and_processor, progress=False)
            run_dirs.append(run_dir)
        except Exception as e:  # noqa: BLE001 - one failing method is an error row, the others still run
            error = f"{type(e).__name__}: {e}"
            (out / "runs").mkdir(parents=True, exist_ok=True)
            (out / "runs" / f"{_dirname(method, options)}.error.txt").write_text(traceback.format_exc())
        rows.append(_row(method, options, kind, metrics, error))
    bar.close()
    ran = [(m, o) for (m, o), r in zip(settings, rows) if r.get("error") is None and m not in NOT_APPLICABLE]
    rounds = (0 if quick else TIMING_ROUNDS) if timing_rounds is None else timing_rounds
    if rounds:
        timings = paired_timing(*model_and_processor, ran, batch_size, rounds=rounds)
    else:   # --quick is a smoke test of the pipeline: its latency cells say that nothing was timed
        timings = {_label(m, o): {"skipped": "not timed (--quick)" if quick else "not timed"} for m, o in ran
                   if m != "none"}
    for r in rows:
        if r["setting"] in timings:
            r["_timing"] = timings[r["setting"]]
    table, table_rows = comparison_table(rows)
    (out / "table.md").write_text(table, encoding="utf-8")
    pd.DataFrame(table_rows).to_csv(out / "table.csv", index=False)
    report = write_report(run_dirs, out / "report") if run_dirs else None
    seconds = time.perf_counter() - t0
    ok = all(r.get("error") is None for r in table_rows)
    summary = {"ok": ok, "seconds": round(seconds, 1), "model": MODEL, "sizes": sizes, "batch_size": batch_size,
               "settings": [{"method": m, "options": o} for m, o in settings],
               "errors": {r["setting"]: r["error"] for r in table_rows if r.get("error")},
               "latency": latency_summary(table_rows, timings)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    echo(table)
    if report is not None:
        echo(f"report: {report['markdown']}  table: {out / 'table.md'}  plots: "
             f"{', '.join(p.name for p in report['plots'])} (in {report['markdown'].parent})")
    echo(summary["latency"]["text"])
    echo(f"{len(settings)} settings in {seconds:.0f} s" + ("" if ok else f"; FAILED: {', '.join(summary['errors'])}"))
    return {"ok": ok, "table": table, "rows": table_rows, "report": report, "seconds": seconds, "out": out}


def register(app) -> None:
    """Mount ``vtoolkit demo`` on the typer ``app``."""
    import typer

    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="output folder (data, runs, report, table)"),
        quick: bool = typer.Option(False, "--quick", help="a few samples per benchmark (a smoke test, seconds)"),
        batch_size: int = typer.Option(16, "--batch-size"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Baseline vs every registered method on the built-in reference model and synthetic POPE/MME/CHAIR."""
        res = run_demo(out, quick=quick, batch_size=batch_size, progress=progress, echo=typer.echo)
        if not res["ok"]:
            raise typer.Exit(1)
