"""A `vtoolkit eval` process killed with SIGKILL half-way and resumed writes the same predictions as one that ran
through (no duplicate, no gap), compared field by field except timing."""
import json
import os
import signal
import subprocess
import sys
import time

from vtoolkit.eval import demo_data as dd

VOLATILE = ("latency_s", "batch_size")


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "vtoolkit", "eval", "--model", "tiny:llava", "--method", "fastervlm",
            "--set", "keep_ratio=0.25", "--bench", "pope", "--data", f"pope={data}", "--set", "pope.max_new_tokens=3",
            "--out", str(out), "--batch-size", "1", "--no-progress", *extra]


def _rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    data = dd.make_pope_json(tmp_path / "pope", n_images=12)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    full = tmp_path / "full"
    subprocess.run(_cmd(data, full), env=env, check=True, capture_output=True, timeout=300)
    expected = _rows(full / "predictions" / "pope.jsonl")
    assert len(expected) == 48

    run = tmp_path / "killed"
    preds = run / "predictions" / "pope.jsonl"
    proc = subprocess.Popen(_cmd(data, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if preds.exists() and len(preds.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    written = len(preds.read_bytes().splitlines()) if preds.exists() else 0
    assert 0 < written < 48, f"the kill did not land mid-run ({written} rows written)"

    subprocess.run(_cmd(data, run, "--resume"), env=env, check=True, capture_output=True, timeout=300)
    assert _rows(preds) == expected
