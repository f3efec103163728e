"""Run a pruning benchmark: the baseline first, then each method setting, all in one process on one model."""
from __future__ import annotations

import platform

import torch

from vtoolkit.bench import flops as F
from vtoolkit.bench.measure import generate_latency, peak_memory_bytes, reset_peak

DEFAULT_QUESTION = ("Is there a dog in the image? Answer the question using a single word or phrase. "
                    "Look carefully at every object.")


def make_batch(model, processor, batch_size: int, question: str = DEFAULT_QUESTION, image_size=(400, 300)):
    import vtoolkit as vt

    adapter = vt.models.get_adapter(model)
    images = [vt.models.tiny.demo_image(i, image_size) for i in range(batch_size)]
    return adapter.prepare_inputs(processor, images, [question] * batch_size, device=model.device)


def run_bench(model, processor, methods, batch_size: int = 1, decode_tokens: int = 8, repeats: int = 3,
              progress=None) -> list[dict]:
    """``methods``: list of ``(name, overrides)``. Returns one row per setting; the first row is the baseline
    (no method), measured in the same process; ratios are to it."""
    import vtoolkit as vt

    batch = make_batch(model, processor, batch_size)
    shape = F.Shape.from_model(model)
    full = int(batch["input_ids"].shape[1])
    dev = model.device
    rows = []
    settings = [("baseline", {})] + list(methods)
    for name, overrides in settings:
        if progress:
            progress(f"{name} {overrides}")
        reset_peak(dev)
        handle = None if name == "baseline" else vt.apply_method(model, name, **overrides)
        try:
            prefill, decode = generate_latency(model, batch, decode_tokens, repeats, dev)
            stats = handle.stats if handle else {}
        finally:
            if handle:
                handle.remove()
        vis_before = (batch["input_ids"][0] == vt.models.get_adapter(model).image_token_id).sum().item()
        vis_after = stats.get("visual_tokens_after", [vis_before])[0]
        llm_tokens = full - vis_before + vis_after
        rows.append({"method": name, **{k: v for k, v in overrides.items()}, "batch_size": batch_size,
                     "prompt_tokens": full, "llm_tokens": llm_tokens, "visual_tokens": vis_after,
                     "prefill_s": prefill, "decode_s_per_token": decode, "peak_mem_bytes": peak_memory_bytes(dev),
                     "flops_prefill": F.prefill_flops(shape, llm_tokens) * batch_size,
                     "flops_decode_per_token": F.decode_flops(shape, llm_tokens) * batch_size})
    base = rows[0]
    for r in rows:
        r["prefill_ratio"] = r["prefill_s"] / base["prefill_s"]
        r["decode_ratio"] = r["decode_s_per_token"] / base["decode_s_per_token"] if base["decode_s_per_token"] else None
        r["analytic_prefill_ratio"] = r["flops_prefill"] / base["flops_prefill"]
        r["device"] = str(dev) if dev.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, " \
                                                          f"{torch.get_num_threads()} threads)"
        r["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return rows
