"""`vtoolkit eval`, `vtoolkit sweep`, `vtoolkit report` (mounted by ``vtoolkit/eval/cli.py::register``)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from vtoolkit.eval.protocol import BENCHMARKS


def split_sets(items) -> tuple[dict, dict, dict]:
    """``--set`` items -> (method options, protocol overrides per bench, data options per bench).

    ``pope.max_new_tokens=10`` is a protocol override, ``data.chair.annotations=DIR`` a data option, anything else
    (``keep_ratio=0.1``) a method option."""
    from vtoolkit.config import parse_overrides

    parsed = parse_overrides(items)
    protocol = {b: parsed.pop(b) for b in BENCHMARKS if b in parsed}
    data = parsed.pop("data", {}) or {}
    return parsed, protocol, data


def parse_data(items, benches) -> dict:
    """``--data pope=PATH`` (repeatable) or a bare ``--data PATH`` when one benchmark is evaluated."""
    out: dict = {}
    for item in items or ():
        head, sep, rest = item.partition("=")
        if sep and head in BENCHMARKS:
            out[head] = rest
        elif len(benches) == 1:
            out[benches[0]] = item
        else:
            raise typer.BadParameter(f"--data {item!r}: with several benchmarks write BENCH=PATH (e.g. pope=/data/pope)")
    return out


def register_commands(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option(..., "--model", help="checkpoint path / hub id, or tiny:llava|llava_next|qwen2_vl|"
                                                       "qwen2_5_vl (offline tiny random model)"),
        method: str = typer.Option("none", "--method", help="method name, or a preset YAML (configs/methods/*.yaml)"),
        sets: list[str] = typer.Option([], "--set", help="key=value: method option (keep_ratio=0.1), protocol "
                                                         "override (pope.max_new_tokens=10) or data option "
                                                         "(data.chair.annotations=DIR); repeatable"),
        bench: str = typer.Option("pope", "--bench", help="comma-separated: pope,chair,mme"),
        data: list[str] = typer.Option([], "--data", help="BENCH=PATH (repeatable), see vtoolkit.eval.datasets"),
        out: Path = typer.Option(..., "--out", help="run folder"),
        limit: int | None = typer.Option(None, "--limit", help="first N samples per benchmark"),
        batch_size: int = typer.Option(1, "--batch-size"),
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out"),
        dtype: str = typer.Option("auto", "--dtype", help="auto|float16|bfloat16|float32"),
        device_map: str | None = typer.Option(None, "--device-map", help="e.g. auto, cuda:0 (default: one device "
                                                                            "per process)"),
        attn_implementation: str | None = typer.Option(None, "--attn-implementation"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Evaluate a model with a method applied on POPE / CHAIR / MME; writes predictions, config and metrics."""
        from vtoolkit.config import load_method_preset
        from vtoolkit.eval.runner import evaluate, resolve_config

        benches = [b.strip() for b in bench.split(",") if b.strip()]
        method_opts, protocol, data_opts = split_sets(sets)
        if method.endswith((".yaml", ".yml")):
            method, preset_opts = load_method_preset(method)
            method_opts = {**preset_opts, **method_opts}
        data_map: dict = {b: {"path": p} for b, p in parse_data(data, benches).items()}
        for b, opts in data_opts.items():
            data_map.setdefault(b, {}).update(opts)
        cfg = resolve_config(model=model, method=method, method_options=method_opts, benchmarks=benches,
                             data=data_map, protocol_overrides=protocol, limit=limit, batch_size=batch_size,
                             dtype=dtype, device_map=device_map, attn_implementation=attn_implementation)
        metrics = evaluate(cfg, out, resume=resume, progress=progress)
        if metrics is not None:
            for b, m in metrics["benchmarks"].items():
                head = m.get("headline")
                typer.echo(f"{b}: {m.get('headline_name')} = {head if head is not None else m.get('score_error')} "
                           f"(n={m['n']}, errors={m['n_errors']}, visual tokens {m.get('visual_tokens_before')} -> "
                           f"{m.get('visual_tokens_after')})")
            typer.echo(f"run folder: {out}")

    @app.command("sweep")
    def sweep_cmd(
        path: Path = typer.Argument(..., help="sweep YAML, e.g. configs/sweeps/fastervlm_pope.yaml"),
        out: Path | None = typer.Option(None, "--out", help="output folder (default: the sweep's out / runs/NAME)"),
        data: list[str] = typer.Option([], "--data", help="BENCH=PATH, replaces the sweep's data for BENCH"),
        model: str | None = typer.Option(None, "--model", help="replaces the sweep's model"),
        limit: int | None = typer.Option(None, "--limit"),
        batch_size: int | None = typer.Option(None, "--batch-size"),
        resume: bool = typer.Option(False, "--resume"),
        dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and exit"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Run a grid of methods x settings (baseline always included) over benchmarks, then write a report."""
        from vtoolkit.config import load_yaml
        from vtoolkit.eval.sweep import run_sweep

        spec = load_yaml(path)
        benches = spec.get("benchmarks", [])
        benches = [b.strip() for b in benches.split(",")] if isinstance(benches, str) else list(benches)
        overrides: dict = {"model": model, "limit": limit, "batch_size": batch_size}
        if data:
            overrides["data"] = {**(spec.get("data") or {}), **parse_data(data, benches)}
        res = run_sweep(path, out=out, resume=resume, progress=progress, dry_run=dry_run, overrides=overrides)
        for r in res["runs"]:
            typer.echo(f"{r['name']}: {r['method']} {json.dumps(r['options'])} -> {r['dir']}")
        if res["report"]:
            typer.echo(f"report: {res['report']['markdown']}")

    @app.command("report")
    def report_cmd(
        runs: list[Path] = typer.Argument(..., help="run folders (or sweep folders holding runs)"),
        out: Path | None = typer.Option(None, "--out", help="where to write report.md/csv/png (default: the "
                                                               "first folder's parent /report)"),
    ) -> None:
        """Markdown + CSV table with deltas to the baseline, and score-vs-tokens / score-vs-latency plots."""
        from vtoolkit.eval.report import write_report

        dest = out or (Path(runs[0]) / "report" if not (Path(runs[0]) / "metrics.json").exists()
                       else Path(runs[0]).parent / "report")
        rep = write_report(runs, dest)
        typer.echo(rep["markdown"].read_text())
        typer.echo(f"wrote {rep['markdown']}, {rep['csv']}, {len(rep['plots'])} plots")
