"""``vtoolkit report RUN_DIR...``: one table (Markdown + CSV) over run folders with deltas to the baseline, and plots.

One row per (run, benchmark): the headline score and the secondary metrics each benchmark declares
(:attr:`vtoolkit.eval.benchmark.Benchmark.metrics`), mean visual tokens kept per sample, mean latency per sample, errors. The baseline of a row is the run with
method ``none`` on the same model and benchmark (the first one found); ``delta`` = score - baseline score,
``rel_score`` = score / baseline, ``speedup`` = baseline latency / latency, ``token_ratio`` = kept / baseline kept.

Those four are only computed when the run and its baseline are comparable: the same samples (count, limit and data
fingerprint), generation settings, scoring settings, batch size and dtype. Otherwise they stay empty and the report
warns, naming what differs; a benchmark without a baseline run is said so too (``warnings`` of
:func:`write_report`, also at the top of ``report.md``).

Plots (matplotlib, Agg backend), one pair per benchmark: score vs visual tokens kept, score vs latency; axes name
the metric and its unit, and each setting's label is placed where it overprints no other label or marker.
A folder without ``metrics.json`` whose sub-folders have one (a sweep folder) is expanded.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_table", "collect_runs", "write_report"]

def _declared(bench: str):
    """The registered benchmark ``bench``, or None for one that is not installed here (a run made with a plug-in):
    its rows then show the headline only."""
    from vtoolkit.config import ConfigError
    from vtoolkit.eval.benchmark import get_benchmark

    try:
        return get_benchmark(bench)
    except ConfigError:
        return None


def _secondary(bench: str):
    b = _declared(bench)
    return b.metrics if b is not None else ()


def collect_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding ``metrics.json``) from folders given; sweep folders are expanded, order kept."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "metrics.json").is_file():
            out.append(p)
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if (d / "metrics.json").is_file())
            if not subs:
                raise FileNotFoundError(f"{p}: no metrics.json here or in its sub-folders (did the run finish?)")
            out.extend(subs)
        else:
            raise FileNotFoundError(f"{p}: no such run folder")
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


def _get(d: Any, path: Sequence[str]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt_opts(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((opts or {}).items()) if v is not None) or "-"


_SCORING = ("scorer_rule", "zero_division")


def _read_json(path: Path) -> dict:
    from vtoolkit.config import ConfigError

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _settings(rd: Path, m: dict, bench: str, b: dict) -> dict:
    """What must match between a run and its baseline for a delta to mean something (None: not recorded)."""
    conf = _read_json(rd / "config.json") if (rd / "config.json").is_file() else {}
    proto = b.get("protocol") or (conf.get("protocols") or {}).get(bench)
    return {"samples": b.get("n"), "limit": m.get("limit", conf.get("limit")),
            "data": b.get("data_fingerprint") or (conf.get("data_fingerprint") or {}).get(bench),
            "generation": {k: v for k, v in proto.items() if k not in _SCORING + ("source",)} if proto else None,
            "scoring": {k: proto.get(k) for k in _SCORING} if proto else None,
            "batch_size": m.get("batch_size", conf.get("batch_size")), "dtype": m.get("dtype", conf.get("dtype"))}


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for k in a:
        if a[k] != b[k]:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                keys = [x for x in dict.fromkeys([*a[k], *b[k]]) if a[k].get(x) != b[k].get(x)]
                out.append(f"{k} ({', '.join(f'{x} {a[k].get(x)!r} vs {b[k].get(x)!r}' for x in keys)})")
            else:
                out.append(f"{k} ({'not recorded' if a[k] is None else repr(a[k])} vs "
                           f"{'not recorded' if b[k] is None else repr(b[k])})")
    return out


def build_table(run_dirs: Sequence[str | Path]):
    """A pandas DataFrame with one row per (run, benchmark), deltas to a comparable baseline included; the
    comparability and missing-baseline warnings are in ``df.attrs["warnings"]``."""
    import pandas as pd

    rows, settings = [], []
    for rd in collect_runs(run_dirs):
        m = _read_json(Path(rd) / "metrics.json")
        for bench, b in m.get("benchmarks", {}).items():
            row = {"run": Path(rd).name, "model": m.get("model"), "method": m.get("method", "none"),
                   "options": _fmt_opts(m.get("method_options")), "bench": bench, "metric": b.get("headline_name"),
                   "score": b.get("headline"), "higher_is_better": b.get("higher_is_better", True),
                   "visual_tokens": b.get("visual_tokens_after"), "visual_tokens_before": b.get("visual_tokens_before"),
                   "latency_ms": (b["latency_s"] * 1e3) if isinstance(b.get("latency_s"), (int, float)) else None,
                   "n": b.get("n"), "n_errors": b.get("n_errors"), "score_error": b.get("score_error"),
                   "score_note": b.get("headline_note")}
            for name, path in _secondary(bench):
                row[f"{bench}.{name}"] = _get(b, path)
            rows.append(row)
            settings.append(_settings(Path(rd), m, bench, b))
    df = pd.DataFrame(rows)
    df.attrs["warnings"] = warnings = []
    if df.empty:
        return df
    for col in ("baseline_score", "delta", "rel_score", "speedup", "token_ratio"):
        df[col] = None
    for (model, bench), grp in df.groupby(["model", "bench"], sort=False):
        base = grp[grp["method"] == "none"]
        if base.empty:
            warnings.append(f"{bench} on {model}: no baseline run (method none) among the runs given, so no delta, "
                            f"rel_score, speedup or token_ratio")
            continue
        b = base.iloc[0]
        for i in grp.index:
            diff = _differences(settings[i], settings[base.index[0]])
            if diff:
                warnings.append(f"{df.at[i, 'run']} ({bench}) is not comparable with the baseline {b['run']}: "
                                f"{'; '.join(diff)}; no delta or speedup computed")
                continue
            s, bs = df.at[i, "score"], b["score"]
            if _num(s) and _num(bs):
                df.at[i, "baseline_score"] = bs
                df.at[i, "delta"] = s - bs
                df.at[i, "rel_score"] = s / bs if bs else None
            if _num(df.at[i, "latency_ms"]) and _num(b["latency_ms"]) and df.at[i, "latency_ms"]:
                df.at[i, "speedup"] = b["latency_ms"] / df.at[i, "latency_ms"]
            if _num(df.at[i, "visual_tokens"]) and _num(b["visual_tokens"]) and b["visual_tokens"]:
                df.at[i, "token_ratio"] = df.at[i, "visual_tokens"] / b["visual_tokens"]
    return df


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _md_cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def to_markdown(df, columns: Sequence[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c == "delta" and _num(v):
                cells.append(f"{v:+.4g}")
            elif c == "score" and not _num(v) and isinstance(r.get("score_note"), str):
                # scored, but the metric is undefined (e.g. an F1 when no answer is "yes")
                cells.append(_md_cell(f"n/a ({r['score_note'].removeprefix('undefined: ')})"))
            else:
                cells.append(_md_cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MD_COLUMNS = ("run", "method", "options", "bench", "metric", "score", "delta", "rel_score", "visual_tokens",
              "token_ratio", "latency_ms", "speedup", "n", "n_errors")


def place_labels(ax, points, fontsize: float = 7.0) -> list:
    """Annotate ``points`` (``[(x, y, text, color), ...]`` in data coordinates) so that no label overlaps another
    label, a marker, the legend or the axes' edge: each label takes the first free slot of rings of candidate offsets
    around its point, moving outwards (with a leader line once it sits away from the point). Returns the texts."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    xy = ax.transData.transform([(p[0], p[1]) for p in points]) if points else []
    taken = [(x - 5 * px, y - 5 * px, x + 5 * px, y + 5 * px) for x, y in xy]   # the markers
    if ax.get_legend() is not None:
        lb = ax.get_legend().get_window_extent(renderer)
        taken.append((lb.x0, lb.y0, lb.x1, lb.y1))

    def free(b) -> bool:
        if b.x0 < frame.x0 or b.x1 > frame.x1 or b.y0 < frame.y0 or b.y1 > frame.y1:
            return False
        return all(b.x1 <= t[0] or b.x0 >= t[2] or b.y1 <= t[1] or b.y0 >= t[3] for t in taken)

    angles = (30, 150, -30, -150, 90, -90, 0, 180, 60, 120, -60, -120)
    texts = []
    for x, y, text, color in points:
        artist = None
        for radius in (6, 12, 20, 30, 42, 56, 72):
            for ang in angles:
                dx, dy = radius * math.cos(math.radians(ang)), radius * math.sin(math.radians(ang))
                ha = "left" if dx > 1e-6 else "right" if dx < -1e-6 else "center"
                va = "bottom" if dy > 1e-6 else "top" if dy < -1e-6 else "center"
                arrow = {"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7} if radius > 12 else None
                t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                fontsize=fontsize, color=color, arrowprops=arrow)
                b = t.get_window_extent(renderer)
                if free(b):
                    artist = t
                    taken.append((b.x0 - px, b.y0 - px, b.x1 + px, b.y1 + px))
                    break
                t.remove()
            if artist is not None:
                break
        if artist is None:  # a very crowded plot with no free slot within reach: far above, with a leader line
            artist = ax.annotate(text, (x, y), xytext=(0, 80), textcoords="offset points", ha="center",
                                 fontsize=fontsize, color=color,
                                 arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6})
        texts.append(artist)
    return texts


