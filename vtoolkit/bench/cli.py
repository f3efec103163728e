"""CLI command `vtoolkit bench`: prefill / decode latency, peak memory and analytic FLOPs vs. a same-process baseline."""
from __future__ import annotations

import json
import math
import time

import typer

from vtoolkit.bench.verdict import EXIT_UNSTABLE, SPREAD_LIMIT, load_note, ratio_cell


def _fmt(x, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


SHAPES = ("midsize", "tiny", "llava7b")


def _ratio(r, cell) -> str:
    j = r.get(f"{cell}_judged")
    return ratio_cell(j) if j is not None else "-"


def _overhead(r) -> str:
    j = r.get("overhead_judged")
    if j is None:
        return ""
    if j["status"] != "ok":
        return ratio_cell(j)
    return f"{100 * r['overhead']:+.1f} % ({100 * r['overhead_of_base']:+.1f} % of base)"


def row_label(r: dict, rows: list[dict]) -> str:
    """``baseline``, ``method k=v ...``, or ``oracle of <method row>``."""
    if r.get("oracle_of") is not None:
        return "  oracle (stock model, same tokens)"
    opts = [f"{k}={v}" for k, v in (r.get("options") or {}).items()]
    return " ".join([r["method"]] + opts)


def result_table(rows: list[dict], title: str, decode_tokens: int, limit: float = SPREAD_LIMIT):
    """The rich table of :func:`vtoolkit.bench.run.run_bench` rows judged by
    :func:`vtoolkit.bench.run.judge_rows`: a ratio that did not measure shows why instead of a number."""
    from rich.table import Table

    table = Table(title=title, caption=RULE.format(limit=limit))
    for col in ("setting", "visual", "LLM tokens", "prefill s", "x base", "bound", "decode s/tok", "x base",
                "bound", f"generate {1 + decode_tokens} s", "x base", "overhead (prefill)", "peak GB", "+GB"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(row_label(r, rows), str(r["visual_tokens"]), str(r["llm_tokens_after_pruning"]),
                      _fmt(r["prefill_s"], ".3f"), _ratio(r, "prefill"), _fmt(r["analytic_prefill_ratio"], ".3f"),
                      _fmt(r["decode_s_per_token"], ".4f"), _ratio(r, "decode"),
                      _fmt(r["analytic_decode_ratio"], ".3f"), _fmt(r["generate_s"], ".3f"),
                      _ratio(r, "generate"), _overhead(r), _fmt(r["peak_mem_bytes"] / 1e9, ".2f"),
                      _fmt(r["peak_mem_delta_bytes"] / 1e9, ".2f"))
    return table


RULE = ("x base: median over rounds of the ratio to the baseline measured in the same round; a ratio whose per-round "
        "values spread by more than {limit:.2f} ((max - min) / median), or that comes from a non-positive time, is "
        "not a measurement: its cell says why and the exit status is 3. bound: analytic FLOPs ratio of the tokens "
        "kept (the vision tower is not pruned; side streams of mitigation methods are not counted). generate: end "
        "to end, prefill + every decode step. oracle: the stock model, no hooks, on the sequence the method "
        "computed; overhead = method / oracle - 1 (prefill, paired per round), and (method - oracle) / baseline.")


def exit_status(rows: list[dict]) -> int:
    """0 when every cell measured, :data:`vtoolkit.bench.measure.EXIT_UNSTABLE` (3) when one did not."""
    return 0 if all(r.get("measured", True) for r in rows) else EXIT_UNSTABLE


def bench(shape: str = typer.Option("midsize", help="midsize (CLIP-L/336 + 16x2048 Llama, bf16), tiny, or llava7b "
                                                    "(LLaVA-1.5-7B dims, random weights, bf16, CUDA only)"),
          method: str = typer.Option("fastervlm", help="method to benchmark"),
          keep_ratios: str = typer.Option("0.25,0.10,0.05", help="comma-separated keep_ratio values, one row each "
                                                                  "('' for methods without keep_ratio)"),
          sets: list[str] = typer.Option([], "--set", help="key=value method option for every row, e.g. ratio=0.5 "
                                                           "for fastv"),
          batch_size: int = typer.Option(1, min=1), decode_tokens: int = typer.Option(8, min=0),
          repeats: int = typer.Option(3, min=1),
          max_repeats: int = typer.Option(0, min=0, help="while a paired ratio did not measure (spread above "
                                                         "--spread-limit or a non-positive time), run more rounds, "
                                                         "up to this many in all (0: 2 x --repeats)"),
          spread_limit: float = typer.Option(SPREAD_LIMIT, min=0.0, help="largest accepted (max - min) / median "
                                                                         "of a cell's per-round ratios"),
          clock: str = typer.Option("wall", help="wall: elapsed time; cpu: this process's CPU seconds (on a "
                                                 "machine other jobs load; use with --threads 1)"),
          threads: int = typer.Option(0, min=0, help="torch intra-op threads (0: torch's default)"),
          oracle: bool | None = typer.Option(None, "--oracle/--no-oracle", help="oracle row after each pruner / "
                                                                                 "mitigation setting (default: on; "
                                                                                 "--arch: prefill oracles of the "
                                                                                 "pruners)"),
          arch: str = typer.Option("", help="qwen3_vl, llava_onevision or internvl: a mid-size random model of that "
                                            "family (the real vision tower's layers, a --llm-layers x --hidden LLM, "
                                            "reduced images; vtoolkit/bench/midsize.py) instead of LLaVA; with "
                                            "--shape tiny a small stand-in"),
          prompt_tokens: int = typer.Option(0, min=0, help="lengthen the question to at least this many prompt "
                                                           "tokens (image tokens included); 0: ~600 as built"),
          llm_layers: int = typer.Option(16, min=1, help="midsize: LLM layers"),
          hidden: int = typer.Option(2048, min=64, help="midsize: LLM hidden size (heads of 128 dims)"),
          out: str = typer.Option("", help="write rows as JSON here")) -> None:
    """Benchmark a method against the baseline measured in the same process, in interleaved rounds.

    Every setting is checked before the model is built (a wrong one exits with 2 and one line naming the option).
    Exit status: 0 every cell measured; 3 a paired ratio did not measure after --max-repeats rounds (its cell says
    "unstable (spread X)" or "non-positive time (...)"); 2 a wrong setting."""
    import torch
    from rich.console import Console

    import vtoolkit as vt
    from vtoolkit.bench import midsize
    from vtoolkit.bench.run import run_bench
    from vtoolkit.cli import print_table
    from vtoolkit.config import ConfigError, parse_overrides
    from vtoolkit.eval.validate import method_config, method_name

    if shape not in SHAPES:
        raise ConfigError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if arch and arch not in midsize.FAMILIES:
        raise ConfigError(f"--arch must be one of {', '.join(midsize.FAMILIES)}, got {arch!r} (LLaVA: leave --arch "
                          f"out)")
    if arch and shape == "llava7b":
        raise ConfigError("--arch builds that family at the midsize (or --shape tiny) size; --shape llava7b is LLaVA")
    oracle = True if oracle is None else oracle
    if clock not in ("wall", "cpu"):
        raise ConfigError(f"--clock must be wall or cpu, got {clock!r}")
    if threads:
        torch.set_num_threads(threads)
    if shape == "llava7b" and not torch.cuda.is_available():
        raise ConfigError("--shape llava7b builds LLaVA-1.5-7B dims (7B random weights, ~14 GB in bf16) and runs only "
                          "on a CUDA GPU; this machine has none (use --shape midsize on a CPU)")
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
        if arch:
            model, proc = midsize.family(arch, llm_layers=llm_layers, hidden=hidden, small=shape == "tiny")
        elif shape == "midsize":
            model, proc = midsize.build(llm_layers=llm_layers, hidden=hidden, heads=max(1, hidden // 128),
                                        kv_heads=max(1, hidden // 128), intermediate=int(hidden * 2.75))
        elif shape == "llava7b":
            model, proc = midsize.llava7b(device="cuda")
        else:
            model, proc = midsize.tiny_shape()
    console.log(f"built the {shape} {arch or 'llava'} model in {time.perf_counter() - t0:.1f} s")
    if arch and oracle:
        typer.echo(f"note: --arch {arch}: oracle rows measure the prefill only (vtoolkit/bench/oracle.py)", err=True)
    rows = run_bench(model, proc, settings, batch_size=batch_size,
                     prompt_tokens=prompt_tokens or None, decode_tokens=decode_tokens, repeats=repeats,
                     max_repeats=max_repeats or 2 * repeats, oracles=oracle, spread_limit=spread_limit, clock=clock,
                     progress=lambda s: console.log(f"measuring {s}"),
                     flops_shape=midsize.flops_shape if arch else None)
    b = rows[0]
    loads = [r["load_avg"] for r in rows if r.get("load_avg") is not None]
    load = f", load {max(loads):.1f} on {b['cores']} cores" if loads else ""
    title = (f"{method} on {shape}{' ' + arch if arch else ''} ({b['dtype']}, {b['device']}, batch {b['batch_size']}, "
             f"{b['prompt_tokens']} prompt tokens, {b['rounds']} rounds, {clock} clock{load})")
    print_table(result_table(rows, title, decode_tokens, spread_limit))
    note = load_note(max(loads) if loads else None, b["cores"])
    if note:
        typer.echo(f"warning: {note} during the run: other processes competed for the CPU", err=True)
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=2)
        console.log(f"wrote {len(rows)} rows to {out}")
    code = exit_status(rows)
    if code:
        bad = [row_label(r, rows).strip() for r in rows if not r["measured"]]
        typer.echo(f"error: not measured after {b['rounds']} rounds: {'; '.join(bad)} (exit status {code}; quiet the "
                   f"machine or raise --max-repeats)", err=True)
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Mount the bench command on the main app."""
    app.command("bench")(bench)
