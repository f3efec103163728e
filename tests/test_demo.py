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
