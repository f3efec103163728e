"""`vtoolkit eval`, `vtoolkit sweep`, `vtoolkit report` (mounted by ``vtoolkit/eval/cli.py::register``)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from vtoolkit.eval.benchmark import list_benchmarks

# how `vtoolkit eval` names each setting in error messages
EVAL_NAMES = {"model": "--model", "method": "--method", "method_options": "--set", "benchmarks": "--bench",
              "data": "--data", "protocol": "--set", "limit": "--limit", "batch_size": "--batch-size",
              "dtype": "--dtype", "seed": "--seed", "attn_implementation": "--attn-implementation",
              "device_map": "--device-map", "out": "--out", "resume": "--resume", "overwrite": "--overwrite"}


def split_sets(items) -> tuple[dict, dict, dict]:
    """``--set`` items -> (method options, protocol overrides per bench, data options per bench).

    ``BENCH.max_new_tokens=10`` (BENCH a registered benchmark) is a protocol override, ``data.BENCH.KEY=VALUE`` a
    data option, anything else (``keep_ratio=0.1``) a method option."""
    from vtoolkit.config import ConfigError, parse_overrides

    try:
        parsed = parse_overrides(items)
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None
    protocol = {b: parsed.pop(b) for b in list_benchmarks() if b in parsed}
    data = parsed.pop("data", {}) or {}
    if not isinstance(data, dict):
        raise ConfigError("--set data.BENCH.KEY=VALUE sets a data option, e.g. data.BENCH.annotations=DIR")
    return parsed, protocol, data


def parse_data(items, benches) -> dict:
    """``--data BENCH=PATH`` (repeatable) or a bare ``--data PATH`` when one benchmark is evaluated."""
    import os
    import re

    from vtoolkit.config import ConfigError

    out: dict = {}
    for item in items or ():
        head, sep, rest = item.partition("=")
        if sep and head in list_benchmarks():
            out[head] = rest
        elif sep and re.fullmatch(r"[A-Za-z_][\w-]*", head) and not os.path.exists(item):
            raise ConfigError(f"--data {item!r}: unknown benchmark {head!r}; write BENCH=PATH with BENCH one of "
                              f"{', '.join(list_benchmarks())} (or a bare PATH when one benchmark is evaluated)")
        elif len(benches) == 1:
            out[benches[0]] = item
        else:
            b = benches[0] if benches else list_benchmarks()[0]
            raise ConfigError(f"--data {item!r}: with several benchmarks write BENCH=PATH (e.g. {b}=/data/{b})")
    return out


def _report_problems(metrics: dict) -> None:
    """Print the run's warnings; exit 1 naming each benchmark that could not be scored (first row error, count)."""
    from vtoolkit.cli import fail
    from vtoolkit.eval.runner import run_problems

    errors, warnings = run_problems(metrics)
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    if errors:
        fail("\n".join(errors), 1)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues the interrupted ``vtoolkit eval`` of ``argv`` (default ``sys.argv``): the
    same arguments, ``--overwrite`` dropped (it would delete what was done), ``--resume`` added."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "eval" not in args:   # not started from a command line (e.g. invoked in-process): name the rule
        return "the same vtoolkit eval command with --resume (without --overwrite)"
    args = [a for a in args if a != "--overwrite"]
    if "--resume" not in args and "--retry-errors" not in args:
        args.append("--resume")
    return "vtoolkit " + shlex.join(args)


def _interrupted(out: Path) -> None:
    """Ctrl-C: say where the run is and how to continue it, exit 130 (the shell's code for SIGINT)."""
    if (Path(out) / "config.json").is_file():
        typer.echo(f"interrupted: the predictions written so far are kept in the run folder {out}; continue with:\n"
                   f"  {resume_command()}", err=True)
    else:
        typer.echo(f"interrupted before anything was written to {out}; run the same command again", err=True)
    raise typer.Exit(code=130)


