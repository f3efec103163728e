"""Optional record of what the plugin kept (tests): ``VTOOLKIT_VLLM_TRACE=FILE`` appends one JSON line per image,
``{"image": image_seed(pixels, 0), "sum": pixel sum, "shape", "kept": [...], "before": N}``, so a test can match images by their pixels."""
from __future__ import annotations

import json
import os

import vtoolkit_core


def record(pixels, kept, before: int) -> None:
    path = os.environ.get("VTOOLKIT_VLLM_TRACE")
    if not path:
        return
    row = {"image": vtoolkit_core.image_seed(pixels, 0), "sum": float(pixels.double().sum()),
           "shape": list(pixels.shape), "kept": [int(i) for i in kept], "before": int(before)}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def record_positions(positions, delta: int) -> None:
    """Qwen2-VL: the M-RoPE positions ``[3, L']`` of a pruned prompt after the repair, and the decode delta."""
    path = os.environ.get("VTOOLKIT_VLLM_TRACE")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"mrope": positions.tolist(), "delta": int(delta)}) + "\n")
