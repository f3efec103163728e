"""``vtoolkit demo``: runs offline on a fresh process, writes table + report + plots, surfaces failing methods."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vtoolkit.config import MethodConfig
from vtoolkit.methods.base import Method

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


def test_demo_cli_quick_fresh_process_without_nltk_data(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), NLTK_DATA=str(tmp_path / "no_nltk_data_here"))
    proc = subprocess.run([sys.executable, "-m", "vtoolkit", "demo", "--out", str(out), "--quick", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("table.md", "table.csv", "demo.json", "report/report.md", "report/report.csv",
              "report/pope_score_vs_tokens.png", "report/mme_score_vs_latency.png", "report/chair_score_vs_tokens.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "demo.json").read_text())
    assert summary["ok"] and not summary["errors"]
    table = (out / "table.md").read_text()
    assert table in proc.stdout
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(summary["settings"]) >= 8
    assert rows[0].startswith("| baseline | 64.0 |")
    assert any(r.startswith("| fastervlm keep_ratio=0.05 | 3.0 |") for r in rows)
    assert all(r.endswith("| not timed (--quick) |  |") for r in rows[1:] if "n/a" not in r)   # no paired timing
    assert "latency x base: not timed (--quick)" in proc.stdout
    import pandas as pd

    df = pd.read_csv(out / "table.csv")
    base = df[df["setting"] == "baseline"].iloc[0]
    assert base["pope_acc_random"] >= 0.8 and base["latency_ratio"] == 1.0   # a model that sees, even on 4 images
    ran = df[df["note"].isna()] if "note" in df else df                      # VAR: a row that says n/a
    assert ran["chair_s"].notna().all()                                       # CHAIR scored without NLTK data
    assert df[df["setting"] == "var"]["note"].str.startswith("n/a: ").all()


@dataclass(frozen=True)
class _BrokenConfig(MethodConfig):
    """No options."""


class _Broken(Method):
    def install(self, hooks, ctx) -> None:
        ctx.listeners.append(self)

    def on_prefill(self, ctx) -> None:
        raise RuntimeError("broken on purpose")


@pytest.fixture
def broken_method():
    from vtoolkit import registry

    name = "vtk_test_broken_mitigation"
    registry.get_method("none")  # built-ins loaded first
    registry.register_method(name, config=_BrokenConfig, kind="mitigate", stage="decode",
                             architectures=("llava",))(_Broken)
    yield name
    registry._METHODS.pop(name, None)


def test_registered_mitigation_methods_join_the_demo(broken_method):
    from vtoolkit.demo import demo_settings

    settings = demo_settings()
    assert settings[0] == ("none", {})
    assert [m for m, _ in settings].count("fastervlm") == 3 and ("fastv", {}) in settings
    assert settings.index(("dart", {})) == settings.index(("fastv", {})) + 1
    assert (broken_method, {}) in settings


def test_failing_method_is_an_error_row_and_a_failed_demo(broken_method, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vtoolkit import demo
    from vtoolkit.cli import app

    monkeypatch.setattr(demo, "demo_settings", lambda: [("none", {}), (broken_method, {})])
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--quick", "--no-progress"])
    assert res.exit_code == 1, res.output
    rows = (tmp_path / "d" / "table.md").read_text().strip().splitlines()[2:]
    assert len(rows) == 2 and rows[0].startswith("| baseline |") and rows[0].endswith("|  |")
    assert broken_method in rows[1] and "broken on purpose" in rows[1]
    assert "FAILED" in res.output


def test_latency_cells_from_synthetic_timings():
    """Paired timings decide the latency cell: stable -> the median ratio; loaded machine, spread rounds or a
    non-positive time -> a note instead of a number (no real timing, no real machine load)."""
    from vtoolkit.demo import comparison_table, latency_cell

    stable = {"ratios": [0.44, 0.45, 0.47], "times": [1.0, 0.44, 1.0, 0.45, 1.0, 0.47], "load": 1.2, "cores": 2}
    assert latency_cell(stable) == (0.45, None)
    assert latency_cell({**stable, "load": 3.2}) == (None, "machine loaded (load 3.2 on 2 cores)")
    assert latency_cell({**stable, "ratios": [0.5, 1.0, 1.4]}) == (None, "unstable (spread 0.90)")
    assert latency_cell({**stable, "times": [1.0, -0.2]}) == (None, "non-positive time (-0.2)")
    rows = [{"setting": "baseline", "method": "none", "error": None},
            {"setting": "a", "method": "a", "error": None, "_timing": stable},
            {"setting": "b", "method": "b", "error": None, "_timing": {**stable, "load": 5.0}},
            {"setting": "c", "method": "c", "error": None, "_timing": {**stable, "ratios": [1.0, 2.0, 1.5]}}]
    table, out = comparison_table(rows)
    cells = [line.split(" | ")[-2] for line in table.strip().splitlines()[2:]]
    assert cells == ["1.00", "0.45", "machine loaded (load 5.0 on 2 cores)", "unstable (spread 0.67)"]
    assert [r["latency_ratio"] for r in out] == [1.0, 0.45, None, None]
    from vtoolkit.demo import latency_summary

    summary = latency_summary(out, {r["setting"]: r["_timing"] for r in rows if "_timing" in r})
    assert summary["measured"] == 1 and set(summary["not_measured"]) == {"b", "c"}
    assert "measured 1 of 3 settings" in summary["text"] and "c: unstable (spread 0.67)" in summary["text"]


def test_paired_timing_interleaves_baseline_and_setting():
    from conftest import tiny_model
    from vtoolkit.demo import latency_cell, paired_timing
    from vtoolkit.hooks import count_hooks

    model, proc, _ = tiny_model("llava")
    clean = count_hooks(model)
    calls, ticks = [], iter([2.0, 1.0, 2.0, 1.1, 2.0, 0.9] + [1.0] * 6)

    def clock(fn):
        calls.append(count_hooks(model) != clean)
        fn()
        return next(ticks)

    loads = iter([0.5, 0.7, 9.0, 9.0])
    t = paired_timing(model, proc, [("none", {}), ("fastervlm", {"keep_ratio": 0.1}), ("var", {}),
                                    ("random", {"keep_ratio": 0.5})], 2, rounds=3, clock=clock,
                      load=lambda: next(loads), cores=2)
    assert list(t) == ["fastervlm keep_ratio=0.1", "random keep_ratio=0.5"]       # baseline and n/a not timed
    assert calls[:6] == [False, True, False, True, False, True]                   # baseline, then the setting
    assert t["fastervlm keep_ratio=0.1"]["ratios"] == [0.5, 0.55, 0.45]
    assert latency_cell(t["fastervlm keep_ratio=0.1"]) == (0.5, None)
    assert latency_cell(t["random keep_ratio=0.5"])[1] == "machine loaded (load 9.0 on 2 cores)"
