"""Run a pruning benchmark: the baseline first, then each method setting, all in one process on one model.

Each setting is applied with the public API (``vt.apply_method(model, name, **overrides)``, removed afterwards), and
measured through the stock ``model.generate`` (see :mod:`vtoolkit.bench.measure`). Ratios are to the baseline row,
which is always measured first, on the same model and batch, paired per round; :func:`judge_rows` decides which
ratios are measurements (:mod:`vtoolkit.bench.verdict`). Oracle rows (:mod:`vtoolkit.bench.oracle`) time the stock
model on the sequence a method computed, so ``overhead = method / oracle - 1`` is the cost of the mechanics.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import statistics

import torch

from vtoolkit.bench import flops as F
from vtoolkit.bench.measure import (
    SPREAD_LIMIT,
    cores_used,
    current_memory_bytes,
    judge,
    load_average,
    machine_load,
    peak_memory_bytes,
    reset_peak,
    time_once,
)

DEFAULT_QUESTION = ("Is there a dog in the image? Answer the question using a single word or phrase. "
                    "Look carefully at every object.")
_FILLER = " Consider the colors, the shapes and the position of each object in the scene."


def make_batch(model, processor, batch_size: int, question: str = DEFAULT_QUESTION, image_size=(400, 300),
               prompt_tokens: int | None = None):
    """A batch of ``batch_size`` identical-length prompts (one synthetic image each). With ``prompt_tokens`` the
    question is lengthened with filler sentences until the prompt (image tokens included) has at least that many
    tokens; the actual length is ``batch["input_ids"].shape[1]``."""
    import vtoolkit as vt

    adapter = vt.models.get_adapter(model)
    images = [vt.models.tiny.demo_image(i, image_size) for i in range(batch_size)]

    def build(q):
        return adapter.prepare_inputs(processor, images, [q] * batch_size, device=model.device)

    batch = build(question)
    if prompt_tokens is not None:
        base = batch["input_ids"].shape[1]
        per = max(1, build(question + _FILLER)["input_ids"].shape[1] - base)
        if base < prompt_tokens:
            batch = build(question + _FILLER * -(-(prompt_tokens - base) // per))
    return batch


def _token_counts(model, batch, stats: dict) -> dict:
    """Per-sample visual tokens before / after and the LLM sequence length the padded batch actually runs."""
    import vtoolkit as vt

    ids, mask = batch["input_ids"], batch.get("attention_mask")
    vis_before = (ids == vt.models.get_adapter(model).image_token_id).sum(1).tolist()
    nonpad = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    vis_after = list(stats.get("visual_tokens_after") or vis_before)
    kept = [int(n - b + a) for n, b, a in zip(nonpad, vis_before, vis_after)]
    return {"visual_tokens_before": vis_before, "visual_tokens_after": vis_after,
            "full_len": int(ids.shape[1]), "kept_len": max(kept),
            "from_layer": int(stats.get("layer", 0) or 0)}   # mid-stack methods (FastV) report the first pruned layer


def _jsonable(obj):
    """``stats`` as plain JSON values (tensors -> lists, keys -> str)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _latency_round(gen, decode_tokens: int, device, clock: str = "wall") -> dict:
    """One paired measurement: ``gen(1)`` (prefill) then ``gen(1 + decode_tokens)``; decode per token =
    ``(t(1 + n) - t(1)) / n`` (not clamped: a non-positive value says noise exceeded the decode cost)."""
    t1 = time_once(lambda: gen(1), device, clock)
    if decode_tokens > 0:
        tn = time_once(lambda: gen(1 + decode_tokens), device, clock)
        return {"prefill_runs": [t1], "decode_runs": [(tn - t1) / decode_tokens], "generate_runs": [tn]}
    return {"prefill_runs": [t1], "decode_runs": [], "generate_runs": [t1]}


CELLS = ("prefill", "decode", "generate")


def judge_rows(rows: list[dict], limit: float = SPREAD_LIMIT) -> list[dict]:
    """Per row, whether each paired ratio measured (:func:`vtoolkit.bench.measure.judge`): sets ``prefill_judged``,
    ``decode_judged``, ``generate_judged`` (ratio to the baseline of the same round), on oracle rows
    ``overhead_judged`` (the method's prefill / the oracle's of the same round) and ``overhead_of_base`` (median
    over rounds of (method - oracle) / baseline prefill), and ``measured`` (every cell the row has measured).
    The baseline's own ratios are 1 by definition; its times must still be positive."""
    base = rows[0]
    for i, r in enumerate(rows):
        ok = True
        for cell in CELLS:
            runs, bruns = r.get(f"{cell}_runs") or [], base.get(f"{cell}_runs") or []
            if i == 0:
                j = judge([1.0] * len(runs), runs, limit) if runs else judge([], ())
            else:
                j = judge([a / b if b > 0 else float("nan") for a, b in zip(runs, bruns)], runs + bruns, limit)
            r[f"{cell}_judged"] = j
            ok &= j["status"] in ("ok", "missing")
        of = r.get("oracle_of")
        if of is not None:
            m = rows[of]
            pairs = list(zip(m["prefill_runs"], r["prefill_runs"], base["prefill_runs"]))
            j = judge([a / o if o > 0 else float("nan") for a, o, _ in pairs], [x for p in pairs for x in p], limit)
            r["overhead_judged"] = j
            r["overhead"] = j["value"] - 1 if j["value"] is not None else None
            r["overhead_of_base"] = (statistics.median((a - o) / b for a, o, b in pairs)
                                     if j["status"] == "ok" else None)
            ok &= j["status"] == "ok"
        r["measured"] = ok
    return rows


