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
    assert rows[2]["analytic_prefill_ratio"] < rows[1]["analytic_prefill_ratio"] < 1.0