def register_commands(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option(..., "--model", help="checkpoint path / hub id, or tiny:llava|llava_next|qwen2_vl|"
                                                       "qwen2_5_vl|qwen3_vl|llava_onevision|internvl (offline tiny random "
                                                       "model)"),
        method: str = typer.Option("none", "--method", help="method name, or a preset YAML (configs/methods/*.yaml)"),
        sets: list[str] = typer.Option([], "--set", help="key=value: method option (keep_ratio=0.1), protocol "
                                                         "override (BENCH.max_new_tokens=10) or data option "
                                                         "(data.BENCH.annotations=DIR); repeatable"),
        bench: str | None = typer.Option(None, "--bench", help="comma-separated benchmark names (vtoolkit list "
                                                               "--benchmarks; default: the first, "
                                                               f"{list_benchmarks()[0]})"),
        data: list[str] = typer.Option([], "--data", help="BENCH=PATH (repeatable), see vtoolkit.eval.datasets"),
        out: Path = typer.Option(..., "--out", help="run folder"),
        limit: int | None = typer.Option(None, "--limit", help="N > 0 samples per benchmark, by the benchmark's "
                                                               "rule (the first N, or N spread over its splits)"),
        batch_size: int = typer.Option(1, "--batch-size", help="samples per generate call (> 0)"),
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out (same settings)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete the results already in --out first"),
        retry_errors: bool = typer.Option(False, "--retry-errors", help="run the rows that failed again (implies "
                                                                        "--resume)"),
        dtype: str = typer.Option("auto", "--dtype", help="auto|float16|bfloat16|float32"),
        seed: int = typer.Option(0, "--seed", help="seed of the tiny:ARCH random weights"),
        device_map: str | None = typer.Option(None, "--device-map", help="e.g. auto, cuda:0 (default: one device "
                                                                            "per process)"),
        attn_implementation: str | None = typer.Option(None, "--attn-implementation"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Evaluate a model with a method applied on registered benchmarks; writes predictions, config and metrics.

        Exits with 2 when a setting is wrong (checked before the model is built), 1 when a benchmark could not be
        scored (every row failed, or the scorer refused)."""
        from vtoolkit.config import ConfigError, load_method_preset
        from vtoolkit.eval.runner import evaluate, resolve_config

        benches = [b.strip() for b in (bench or list_benchmarks()[0]).split(",") if b.strip()]
        method_opts, protocol, data_opts = split_sets(sets)
        names = EVAL_NAMES
        if method.endswith((".yaml", ".yml")):
            preset = method
            try:
                method, preset_opts = load_method_preset(preset)
            except ConfigError as e:
                raise ConfigError(f"--method {e}") from None
            method_opts = {**preset_opts, **method_opts}
            names = {**EVAL_NAMES, "method_options": f"--method {preset} / --set"}
        data_map: dict = {b: {"path": p} for b, p in parse_data(data, benches).items()}
        for b, opts in data_opts.items():
            data_map.setdefault(b, {}).update(opts if isinstance(opts, dict) else {})
        cfg = resolve_config(model=model, method=method, method_options=method_opts, benchmarks=benches,
                             data=data_map, protocol_overrides=protocol, limit=limit, batch_size=batch_size,
                             dtype=dtype, device_map=device_map, attn_implementation=attn_implementation, seed=seed,
                             names=names)
        try:
            metrics = evaluate(cfg, out, resume=resume or retry_errors, overwrite=overwrite,
                               retry_errors=retry_errors, progress=progress, names=names)
        except KeyboardInterrupt:
            _interrupted(out)
        if metrics is None:   # a rank > 0 of a data-parallel run: rank 0 reports
            return
        for b, m in metrics["benchmarks"].items():
            head = m.get("headline")
            typer.echo(f"{b}: {m.get('headline_name') or 'not scored'} = "
                       f"{head if head is not None else m.get('headline_note') or m.get('score_error')} "
                       f"(n={m['n']}, errors={m['n_errors']}, "
                       f"visual tokens {m.get('visual_tokens_before')} -> {m.get('visual_tokens_after')})")
        typer.echo(f"run folder: {out}")
        _report_problems(metrics)

    @app.command("sweep")
    def sweep_cmd(
        path: Path = typer.Argument(..., help="sweep YAML (configs/sweeps/*.yaml)"),
        out: Path | None = typer.Option(None, "--out", help="output folder (default: the sweep's out / runs/NAME)"),
        data: list[str] = typer.Option([], "--data", help="BENCH=PATH: the data path of BENCH (its other keys, "
                                                          "e.g. images:, are kept)"),
        model: str | None = typer.Option(None, "--model", help="replaces the sweep's model"),
        limit: int | None = typer.Option(None, "--limit", help="replaces the sweep's limit (N > 0)"),
        batch_size: int | None = typer.Option(None, "--batch-size", help="replaces the sweep's batch_size (> 0)"),
        resume: bool = typer.Option(False, "--resume", help="continue the sweep's runs (same settings)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete the results already in the runs' folders"),
        retry_errors: bool = typer.Option(False, "--retry-errors", help="run failed rows again (implies --resume)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="check the sweep, list the runs and exit"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Run a grid of methods x settings (baseline always included) over benchmarks, then write a report.

        The whole sweep is checked first (every problem listed, exit 2); exits 1 when a run's benchmark could not
        be scored."""
        from vtoolkit.cli import fail
        from vtoolkit.config import load_yaml
        from vtoolkit.eval.sweep import run_sweep

        spec = load_yaml(path)
        benches = spec.get("benchmarks", [])
        benches = [b.strip() for b in benches.split(",")] if isinstance(benches, str) else list(benches or [])
        overrides: dict = {"model": model, "limit": limit, "batch_size": batch_size}
        names = {k: f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None}
        res = run_sweep(path, out=out, resume=resume or retry_errors, overwrite=overwrite, retry_errors=retry_errors,
                        progress=progress, dry_run=dry_run, overrides=overrides,
                        data_paths=parse_data(data, benches), names=names)
        for r in res["runs"]:
            typer.echo(f"{r['name']}: {r['method']} {json.dumps(r['options'])} -> {r['dir']}")
        if res["report"]:
            typer.echo(f"report: {res['report']['markdown']}")
        for w in res["warnings"]:
            typer.echo(f"warning: {w}", err=True)
        if res["errors"]:
            fail("\n".join(res["errors"]), 1)

    @app.command("report")
    def report_cmd(
        runs: list[Path] = typer.Argument(..., help="run folders (or sweep folders holding runs)"),
        out: Path | None = typer.Option(None, "--out", help="where to write report.md/csv/png (default: the "
                                                               "first folder's parent /report)"),
    ) -> None:
        """Markdown + CSV table with deltas to the baseline, and score-vs-tokens / score-vs-latency plots.

        Deltas are only computed against a baseline run with the same samples, generation and scoring settings,
        batch size and dtype; other rows get a warning (here and in the report) naming what differs."""
        from vtoolkit.eval.report import write_report

        dest = out or (Path(runs[0]) / "report" if not (Path(runs[0]) / "metrics.json").exists()
                       else Path(runs[0]).parent / "report")
        rep = write_report(runs, dest)
        typer.echo(rep["markdown"].read_text())
        typer.echo(f"wrote {rep['markdown']}, {rep['csv']}, {len(rep['plots'])} plots")
        for w in rep["warnings"]:
            typer.echo(f"warning: {w}", err=True)
