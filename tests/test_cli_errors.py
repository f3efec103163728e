"""The `vtoolkit` command line: expected errors are one `error:` line naming the option and the fix, exit 2, before
any model is built (a traceback only with --debug / VTOOLKIT_DEBUG=1); --version; list with no match; wide tables in
pipes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vtoolkit as vt
from vtoolkit.cli import app
from vtoolkit.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def one_error_line(res) -> str:
    """The single line a failed command printed (asserting there is exactly one, with the error: prefix)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail the test if a command builds a model before refusing its settings."""
    from vtoolkit.bench import midsize
    from vtoolkit.eval import runner

    def boom(*a, **k):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr(runner, "load_model", boom)
    monkeypatch.setattr(midsize, "build", boom)
    monkeypatch.setattr(midsize, "tiny_shape", boom)


def test_version():
    import vtoolkit

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"vtoolkit {vtoolkit.__version__}"
    out = subprocess.run([sys.executable, "-m", "vtoolkit", "--version"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"vtoolkit {vtoolkit.__version__}"


def test_list_without_match_says_so():
    res = CliRunner().invoke(app, ["list", "fastvlm*"])
    assert res.exit_code == 1
    names = ", ".join(r["name"] for r in vt.list_methods())
    assert f"no method matches 'fastvlm*'; registered methods: {names}" in res.output
    res = CliRunner().invoke(app, ["list", "fast*", "--json"])
    assert res.exit_code == 0 and '"name": "fastv"' in res.output


def test_tables_in_a_pipe_are_not_squeezed_to_80_columns():
    out = subprocess.run([sys.executable, "-m", "vtoolkit", "list"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    row = next(ln for ln in out.stdout.splitlines() if "fastervlm" in ln)
    assert "[CLS]-attention pruning of visual tokens before the LLM (FasterVLM)" in row
    assert "llava, llava_next, qwen2_vl, qwen2_5_vl" in row


@pytest.mark.parametrize("args, message", [
    (["--keep-ratios", "1.5"], "error: --keep-ratios 1.5: fastervlm: keep_ratio (the share of visual tokens KEPT) must be in (0, 1], got 1.5"),
    (["--keep-ratios", "0.5,x"], "error: --keep-ratios must be comma-separated numbers, got '0.5,x'"),
    (["--method", "fastvlm"], "error: --method: Unknown method 'fastvlm'. Did you mean 'fastervlm'?"),
    (["--set", "keep_ratio=abc", "--keep-ratios", ""],
     "error: --set: FasterVLMConfig option 'keep_ratio' must be a number or None, got str 'abc'"),
    (["--set", "budget_scope=diagonal"], "error: --set: fastervlm: budget_scope must be one of"),
    (["--shape", "huge"], "error: --shape must be one of midsize, tiny, llava7b, got 'huge'"),
    (["--batch-size", "0"], "error: Invalid value for '--batch-size': "),
])
def test_bench_errors_before_building(no_model_build, args, message):
    res = CliRunner().invoke(app, ["bench", "--shape", "tiny", *args])
    assert res.exit_code == 2
    assert one_error_line(res).startswith(message)


def test_debug_shows_the_traceback(no_model_build, monkeypatch):
    args = ["bench", "--shape", "tiny", "--keep-ratios", "1.5"]
    res = CliRunner().invoke(app, ["--debug", *args])
    assert res.exit_code == 1 and isinstance(res.exception, ConfigError)
    monkeypatch.setenv("VTOOLKIT_DEBUG", "1")
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, ConfigError)
    monkeypatch.setenv("VTOOLKIT_DEBUG", "0")
    assert CliRunner().invoke(app, args).exit_code == 2


def test_unexpected_errors_are_one_line_with_a_pointer_to_debug(monkeypatch):
    import vtoolkit as vt

    def broken(pattern="*"):
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(vt, "list_methods", broken)
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 1
    assert one_error_line(res) == ("error: RuntimeError: registry exploded (rerun with 'vtoolkit --debug ...' for the "
                                   "traceback)")