def run_bench(model, processor, methods, batch_size: int = 1, prompt_tokens: int | None = None,
              decode_tokens: int = 8, repeats: int = 3, progress=None, warmup: int = 1, max_repeats: int | None = None,
              oracles: bool = True, spread_limit: float = SPREAD_LIMIT, clock: str = "wall",
              flops_shape=None) -> list[dict]:
    """Benchmark ``methods`` (a list of ``(name, overrides)``) against the untouched model.

    Returns one row per setting; row 0 is the baseline (no method), measured in this process on the same batch, in
    ``repeats`` interleaved rounds (each round: baseline, then every setting) so drift hits all rows alike; while a
    paired ratio did not measure (:func:`judge_rows`: spread of the per-round ratios above ``spread_limit``, or a
    non-positive time), further rounds run, up to ``max_repeats`` in all (default ``repeats``: none).
    After every method that has one (:mod:`vtoolkit.bench.oracle`, with ``oracles``) comes its oracle row
    (``method == "oracle"``, ``oracle_of`` = the index of the method's row): the stock model on the sequence the
    method computed in its first measured call.
    Every row has ``prefill_s``, ``decode_s_per_token`` (medians; per-repeat values in ``*_runs``), ``peak_mem_bytes``
    (and ``peak_mem_delta_bytes`` above the memory in use before the row), analytic ``flops_prefill`` /
    ``flops_decode_per_token`` for the token counts the method actually kept, the visual tokens kept, and ratios to
    the baseline: ``prefill_ratio``, ``prefill_ratio_paired`` (median of per-round ratios), ``decode_ratio``,
    ``decode_ratio_paired``, ``analytic_prefill_ratio`` (the FLOPs bound on the prefill speed-up), ``mem_ratio``,
    ``generate_s`` / ``generate_ratio_paired`` (end-to-end generate of 1 + decode_tokens tokens, paired per round like
    the prefill), the ``*_judged`` verdicts and ``measured`` (:func:`judge_rows`), ``load_avg`` / ``cores``.
    ``clock``: ``"wall"`` or ``"cpu"`` (this process's CPU seconds, see :class:`vtoolkit.bench.measure._Timer`).
    ``flops_shape(model, batch)``: the analytic FLOPs shape (default ``Shape.from_model``, LLaVA towers; the issue-19
    families: :func:`vtoolkit.bench.midsize.flops_shape`).
    """
    import vtoolkit as vt
    from vtoolkit.bench import oracle as O

    batch = make_batch(model, processor, batch_size, prompt_tokens=prompt_tokens)
    shape = flops_shape(model, batch) if flops_shape is not None else F.Shape.from_model(model)
    dev = model.device
    B = int(batch["input_ids"].shape[0])
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    device = str(dev) if dev.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, " \
                                                f"{torch.get_num_threads()} threads)"
    max_repeats = max(repeats, max_repeats or repeats)

    def stock(n):
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    # row specs: (name, overrides, kind); kind "method" or ("oracle", index of its method's row)
    specs: list[tuple] = [("baseline", {}, "method")]
    for name, overrides in methods:
        specs.append((name, dict(overrides), "method"))
        if oracles and O.has_oracle(model, vt.registry.get_method(name).name):
            specs.append(("oracle", {}, ("oracle", len(specs) - 1)))
    lats = [{"prefill_runs": [], "decode_runs": [], "generate_runs": []} for _ in specs]
    first: list[tuple] = []
    oracle_gen: dict[int, tuple] = {}

    def measure_round(rnd):
        for i, (name, overrides, kind) in enumerate(specs):
            if progress and rnd == 0:
                progress(f"{name} {overrides}" if overrides else (name if kind == "method" else
                                                                  f"oracle of row {kind[1]}"))
            if rnd == 0:
                before = current_memory_bytes(dev)
                resettable = reset_peak(dev)
            stats = {}
            if kind != "method":
                gen, decodes = oracle_gen[i]
                if rnd == 0:
                    for _ in range(warmup):
                        gen(1 + decode_tokens if decodes else 1)
                lat = _latency_round(gen, decode_tokens if decodes else 0, dev, clock)
                if not decodes:
                    lat["generate_runs"] = []
            else:
                handle = None if name == "baseline" else vt.apply_method(model, name, **overrides)
                try:
                    if rnd == 0:
                        for _ in range(warmup):
                            stock(1 + decode_tokens)
                    lat = _latency_round(stock, decode_tokens, dev, clock)
                    stats = handle.stats if handle is not None else {}
                finally:
                    if handle is not None:
                        handle.remove()
                if rnd == 0 and i + 1 < len(specs) and specs[i + 1][2] != "method":
                    oracle_gen[i + 1] = O.build(model, batch, vt.registry.get_method(name).name, stats)
            for key in ("prefill_runs", "decode_runs", "generate_runs"):
                lats[i][key] += lat[key]
            if rnd == 0:
                first.append((before, resettable, peak_memory_bytes(dev), stats, load_average()))

    # Interleaved rounds: every round measures every setting once (baseline first), so slow drift of the machine
    # (frequency, other processes) hits all settings alike; the first round also records memory and warms up.
    rounds = 0
    while True:
        measure_round(rounds)
        rounds += 1
        if rounds < repeats:
            continue
        rows = _rows(model, batch, shape, specs, first, lats, B, device, dtype, clock)
        judge_rows(rows, spread_limit)
        if all(r["measured"] for r in rows) or rounds >= max_repeats:
            break
        if progress:
            progress(f"round {rounds + 1} (of at most {max_repeats}): a paired ratio did not measure yet")
    for r in rows:
        r["rounds"] = rounds
    return rows


