"""CLI command `vtoolkit bench`: prefill / decode latency, peak memory and analytic FLOPs vs. a same-process baseline."""
from __future__ import annotations

import json

import typer


def bench(shape: str = typer.Option("midsize", help="midsize (CLIP-L/336 + 16x2048 Llama, bf16) or tiny"),
          method: str = typer.Option("fastervlm", help="method to benchmark"),
          keep_ratios: str = typer.Option("0.25,0.10,0.05", help="comma-separated keep_ratio values"),
          batch_size: int = typer.Option(1, min=1), decode_tokens: int = typer.Option(8, min=0),
          repeats: int = typer.Option(3, min=1), out: str = typer.Option("", help="write rows as JSON here")) -> None:
    """Benchmark a pruning method against the baseline measured in the same process."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from vtoolkit.bench import midsize
    from vtoolkit.bench.run import run_bench

    console = Console()
    torch.manual_seed(0)
    with console.status(f"building the {shape} model"):
        model, proc = midsize.build() if shape == "midsize" else midsize.tiny_shape()
    ratios = [float(x) for x in keep_ratios.split(",") if x.strip()]
    rows = run_bench(model, proc, [(method, {"keep_ratio": r}) for r in ratios], batch_size=batch_size,
                     decode_tokens=decode_tokens, repeats=repeats, progress=lambda s: console.log(f"measuring {s}"))
    table = Table(title=f"{method} on {shape} ({rows[0]['dtype']}, {rows[0]['device']}, batch {batch_size})")
    for col in ("setting", "LLM tokens", "prefill s", "x base", "analytic", "decode s/tok", "x base ", "peak GB"):
        table.add_column(col)
    for r in rows:
        setting = "baseline" if r["method"] == "baseline" else f"keep_ratio={r.get('keep_ratio')}"
        table.add_row(setting, str(r["llm_tokens"]), f"{r['prefill_s']:.3f}", f"{r['prefill_ratio']:.3f}",
                      f"{r['analytic_prefill_ratio']:.3f}", f"{r['decode_s_per_token']:.4f}",
                      f"{r['decode_ratio']:.3f}" if r["decode_ratio"] is not None else "-",
                      f"{r['peak_mem_bytes'] / 1e9:.2f}")
    console.print(table)
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=2)


def register(app: typer.Typer) -> None:
    """Mount the bench command on the main app."""
    app.command("bench")(bench)
