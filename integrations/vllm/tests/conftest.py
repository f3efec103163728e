"""Fixtures of the plugin tests (vLLM environment): the tiny models and HF expectations, an engine per config."""
from __future__ import annotations

import os
import subprocess
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


_ENGINES: list = []


@pytest.fixture(autouse=True)
def _one_engine_at_a_time():
    """In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) share the process's parallel groups: shut each test's
    engine down before the next one starts (a late garbage collection would tear down the next engine's groups)."""
    yield
    if _ENGINES:
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        for llm in _ENGINES:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort, the groups are torn down below
                pass
        _ENGINES.clear()
        gc.collect()
        cleanup_dist_env_and_memory()


def make_llm(model_dir, vtoolkit=None, **kw):
    from vllm import LLM

    overrides = {} if vtoolkit is None else {"vtoolkit": vtoolkit}
    llm = _make(LLM, model_dir, overrides, kw)
    _ENGINES.append(llm)
    return llm


def _make(LLM, model_dir, overrides, kw):
    return LLM(model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
               limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=overrides, seed=0,
               max_num_seqs=4, **kw)