def _rows(model, batch, shape, specs, first, lats, B, device, dtype, clock="wall") -> list[dict]:
    rows = []
    for (name, overrides, kind), (before, resettable, peak, stats, load), runs in zip(specs, first, lats):
        lat = {"prefill_s": statistics.median(runs["prefill_runs"]),
               "decode_s_per_token": statistics.median(runs["decode_runs"]) if runs["decode_runs"] else float("nan"),
               "generate_s": statistics.median(runs["generate_runs"]) if runs["generate_runs"] else float("nan"),
               **{k: list(v) for k, v in runs.items()}}
        if kind != "method":   # the oracle ran what its method kept
            stats = first[kind[1]][3]
        c = _token_counts(model, batch, stats)
        pruned = c["kept_len"] != c["full_len"]
        kw = dict(kept_tokens=c["kept_len"], from_layer=c["from_layer"]) if pruned else {}
        ckw = dict(kept_context=c["kept_len"], from_layer=c["from_layer"]) if pruned else {}
        # methods that skip vision layers nobody reads (FasterVLM) report how many ran
        row_shape = dataclasses.replace(shape, vision_layers=stats.get("vision_layers_run", shape.vision_layers))
        rows.append({
            "method": name, **overrides, "options": dict(overrides), "batch_size": B, "prompt_tokens": c["full_len"],
            **({"oracle_of": kind[1]} if kind != "method" else {}),
            "llm_tokens": c["kept_len"] if c["from_layer"] == 0 else c["full_len"],
            "llm_tokens_after_pruning": c["kept_len"], "pruned_from_layer": c["from_layer"],
            "visual_tokens": c["visual_tokens_after"][0], "visual_tokens_per_sample": c["visual_tokens_after"],
            "visual_tokens_before": c["visual_tokens_before"][0],
            **lat,
            "peak_mem_bytes": peak, "peak_mem_delta_bytes": peak - before, "peak_resettable": resettable,
            "vision_layers_run": row_shape.vision_layers,
            "flops_prefill": B * F.prefill_flops(row_shape, c["full_len"], **kw),
            "flops_decode_per_token": B * F.decode_flops(shape, c["full_len"], **ckw),
            "device": device, "dtype": dtype, "load_per_core": machine_load(), "load_avg": load,
            "cores": cores_used(), "clock": clock,
            "method_stats": _jsonable(stats) if kind == "method" else {},
        })
    base = rows[0]

    def ratio(a, b):
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else None   # None: 0 / NaN / negative base

    def paired(r, cell):
        per_round = [ratio(a, b) for a, b in zip(r[f"{cell}_runs"], base[f"{cell}_runs"])]
        per_round = [x for x in per_round if x is not None]
        return statistics.median(per_round) if per_round else None

    for r in rows:
        r["prefill_ratio"] = ratio(r["prefill_s"], base["prefill_s"])
        # paired: median over rounds of (this setting / the baseline measured in the same round)
        r["prefill_ratio_paired"] = paired(r, "prefill")
        r["decode_ratio"] = ratio(r["decode_s_per_token"], base["decode_s_per_token"])
        r["decode_ratio_paired"] = paired(r, "decode")
        r["generate_ratio_paired"] = paired(r, "generate")   # end to end
        r["analytic_prefill_ratio"] = r["flops_prefill"] / base["flops_prefill"]
        r["analytic_decode_ratio"] = r["flops_decode_per_token"] / base["flops_decode_per_token"]
        r["mem_ratio"] = ratio(r["peak_mem_bytes"], base["peak_mem_bytes"]) if r["peak_resettable"] else None
    return rows
