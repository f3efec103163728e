"""Sweeps (baseline always present), reports (md/csv/png with deltas), and the `vtoolkit eval` CLI."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_model
from vtoolkit.config import ConfigError
from vtoolkit.eval import demo_data as dd
from vtoolkit.eval.report import write_report
from vtoolkit.eval.runner import read_predictions
from vtoolkit.eval.sweep import expand_grid, run_sweep

REPO = Path(__file__).resolve().parents[1]


def test_expand_grid_always_has_one_baseline():
    pts = expand_grid({"methods": [{"method": "fastervlm", "grid": {"keep_ratio": [0.25, 0.1]}},
                                   {"method": "none"}, {"method": "random", "options": {"seed": 1}}]})
    assert pts[0] == ("none", {}, {})
    assert [p[0] for p in pts] == ["none", "fastervlm", "fastervlm", "random"]
    assert pts[2][1] == {"keep_ratio": 0.1}
    assert expand_grid({})[0][0] == "none"
    pre = expand_grid({"methods": [{"method": "fastervlm", "preset": "fastervlm.yaml", "grid": {"keep_ratio": [0.05]}}]})
    assert pre[1][1]["keep_ratio"] == 0.05 and pre[1][1]["budget_scope"] == "per_crop"


def test_sweep_and_report(tmp_path):
    pope = dd.make_pope_json(tmp_path / "pope", n_images=1)
    spec = {"model": "tiny:llava", "benchmarks": ["pope"], "data": {"pope": str(pope)},
            "protocol": {"pope": {"max_new_tokens": 2}}, "batch_size": 4,
            "methods": [{"method": "fastervlm", "preset": "fastervlm.yaml", "grid": {"keep_ratio": [0.25, 0.1]}}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    model, proc, _ = tiny_model("llava")
    res = run_sweep(path, out=tmp_path / "out", progress=False, model_and_processor=(model, proc))
    names = [r["name"] for r in res["runs"]]
    assert names == ["baseline", "fastervlm_keep_ratio=0.25", "fastervlm_keep_ratio=0.1"]
    rows = res["rows"]
    base = [r for r in rows if r["method"] == "none"]
    assert len(base) == 1 and base[0]["delta"] == 0 and base[0]["visual_tokens"] == 64
    kept = {r["run"]: r["visual_tokens"] for r in rows}
    assert kept["fastervlm_keep_ratio=0.25"] == 16 and kept["fastervlm_keep_ratio=0.1"] == 6
    assert all(r["token_ratio"] is not None and r["speedup"] is not None for r in rows)
    rep = res["report"]
    md = rep["markdown"].read_text()
    assert "| baseline | none |" in md and "delta" in md and "speedup" in md
    assert rep["csv"].read_text().count("\n") == 4
    assert len(rep["plots"]) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in rep["plots"])
    # a second call is refused unless it resumes, which only re-scores finished runs; report takes the sweep folder
    with pytest.raises(ConfigError, match="already holds results of run.*pass --resume"):
        run_sweep(path, out=tmp_path / "out", progress=False, model_and_processor=(model, proc))
    again = run_sweep(path, out=tmp_path / "out", progress=False, resume=True, model_and_processor=(model, proc))
    assert [r["score"] for r in again["rows"]] == [r["score"] for r in rows]
    rep2 = write_report([tmp_path / "out"], tmp_path / "rep2")
    assert len(rep2["table"]) == 3


def test_cli_eval_set_routing_and_resume(tmp_path, monkeypatch):
    from vtoolkit.cli import app
    from vtoolkit.eval import runner

    model, proc, _ = tiny_model("llava")
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: (model, proc))
    mme = dd.make_mme_parquet(tmp_path / "MME", n_images=1, tasks=["existence"])
    out = tmp_path / "run"
    args = ["eval", "--model", "tiny:llava", "--method", str(REPO / "configs" / "methods" / "fastervlm.yaml"), "--set", "keep_ratio=0.25",
            "--set", "mme.max_new_tokens=2", "--bench", "mme", "--data", str(mme), "--out", str(out),
            "--batch-size", "2", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "mme: MME total" in r.output and "64.0 -> 16.0" in r.output
    conf = json.loads((out / "config.json").read_text())
    assert conf["method"] == "fastervlm" and conf["method_options"]["keep_ratio"] == 0.25
    assert conf["protocols"]["mme"]["max_new_tokens"] == 2 and conf["data"]["mme"]["path"] == str(mme)
    assert len(read_predictions(out / "predictions" / "mme.jsonl")) == 2
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 2 and "already holds results of an earlier run" in r2.output and "--resume" in r2.output
    r3 = CliRunner().invoke(app, args + ["--resume"])
    assert r3.exit_code == 0, r3.output
    r4 = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert r4.exit_code == 0 and (tmp_path / "rep" / "report.csv").exists()


@pytest.mark.parametrize("bad", ["--data", "--bench"])
def test_cli_eval_errors_are_clear(tmp_path, bad):
    from vtoolkit.cli import app

    args = ["eval", "--model", "tiny:llava", "--bench", "pope,mme", "--out", str(tmp_path / "x")]
    args += ["--data", str(tmp_path)] if bad == "--data" else ["--bench", "pope,vqa", "--data", f"pope={tmp_path}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0
    msg = r.output + str(r.exception)
    assert ("BENCH=PATH" in msg) if bad == "--data" else ("unknown benchmark 'vqa'" in msg)
