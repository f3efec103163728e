"""Timing and memory helpers: warm-up, repeats, median; CUDA events on GPU, perf_counter on CPU."""
from __future__ import annotations

import resource
import statistics
import time

import torch


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int = 3, warmup: int = 1, device=None) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_bytes(device=None) -> int:
    """Peak GPU memory allocated (CUDA) or the process's peak RSS (CPU, a high-water mark since process start)."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak(device=None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def generate_latency(model, batch, decode_tokens: int, repeats: int, device=None) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) through ``model.generate``; EOS cannot stop early."""

    def gen(n):
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    prefill = timed(lambda: gen(1), repeats=repeats, device=device)
    if decode_tokens <= 0:
        return prefill, float("nan")
    total = timed(lambda: gen(1 + decode_tokens), repeats=repeats, device=device)
    return prefill, max(0.0, total - prefill) / decode_tokens
