"""Run a pruning benchmark: the baseline first, then each method setting, all in one process on one model.

Each setting is applied with the public API (``vt.apply_method(model, name, **overrides)``, removed afterwards), and
measured through the stock ``model.generate`` (see :mod:`vtoolkit.bench.measure`). Ratios are to the baseline row,
which is always measured first, on the same model and batch.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import statistics

import torch

from vtoolkit.bench import flops as F
from vtoolkit.bench.measure import current_memory_bytes, generate_latency, machine_load, peak_memory_bytes, reset_peak

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


def run_bench(model, processor, methods, batch_size: int = 1, prompt_tokens: int | None = None,
              decode_tokens: int = 8, repeats: int = 3, progress=None, warmup: int = 1) -> list[dict]:
    """Benchmark ``methods`` (a list of ``(name, overrides)``) against the untouched model.

    Returns one row per setting; row 0 is the baseline (no method), measured in this process on the same batch, in
    ``repeats`` interleaved rounds (each round: baseline, then every setting) so drift hits all rows alike;
    every row has ``prefill_s``, ``decode_s_per_token`` (medians; per-repeat values in ``*_runs``), ``peak_mem_bytes``
    (and ``peak_mem_delta_bytes`` above the memory in use before the row), analytic ``flops_prefill`` /
    ``flops_decode_per_token`` for the token counts the method actually kept, the visual tokens kept, and ratios to
    the baseline: ``prefill_ratio``, ``prefill_ratio_paired`` (median of per-round ratios), ``decode_ratio``, ``analytic_prefill_ratio`` (the FLOPs bound on the prefill
    speed-up), ``mem_ratio``, ``generate_s`` / ``generate_ratio_paired`` (end-to-end generate of 1 + decode_tokens
    tokens, paired per round like the prefill).
    """
    import vtoolkit as vt

    batch = make_batch(model, processor, batch_size, prompt_tokens=prompt_tokens)
    shape = F.Shape.from_model(model)
    dev = model.device
    B = int(batch["input_ids"].shape[0])
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    device = str(dev) if dev.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, " \
                                                f"{torch.get_num_threads()} threads)"
    settings = [("baseline", {})] + list(methods)
    # Interleaved rounds: every round measures every setting once (baseline first), so slow drift of the machine
    # (frequency, other processes) hits all settings alike; the first round also records memory and warms up.
    lats = [{"prefill_runs": [], "decode_runs": [], "generate_runs": []} for _ in settings]
    first: list[tuple] = []
    for rnd in range(repeats):
        for i, (name, overrides) in enumerate(settings):
            if progress and rnd == 0:
                progress(f"{name} {overrides}" if overrides else name)
            if rnd == 0:
                before = current_memory_bytes(dev)
                resettable = reset_peak(dev)
            handle = None if name == "baseline" else vt.apply_method(model, name, **overrides)
            try:
                lat = generate_latency(model, batch, decode_tokens, 1, dev, warmup=warmup if rnd == 0 else 0)
                stats = handle.stats if handle is not None else {}
            finally:
                if handle is not None:
                    handle.remove()
            for key in ("prefill_runs", "decode_runs", "generate_runs"):
                lats[i][key] += lat[key]
            if rnd == 0:
                first.append((before, resettable, peak_memory_bytes(dev), stats))
    rows = []
    for (name, overrides), (before, resettable, peak, stats), runs in zip(settings, first, lats):
        lat = {"prefill_s": statistics.median(runs["prefill_runs"]),
               "decode_s_per_token": statistics.median(runs["decode_runs"]) if runs["decode_runs"] else float("nan"),
               "generate_s": statistics.median(runs["generate_runs"]), **runs}
        c = _token_counts(model, batch, stats)
        pruned = c["kept_len"] != c["full_len"]
        kw = dict(kept_tokens=c["kept_len"], from_layer=c["from_layer"]) if pruned else {}
        ckw = dict(kept_context=c["kept_len"], from_layer=c["from_layer"]) if pruned else {}
        # methods that skip vision layers nobody reads (FasterVLM) report how many ran
        row_shape = dataclasses.replace(shape, vision_layers=stats.get("vision_layers_run", shape.vision_layers))
        rows.append({
            "method": name, **overrides, "batch_size": B, "prompt_tokens": c["full_len"],
            "llm_tokens": c["kept_len"] if c["from_layer"] == 0 else c["full_len"],
            "llm_tokens_after_pruning": c["kept_len"], "pruned_from_layer": c["from_layer"],
            "visual_tokens": c["visual_tokens_after"][0], "visual_tokens_per_sample": c["visual_tokens_after"],
            "visual_tokens_before": c["visual_tokens_before"][0],
            **lat,
            "peak_mem_bytes": peak, "peak_mem_delta_bytes": peak - before, "peak_resettable": resettable,
            "vision_layers_run": row_shape.vision_layers,
            "flops_prefill": B * F.prefill_flops(row_shape, c["full_len"], **kw),
            "flops_decode_per_token": B * F.decode_flops(shape, c["full_len"], **ckw),
            "device": device, "dtype": dtype, "load_per_core": machine_load(),
            "method_stats": _jsonable(stats),   # what the method decided in its last measured call (e.g. VAR's sinks)
        })
    base = rows[0]

    def ratio(a, b):
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else None   # None: 0 / NaN / negative base

    for r in rows:
        r["prefill_ratio"] = ratio(r["prefill_s"], base["prefill_s"])
        # paired: median over rounds of (this setting / the baseline measured in the same round)
        per_round = [ratio(a, b) for a, b in zip(r["prefill_runs"], base["prefill_runs"])]
        per_round = [x for x in per_round if x is not None]
        r["prefill_ratio_paired"] = statistics.median(per_round) if per_round else None
        r["decode_ratio"] = ratio(r["decode_s_per_token"], base["decode_s_per_token"])
        per_round = [ratio(a, b) for a, b in zip(r["generate_runs"], base["generate_runs"])]
        per_round = [x for x in per_round if x is not None]
        r["generate_ratio_paired"] = statistics.median(per_round) if per_round else None   # end to end
        r["analytic_prefill_ratio"] = r["flops_prefill"] / base["flops_prefill"]
        r["analytic_decode_ratio"] = r["flops_decode_per_token"] / base["flops_decode_per_token"]
        r["mem_ratio"] = ratio(r["peak_mem_bytes"], base["peak_mem_bytes"]) if r["peak_resettable"] else None
    return rows
