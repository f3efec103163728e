"""Fixtures of the plugin tests (vLLM environment): the tiny models and HF expectations, an engine per config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
    """``VTOOLKIT_VLLM_FIXTURES`` or a fresh dir filled by hf_reference.py under vtoolkit's python
    (``VTOOLKIT_PYTHON``, default /work/venv/bin/python or .venv-ci/bin/python)."""
    given = os.environ.get("VTOOLKIT_VLLM_FIXTURES")
    if given and (Path(given) / "expected.json").exists():
        return Path(given)
    out = Path(given) if given else tmp_path_factory.mktemp("vtk_vllm")
    py = os.environ.get("VTOOLKIT_PYTHON") or next(
        (p for p in (str(ROOT / ".venv-ci/bin/python"), "/work/venv/bin/python") if Path(p).exists()), None)
    if py is None:
        pytest.fail("set VTOOLKIT_PYTHON to a python with vtoolkit installed (the HF side of the test)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    subprocess.run([py, str(HERE / "hf_reference.py"), str(out)], check=True, env=env, timeout=900)
    return out


@pytest.fixture()
def trace_file(tmp_path, monkeypatch) -> Path:
    f = tmp_path / "trace.jsonl"
    monkeypatch.setenv("VTOOLKIT_VLLM_TRACE", str(f))
    return f


def make_llm(model_dir, vtoolkit=None, **kw):
    from vllm import LLM

    overrides = {} if vtoolkit is None else {"vtoolkit": vtoolkit}
    return LLM(model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
               limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=overrides, seed=0,
               max_num_seqs=4, **kw)