def _plot(df, bench: str, x: str, xlabel: str, path: Path) -> list:
    """Score vs ``x`` per method (lines through a method's settings, the baseline as a star); each setting is
    labelled with its options without overprinting (:func:`place_labels`). Returns the label artists."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sub = df[(df["bench"] == bench) & df["score"].map(_num) & df[x].map(_num)]
    metric = sub["metric"].dropna().iloc[0] if not sub.empty and sub["metric"].notna().any() else "score"
    fig, ax = plt.subplots(figsize=(7, 4.6))
    labels = []
    for method, grp in sub.groupby("method", sort=False):
        grp = grp.sort_values(x)
        marker = "*" if method == "none" else "o"
        (line,) = ax.plot(grp[x], grp["score"], marker=marker, markersize=11 if method == "none" else 6,
                          linestyle="-" if len(grp) > 1 else "none", label="baseline" if method == "none" else method)
        labels += [(r[x], r["score"], r["options"], line.get_color()) for _, r in grp.iterrows() if r["options"] != "-"]
    ax.set_xlabel(xlabel)
    unit = _declared(bench).unit if _declared(bench) is not None else None
    ax.set_ylabel(f"{metric} [{unit}]" if unit else metric)
    ax.set_title(f"{bench}: {metric} vs {xlabel}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.2)
    if not sub.empty:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    texts = place_labels(ax, labels)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return texts


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Write ``report.md``, ``report.csv`` and ``<bench>_score_vs_{tokens,latency}.png`` into ``out_dir``; returns
    their paths, the table and the ``warnings`` (runs not comparable with their baseline, missing baselines)."""
    out = Path(out_dir)
    df = build_table(run_dirs)
    if df.empty:
        from vtoolkit.config import ConfigError

        raise ConfigError("no benchmark results found in the given runs (their metrics.json list no benchmarks)")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "report.csv"
    df.to_csv(csv_path, index=False)
    warnings = df.attrs["warnings"]
    parts = ["# vtoolkit report\n", f"Runs: {', '.join(sorted(set(df['run'])))}\n",
             "Baseline = method `none` on the same model and benchmark, with the same samples, generation and "
             "scoring settings, batch size and dtype. `delta` = score - baseline; "
             "`speedup` = baseline latency / latency (per sample); "
             "`visual_tokens` = mean visual tokens per sample reaching the LLM.\n"]
    if warnings:
        parts.append("\n**Warnings**\n\n" + "".join(f"- {w}\n" for w in warnings))
    plots = []
    for bench in dict.fromkeys(df["bench"]):
        sub = df[df["bench"] == bench]
        parts.append(f"\n## {bench}\n\n")
        parts.append(to_markdown(sub, MD_COLUMNS))
        sec = [c for c in sub.columns if c.startswith(f"{bench}.")]
        if sec:
            parts.append("\n" + to_markdown(sub, ("run",) + tuple(sec)))
        errs = sub[sub["score_error"].notna()] if "score_error" in sub else sub.iloc[0:0]
        for _, r in errs.iterrows():
            parts.append(f"\n- {r['run']}: scoring failed: {r['score_error']}\n")
        for x, label, tag in (("visual_tokens", "visual tokens kept per sample [tokens]", "tokens"),
                              ("latency_ms", "latency per sample [ms]", "latency")):
            p = out / f"{bench}_score_vs_{tag}.png"
            _plot(df, bench, x, label, p)
            plots.append(p)
            parts.append(f"\n![{bench} score vs {tag}]({p.name})\n")
    md_path = out / "report.md"
    md_path.write_text("".join(parts), encoding="utf-8")
    return {"markdown": md_path, "csv": csv_path, "plots": plots, "table": df, "warnings": warnings}
