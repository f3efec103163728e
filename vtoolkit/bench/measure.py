"""Timing and memory helpers: warm-up, repeats, median; CUDA events on GPU, perf_counter on CPU.

Latency goes through the stock ``model.generate`` (what users run): prefill = one ``generate`` with
``max_new_tokens=1``; decode per token = ``(t(1 + n) - t(1)) / n`` with ``min_new_tokens`` set so EOS cannot stop a
run early. The two runs are *paired* within each repeat and the median is taken over the per-repeat differences, so
slow drifts of the machine (another job starting) cancel instead of producing a negative decode time.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU (reset per measurement); on CPU the resident-set high-water
mark ``VmHWM``, reset per measurement through ``/proc/self/clear_refs`` (Linux), else the process-lifetime
``ru_maxrss`` (which can only grow: then only the first row is meaningful, and ``peak_resettable`` says so).
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import sys
import time

import torch


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _sync(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


class _Timer:
    """Seconds elapsed around a block: CUDA events on a CUDA device, otherwise ``perf_counter`` (``clock="wall"``)
    or ``process_time`` (``clock="cpu"``: CPU seconds of this process, all its threads -- on a machine that other
    jobs load, the work this process did rather than how long it waited for a core; meaningful with one thread,
    as idle OpenMP workers spin)."""

    def __init__(self, device=None, clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.device = device
        self.seconds = float("nan")
        self._now = time.process_time if clock == "cpu" else time.perf_counter

    def __enter__(self):
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = self._now()
        return self

    def __exit__(self, *exc):
        if _is_cuda(self.device):
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = self._now() - self._t0


def time_once(fn, device=None, clock: str = "wall") -> float:
    with _Timer(device, clock) as t:
        fn()
    return t.seconds


def timed(fn, repeats: int = 3, warmup: int = 1, device=None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))


# -- memory -----------------------------------------------------------------------------------------------------
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes, or None where unavailable."""
    try:
        with open(_STATUS) as fh:
            m = re.search(rf"^{field}:\s+(\d+)\s*kB", fh.read(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def reset_peak(device=None) -> bool:
    """Reset the peak-memory counter; returns whether a reset was possible."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:   # Linux >= 4.0: writing 5 resets the resident-set high-water mark (VmHWM) of this process
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_memory_bytes(device=None) -> int:
    """Memory in use now: ``torch.cuda.memory_allocated`` on GPU, the resident set (RSS) on CPU."""
    if _is_cuda(device):
        return int(torch.cuda.memory_allocated(device))
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else peak_memory_bytes(device)


def peak_memory_bytes(device=None) -> int:
    """Peak GPU memory allocated since the last :func:`reset_peak` (CUDA), or the peak resident set on CPU
    (``VmHWM``, since the last reset where the OS supports it; otherwise ``ru_maxrss`` since process start)."""
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)   # bytes on macOS, KiB on Linux


# -- generate-based latency -------------------------------------------------------------------------------------
def generate_latency(model, batch, decode_tokens: int, repeats: int, device=None, warmup: int = 1) -> dict:
    """Prefill and decode latency through ``model.generate`` (greedy, EOS cannot stop early).

    Returns ``{"prefill_s", "decode_s_per_token", "generate_s", "prefill_runs", "decode_runs", "generate_runs"}``:
    medians and the per-repeat values (so noise is visible); ``generate_s`` is the end-to-end ``generate`` of
    ``1 + decode_tokens`` new tokens. ``decode_s_per_token`` is NaN when ``decode_tokens == 0``; it is not clamped at 0, so a
    negative value flags a measurement swamped by noise.
    """

    def gen(n):
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for _ in range(warmup):
        gen(1 + decode_tokens)
    prefill_runs, decode_runs, generate_runs = [], [], []
    for _ in range(repeats):
        t1 = time_once(lambda: gen(1), device)
        prefill_runs.append(t1)
        if decode_tokens > 0:
            tn = time_once(lambda: gen(1 + decode_tokens), device)
            decode_runs.append((tn - t1) / decode_tokens)
            generate_runs.append(tn)
        else:
            generate_runs.append(t1)
    return {"prefill_s": statistics.median(prefill_runs),
            "decode_s_per_token": statistics.median(decode_runs) if decode_runs else float("nan"),
            "generate_s": statistics.median(generate_runs),
            "prefill_runs": prefill_runs, "decode_runs": decode_runs, "generate_runs": generate_runs}


def machine_load() -> float | None:
    """1-minute load average per CPU core (None where unavailable); above ~1 other work is competing for the CPU."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


# the verdicts (torch-free, so the CLI can import them cheaply)
from vtoolkit.bench.verdict import (  # noqa: E402,F401
    EXIT_UNSTABLE,
    SPREAD_LIMIT,
    judge,
    load_average,
    load_note,
    ratio_cell,
    spread,
)


def cores_used() -> int:
    """CPU cores this process computes on: torch's intra-op threads, at most the machine's cores."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
