"""Benchmark harness: analytic FLOPs by hand, and an end-to-end run on the tiny shape (no timing asserted)."""
import json

from vtoolkit.bench import flops as F


def test_llm_layer_flops_by_hand():
    # n=10, d=8, d_kv=4, m=16: 4*10*64 + 4*10*8*4 + 4*10*10*8 + 6*10*8*16
    assert F.llm_layer_flops(10, 10, 8, 4, 16) == 2560 + 1280 + 3200 + 7680


def test_prefill_ratio_for_llava_shape():
    s = F.Shape(vision_layers=24, vision_hidden=1024, vision_mlp=4096, vision_tokens=577, crops=1, llm_layers=16,
                hidden=2048, kv_hidden=2048, mlp=5632, vocab=32000)
    r = F.prefill_ratio(s, 600, 600 - 576 + 58)
    assert 0.3 < r < 0.45            # the vision tower is not pruned: the bound is ~0.37, far from 0.1
    assert F.prefill_ratio(s, 600, 600) == 1.0
    assert F.decode_flops(s, 82) < F.decode_flops(s, 600)


def test_tiny_bench_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--keep-ratios", "0.5,0.1", "--decode-tokens", "2",
                                   "--repeats", "1", "--batch-size", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["baseline", "fastervlm", "fastervlm"]
    assert rows[0]["prefill_ratio"] == 1.0 and rows[0]["visual_tokens"] == 64
    assert [r["visual_tokens"] for r in rows[1:]] == [32, 6]
    assert [r["visual_tokens_per_sample"] for r in rows] == [[64, 64], [32, 32], [6, 6]]
    full = rows[0]["prompt_tokens"]
    assert [r["llm_tokens"] for r in rows] == [full, full - 32, full - 58]
    assert rows[2]["analytic_prefill_ratio"] < rows[1]["analytic_prefill_ratio"] < 1.0
    assert [r["vision_layers_run"] for r in rows] == [3, 2, 2]   # FasterVLM skips the CLIP layer after layer -2
    assert rows[2]["analytic_decode_ratio"] < 1.0 and rows[0]["analytic_decode_ratio"] == 1.0
    for r in rows:
        assert r["prefill_s"] > 0 and r["peak_mem_bytes"] > 0 and len(r["prefill_runs"]) == 1
        assert r["prefill_ratio"] == r["prefill_s"] / rows[0]["prefill_s"]


def test_gqa_shrinks_only_the_kv_projections():
    mha, gqa = F.llm_layer_flops(10, 10, 8, 8, 16), F.llm_layer_flops(10, 10, 8, 2, 16)
    assert mha - gqa == 4 * 10 * 8 * (8 - 2)          # k and v: 2 matmuls x 2 FLOPs x n d d_kv


def test_vision_projector_and_whole_model_by_hand():
    s = F.Shape(vision_layers=2, vision_hidden=4, vision_mlp=8, vision_tokens=5, crops=1, llm_layers=3, hidden=6,
                kv_hidden=3, mlp=10, vocab=7)
    assert F.vision_flops(s) == 2 * (8 * 5 * 16 + 4 * 25 * 4 + 4 * 5 * 4 * 8)      # 2 x (640 + 400 + 640)
    assert F.projector_flops(s) == 2 * 4 * (4 * 6 + 6 * 6)                           # 4 patches, CLS dropped
    layer9 = 4 * 9 * 36 + 4 * 9 * 6 * 3 + 4 * 81 * 6 + 6 * 9 * 6 * 10
    head = 2 * 6 * 7
    assert F.prefill_flops(s, 9) == 3360 + 480 + 3 * layer9 + head
    layer4 = F.llm_layer_flops(4, 4, 6, 3, 10)
    # mid-stack pruning (FastV-like): layer 0 over 9 tokens, layers 1-2 over 4
    assert F.prefill_flops(s, 9, kept_tokens=4, from_layer=1) == 3360 + 480 + layer9 + 2 * layer4 + head
    assert F.prefill_flops(s, 9, kept_tokens=4) == F.prefill_flops(s, 4)
    # decode: one query over the cache + itself
    assert F.decode_flops(s, 9) == 3 * F.llm_layer_flops(1, 10, 6, 3, 10) + head
    assert F.decode_flops(s, 9, kept_context=4, from_layer=2) == (2 * F.llm_layer_flops(1, 10, 6, 3, 10)
                                                                   + F.llm_layer_flops(1, 5, 6, 3, 10) + head)
    assert F.prefill_ratio(s, 9, 4, from_layer=1) < 1 and F.prefill_ratio(s, 9, 4) < F.prefill_ratio(s, 9, 4, 1)


def test_generate_latency_pairs_runs_and_forbids_early_eos():
    import time

    from vtoolkit.bench.measure import generate_latency

    calls = []

    class Fake:
        def generate(self, max_new_tokens, min_new_tokens, do_sample, **batch):
            calls.append((max_new_tokens, min_new_tokens))
            time.sleep(0.02 + 0.01 * max_new_tokens)      # prefill 0.03 s, then 0.01 s per further token

    res = generate_latency(Fake(), {}, decode_tokens=4, repeats=3, warmup=1)
    assert calls == [(5, 5)] + [(1, 1), (5, 5)] * 3
    assert 0.028 < res["prefill_s"] < 0.1 and 0.005 < res["decode_s_per_token"] < 0.03   # loose: shared CPU
    assert len(res["prefill_runs"]) == len(res["decode_runs"]) == 3


def test_peak_memory_resets_between_rows():
    import numpy as np
    import pytest

    from vtoolkit.bench.measure import peak_memory_bytes, reset_peak

    if not reset_peak():
        pytest.skip("this OS cannot reset the resident-set high-water mark (no /proc/self/clear_refs)")
    big = np.ones(300 * 2**20 // 8)                 # 300 MB touched
    high = peak_memory_bytes()
    del big
    assert reset_peak()
    assert peak_memory_bytes() < high - 200 * 2**20


def test_make_batch_reaches_prompt_tokens():
    from vtoolkit.bench import midsize
    from vtoolkit.bench.run import make_batch

    model, proc = midsize.tiny_shape()
    short = make_batch(model, proc, 2)["input_ids"]
    long = make_batch(model, proc, 2, prompt_tokens=short.shape[1] + 40)["input_ids"]
    assert short.shape[0] == 2 and short.shape[1] + 40 <= long.shape[1] < short.shape[1] + 80


def test_bench_other_methods_and_option_errors(tmp_path):
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--shape", "tiny", "--method", "none", "--keep-ratios", "0.5"])
    assert res.exit_code != 0 and "has no keep_ratio option" in res.output
    res = runner.invoke(app, ["bench", "--shape", "tiny", "--method", "fastv", "--keep-ratios", "", "--set",
                              "rato=0.5"])
    assert res.exit_code != 0 and "Did you mean 'ratio'" in res.output
    out = tmp_path / "rows.json"
    res = runner.invoke(app, ["bench", "--shape", "tiny", "--method", "fastv", "--keep-ratios", "", "--set",
                              "ratio=0.5", "--decode-tokens", "1", "--repeats", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["baseline", "fastv"] and rows[1]["ratio"] == 0.5
    assert rows[1]["visual_tokens"] == 32 and rows[1]["pruned_from_layer"] == 2
