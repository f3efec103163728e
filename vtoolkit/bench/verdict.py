"""Is a timing a measurement? The rules ``vtoolkit bench`` and ``vtoolkit demo`` apply before printing a ratio.

- A paired ratio (a setting's time / the baseline's time measured in the same round) is reported as the median over
  rounds only when the rounds agree: spread ``(max - min) / median`` of the per-round ratios <= :data:`SPREAD_LIMIT`
  (0.25). Otherwise its cell says ``unstable (spread X)``.
- A non-positive time (e.g. decode per token ``(t(1 + n) - t(1)) / n`` when noise exceeded the decode cost) is never a
  result: ``non-positive time (...)``.
- The machine is *loaded* when the 1-minute load average exceeds the cores this process computes on by more than
  0.5: ``machine loaded (load L on N cores)`` (:func:`load_note`).
- ``vtoolkit bench`` exits with :data:`EXIT_UNSTABLE` (3) when a cell did not measure.
"""
from __future__ import annotations

import math
import os
import statistics

SPREAD_LIMIT = 0.25
"""Largest accepted spread ``(max - min) / median`` of the per-round paired ratios of one cell (see :func:`judge`)."""
EXIT_UNSTABLE = 3
"""Exit status of ``vtoolkit bench`` when a cell did not measure (unstable rounds or a non-positive time)."""


def load_average() -> float | None:
    """The 1-minute load average (``os.getloadavg()[0]``), None where unavailable."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_note(load: float | None, cores: int, margin: float = 0.5) -> str | None:
    """``"machine loaded (load L on N cores)"`` when the 1-minute load average exceeds the ``cores`` this process uses
    by more than ``margin`` (this process itself accounts for up to ``cores`` runnable threads; the margin absorbs
    housekeeping), i.e. other work competed for the CPU; None otherwise (or when the load is unknown)."""
    if load is None or load <= cores + margin:
        return None
    return f"machine loaded (load {load:.1f} on {cores} core{'s' if cores != 1 else ''})"


def spread(values) -> float:
    """``(max - min) / median`` of ``values`` (inf when the median is not positive, NaN when empty)."""
    values = list(values)
    if not values:
        return float("nan")
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else float("inf")


def judge(ratios, times=(), limit: float = SPREAD_LIMIT) -> dict:
    """Whether per-round paired ratios are a measurement.

    ``ratios``: one ratio per round (setting time / baseline time of the same round); ``times``: the raw times the
    ratios came from (every one must be positive: a decode time ``(t(1 + n) - t(1)) / n <= 0`` means the noise
    exceeded the cost). Returns ``{"value", "spread", "status", "note"}``: ``status`` is ``"ok"`` (``value`` = the
    median ratio), ``"negative"`` (a time or ratio <= 0 or not finite), ``"unstable"`` (spread > ``limit``) or
    ``"missing"`` (no rounds); ``value`` is None unless ok; ``note`` is the cell text of a ratio that did not measure.
    """
    ratios, times = list(ratios), list(times)
    if not ratios:
        return {"value": None, "spread": float("nan"), "status": "missing", "note": None}
    def nonpositive(xs):
        return [x for x in xs if x is None or not math.isfinite(x) or x <= 0]

    bad = nonpositive(times) or nonpositive(ratios)     # name the time itself where a time is the culprit
    if bad:
        finite = [x for x in bad if x is not None and math.isfinite(x)]
        return {"value": None, "spread": float("nan"), "status": "negative",
                "note": f"non-positive time ({min(finite):.3g})" if finite else "no finite time"}
    s = spread(ratios)
    if s > limit:
        return {"value": None, "spread": s, "status": "unstable", "note": f"unstable (spread {s:.2f})"}
    return {"value": statistics.median(ratios), "spread": s, "status": "ok", "note": None}


def ratio_cell(j: dict, spec: str = ".3f") -> str:
    """The table cell of a :func:`judge` result: the ratio when it measured, else why not (``-``: nothing run)."""
    if j["status"] == "ok":
        return format(j["value"], spec)
    return j["note"] or "-"
