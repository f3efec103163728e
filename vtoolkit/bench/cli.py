"""CLI command `vtoolkit bench`: prefill / decode latency, peak memory and analytic FLOPs vs. a same-process baseline."""
from __future__ import annotations

import json
import math
import time

import typer


def _fmt(x, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def bench(shape: str = typer.Option("midsize", help="midsize (CLIP-L/336 + 16x2048 Llama, bf16) or tiny"),
          method: str = typer.Option("fastervlm", help="method to benchmark"),
          keep_ratios: str = typer.Option("0.25,0.10,0.05", help="comma-separated keep_ratio values, one row each "
                                                                  "('' for methods without keep_ratio)"),
          sets: list[str] = typer.Option([], "--set", help="key=value method option for every row, e.g. ratio=0.5 "
                                                           "for fastv"),
          batch_size: int = typer.Option(1, min=1), decode_tokens: int = typer.Option(8, min=0),
          repeats: int = typer.Option(3, min=1),
          prompt_tokens: int = typer.Option(0, min=0, help="lengthen the question to at least this many prompt "
                                                           "tokens (image tokens included); 0: ~600 as built"),
          llm_layers: int = typer.Option(16, min=1, help="midsize: LLM layers"),
          hidden: int = typer.Option(2048, min=64, help="midsize: LLM hidden size (heads of 128 dims)"),
          out: str = typer.Option("", help="write rows as JSON here")) -> None:
    """Benchmark a pruning method against the baseline measured first in the same process.

    Every setting is checked before the model is built (a wrong one exits with 2 and one line naming the option)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import vtoolkit as vt
    from vtoolkit.bench import midsize
    from vtoolkit.bench.run import run_bench
    from vtoolkit.cli import print_table
    from vtoolkit.config import ConfigError, parse_overrides
    from vtoolkit.eval.validate import method_config, method_name

    if shape not in ("midsize", "tiny"):
        raise ConfigError(f"--shape must be midsize or tiny, got {shape!r}")
    try:
        ratios = [float(x) for x in keep_ratios.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--keep-ratios must be comma-separated numbers, got {keep_ratios!r}") from None
    try:
        method = method_name(method)
    except ConfigError as e:
        raise ConfigError(f"--method: {e}") from None
    try:
        fixed = parse_overrides(sets)
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None
    try:
        method_config(method, fixed)
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None
    cfg_cls = vt.get_config_class(method)
    if ratios and "keep_ratio" not in cfg_cls.field_names():
        raise ConfigError(f"--keep-ratios: {method!r} has no keep_ratio option; pass --keep-ratios '' and set its "
                          f"options with --set (options: {', '.join(cfg_cls.field_names())})")
    for r in ratios:
        try:
            method_config(method, {**fixed, "keep_ratio": r})
        except ConfigError as e:
            raise ConfigError(f"--keep-ratios {r}: {e}") from None
    settings = [(method, {**fixed, "keep_ratio": r}) for r in ratios] or [(method, fixed)]
    console = Console()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with console.status(f"building the {shape} model"):
        if shape == "midsize":
            model, proc = midsize.build(llm_layers=llm_layers, hidden=hidden, heads=max(1, hidden // 128),
                                        kv_heads=max(1, hidden // 128), intermediate=int(hidden * 2.75))
        else:
            model, proc = midsize.tiny_shape()
    console.log(f"built the {shape} model in {time.perf_counter() - t0:.1f} s")
    rows = run_bench(model, proc, settings, batch_size=batch_size,
                     prompt_tokens=prompt_tokens or None, decode_tokens=decode_tokens, repeats=repeats,
                     progress=lambda s: console.log(f"measuring {s}"))
    b = rows[0]
    table = Table(title=f"{method} on {shape} ({b['dtype']}, {b['device']}, batch {b['batch_size']}, "
                        f"{b['prompt_tokens']} prompt tokens)",
                  caption="x base: median over rounds of the ratio to the baseline measured in the same round; "
                          "bound: analytic FLOPs ratio of the tokens kept (the vision tower is not pruned, so the "
                          "prefill bound stays well above keep_ratio; side streams of mitigation methods are not "
                          "counted); generate: end to end, prefill + every decode step")
    for col in ("setting", "visual", "LLM tokens", "prefill s", "x base", "bound", "decode s/tok", "x base",
                "bound", f"generate {1 + decode_tokens} s", "x base", "peak GB", "+GB"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    labels = ["baseline"] + [f"{m} " + " ".join(f"{k}={v}" for k, v in o.items()) for m, o in settings]
    for r, setting in zip(rows, labels):
        table.add_row(setting, str(r["visual_tokens"]), str(r["llm_tokens_after_pruning"]), _fmt(r["prefill_s"], ".3f"),
                      _fmt(r["prefill_ratio_paired"], ".3f"), _fmt(r["analytic_prefill_ratio"], ".3f"),
                      _fmt(r["decode_s_per_token"], ".4f"), _fmt(r["decode_ratio"], ".3f"),
                      _fmt(r["analytic_decode_ratio"], ".3f"), _fmt(r["generate_s"], ".3f"),
                      _fmt(r["generate_ratio_paired"], ".3f"), _fmt(r["peak_mem_bytes"] / 1e9, ".2f"),
                      _fmt(r["peak_mem_delta_bytes"] / 1e9, ".2f"))
    print_table(table)
    loads = [r["load_per_core"] for r in rows if r["load_per_core"] is not None]
    if loads and max(loads) > 1.5:
        typer.echo(f"warning: machine load reached {max(loads):.1f} per core during the run: other processes "
                   f"competed for the CPU and the timings are noisy", err=True)
    if any(r["decode_s_per_token"] <= 0 for r in rows):   # NaN (no decode measured) compares False
        typer.echo("warning: a non-positive decode time means noise exceeded the decode cost: raise --decode-tokens "
                   "or --repeats", err=True)
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=2)
        console.log(f"wrote {len(rows)} rows to {out}")


def register(app: typer.Typer) -> None:
    """Mount the bench command on the main app."""
    app.command("bench")(bench)
