"""Data parallel: two ranks (RANK/WORLD_SIZE, as set by `accelerate launch --multi_gpu --num_processes 2` or torchrun)
each take a shard; rank 0 merges the shards into one predictions file in dataset order, equal to a 1-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model
from vtoolkit.eval import demo_data as dd
from vtoolkit.eval.runner import evaluate, read_predictions, resolve_config

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("latency_s", "batch_size")


def test_two_ranks_merge_in_dataset_order(tmp_path):
    pope = dd.make_pope_json(tmp_path / "pope", n_images=2, splits=("random",), per_image=3)  # 6 samples
    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "vtoolkit", "eval", "--model", "tiny:llava", "--method", "fastervlm",
           "--set", "keep_ratio=0.25", "--set", "pope.max_new_tokens=3", "--bench", "pope", "--data", str(pope),
           "--out", str(out), "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "pope: POPE F1" in outs[1] and "pope:" not in outs[0]  # only rank 0 scores
    files = sorted(x.name for x in (out / "predictions").iterdir())
    assert files == ["pope.jsonl"]  # shards merged and removed
    merged = read_predictions(out / "predictions" / "pope.jsonl")
    assert [r["index"] for r in merged] == list(range(6))
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    model, proc, _ = tiny_model("llava")
    cfg = resolve_config(model="tiny:llava", method="fastervlm", method_options={"keep_ratio": 0.25},
                         benchmarks=["pope"], data={"pope": str(pope)},
                         protocol_overrides={"pope": {"max_new_tokens": 3}}, batch_size=2)
    evaluate(cfg, tmp_path / "single", model_and_processor=(model, proc), progress=False)
    single = read_predictions(tmp_path / "single" / "predictions" / "pope.jsonl")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]

    assert strip(merged) == strip(single)
