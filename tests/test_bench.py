"""Benchmark harness: analytic FLOPs by hand, and an end-to-end run on the tiny shape (no timing asserted)."""
import json

import pytest

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


@pytest.fixture
def fake_clock(monkeypatch):
    """Deterministic timings for the bench (the real machine's load must not decide a test): every timed call runs,
    then reports ``clock(n_calls)`` seconds; the default alternates 1 s (prefill) and 2 s (1 + n tokens)."""
    import vtoolkit.bench.run as R

    state = {"n": 0, "clock": lambda i: 1.0 if i % 2 == 0 else 2.0}

    def fake(fn, device=None, clock="wall"):
        fn()
        t = state["clock"](state["n"])
        state["n"] += 1
        return t

    monkeypatch.setattr(R, "time_once", fake)
    return state


def test_tiny_bench_end_to_end(tmp_path, fake_clock):
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--keep-ratios", "0.5,0.1", "--decode-tokens", "2",
                                   "--repeats", "1", "--batch-size", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["baseline", "fastervlm", "oracle", "fastervlm", "oracle"]
    assert [r.get("oracle_of") for r in rows] == [None, None, 1, None, 3]
    assert rows[0]["prefill_ratio"] == 1.0 and rows[0]["visual_tokens"] == 64
    rows = [rows[0], rows[1], rows[3]]
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


def test_bench_unstable_rounds_rerun_then_exit_3(tmp_path, fake_clock):
    """A cell whose per-round ratios disagree is rerun up to --max-repeats, then printed as unstable, rc 3."""
    from typer.testing import CliRunner

    from vtoolkit.bench.verdict import EXIT_UNSTABLE
    from vtoolkit.cli import app

    # calls per round: baseline (prefill, generate), fastervlm (prefill, generate); the method's prefill alternates
    # 1 s / 2 s between rounds, so its paired prefill ratios are 1, 2, 1, 2: spread (2 - 1) / 1.5 = 0.67
    def clock(i):
        rnd, k = divmod(i, 4)
        if k == 2:
            return 1.0 + rnd % 2
        return 1.0 if k % 2 == 0 else 3.0

    fake_clock["clock"] = clock
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--keep-ratios", "0.5", "--decode-tokens", "1",
                                   "--repeats", "2", "--max-repeats", "4", "--no-oracle", "--out", str(out)],
                             terminal_width=400)
    assert res.exit_code == EXIT_UNSTABLE == 3, res.output
    rows = json.loads(out.read_text())
    assert rows[0]["rounds"] == 4 and len(rows[1]["prefill_runs"]) == 4        # reran up to the limit
    assert "unstable (spread 0.67)" in res.output and "not measured after 4 rounds" in res.output
    assert "spread by more than 0.25" in res.output                             # the rule is printed
    assert not rows[1]["measured"] and rows[0]["measured"]
    assert rows[1]["prefill_judged"]["value"] is None


def test_verdicts_on_synthetic_timings():
    from vtoolkit.bench.verdict import judge, load_note, ratio_cell, spread

    stable = judge([0.50, 0.52, 0.55], [1.0, 1.04, 1.1])
    assert stable["status"] == "ok" and stable["value"] == 0.52 and ratio_cell(stable) == "0.520"
    assert abs(spread([0.50, 0.52, 0.55]) - 0.05 / 0.52) < 1e-12
    unstable = judge([0.5, 1.0, 1.4])
    assert unstable["status"] == "unstable" and ratio_cell(unstable) == "unstable (spread 0.90)"
    assert unstable["value"] is None
    negative = judge([1.2, -0.4], [0.3, -0.63])
    assert negative["status"] == "negative" and ratio_cell(negative) == "non-positive time (-0.63)"
    assert judge([1.0, 1.3], limit=0.5)["status"] == "ok" and judge([1.0, 1.3], limit=0.2)["status"] == "unstable"
    assert ratio_cell(judge([])) == "-"
    assert load_note(2.4, 2) is None and load_note(None, 2) is None
    assert load_note(3.2, 2) == "machine loaded (load 3.2 on 2 cores)"
    assert load_note(1.6, 1) == "machine loaded (load 1.6 on 1 core)"


def _row(prefill, decode, generate, **kw):
    return {"method": "x", "prefill_runs": prefill, "decode_runs": decode, "generate_runs": generate,
            "visual_tokens": 1, "llm_tokens_after_pruning": 1, "prefill_s": prefill[0], "analytic_prefill_ratio": 1,
            "decode_s_per_token": decode[0] if decode else float("nan"), "analytic_decode_ratio": 1,
            "generate_s": generate[0] if generate else float("nan"), "peak_mem_bytes": 1, "peak_mem_delta_bytes": 0,
            **kw}


def test_bench_table_cells_and_exit_status_from_synthetic_rows():
    from rich.console import Console

    from vtoolkit.bench.cli import exit_status, result_table
    from vtoolkit.bench.run import judge_rows

    rows = judge_rows([_row([2.0, 2.0, 2.0], [0.1, 0.1, 0.1], [2.8, 2.8, 2.8]),
                       _row([1.0, 1.02, 1.04], [0.1, 0.1, 0.1], [1.8, 1.8, 1.8], options={"r": 1}),  # stable
                       _row([1.0, 1.0, 1.0], [], [], oracle_of=1),                             # its oracle
                       _row([1.0, 2.0, 1.5], [-0.63, 0.1, 0.1], [1.8, 2.8, 2.3], options={"r": 2})])  # unstable
    assert [r["measured"] for r in rows] == [True, True, True, False]
    assert rows[1]["prefill_judged"]["value"] == 0.51
    assert abs(rows[2]["overhead"] - 0.02) < 1e-12                       # median of 1.0, 1.02, 1.04, minus 1
    assert abs(rows[2]["overhead_of_base"] - 0.01) < 1e-12               # median of (m - o) / base: 0, .01, .02
    assert exit_status(rows) == 3 and exit_status(rows[:3]) == 0
    console = Console(width=400, record=True)
    console.print(result_table(rows, "t", 8))
    text = console.export_text()
    lines = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in text.splitlines()
             if ln.startswith("│")}
    stable, oracle = lines["x r=1"], lines["oracle (stock model, same tokens)"]
    assert stable[3] == "0.510" and stable[9] == "0.643"                   # prefill and end-to-end ratios
    assert oracle[10] == "+2.0 % (+1.0 % of base)"
    bad = lines["x r=2"]
    assert bad[3] == "unstable (spread 0.67)" and bad[6] == "non-positive time (-0.63)"   # prefill, decode
    assert bad[9] == "unstable (spread 0.43)" and "1.500" not in text                    # end to end


def test_oracle_equals_the_method_on_tiny_shape():
    """The oracle runs what the method computes: pre-LLM pruners give the same tokens from stock generate on the
    kept embeddings; FastV's prefill logits equal the hand loop over stock layers on the kept hidden states."""
    import torch

    import vtoolkit as vt
    from vtoolkit.bench import midsize
    from vtoolkit.bench import oracle as O
    from vtoolkit.bench.run import make_batch

    model, proc = midsize.tiny_shape()
    batch = make_batch(model, proc, 2)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for name in ("fastervlm", "random"):
        with torch.no_grad(), vt.apply_method(model, name, keep_ratio=0.1) as h:
            want = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:]
            stats = h.stats
        keep = O.kept_positions(model, batch, stats)
        assert [k.numel() for k in keep] == [batch["input_ids"].shape[1] - 64 + 6] * 2
        with torch.no_grad():
            emb = O.merged_embeds(model, batch, stats.get("vision_layers_run"))
            e, m = O.left_pad([emb[b, k] for b, k in enumerate(keep)])
            got = model.generate(inputs_embeds=e, attention_mask=m, **gen)
        assert torch.equal(got, want), name
    with torch.no_grad():
        ref = model(**batch).logits[:, -1]
        full = O.midstack_forward(model, O.merged_embeds(model, batch), 2,
                                  torch.arange(batch["input_ids"].shape[1]).expand(2, -1))[:, -1]
        torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)   # the hand loop is the stock forward
        with vt.apply_method(model, "fastv", keep_ratio=0.25) as h:
            want = model(**batch).logits[:, -1]
            stats = h.stats
        keep_idx = torch.stack(O.kept_positions(model, batch, stats))
        got = O.midstack_forward(model, O.merged_embeds(model, batch), stats["layer"], keep_idx)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, ref, atol=1e-3)                      # pruning changed the logits
    with torch.no_grad():
        with vt.apply_method(model, "dyvte", exit_layer=1) as h:       # every visual token gone after layer 1
            want = model(**batch).logits[:, -1]
            stats = h.stats
        gen, decodes = O.build(model, batch, "dyvte", stats)
        keep_idx = torch.stack(O.kept_positions(model, batch, stats))
        assert not decodes and keep_idx.shape[1] == batch["input_ids"].shape[1] - 64
        got = O.midstack_forward(model, O.merged_embeds(model, batch), stats["layer"], keep_idx)[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        gen(1)
        for name in ("vcd", "vhr", "damro"):                           # the mitigation oracles run
            with vt.apply_method(model, name) as h:
                model.generate(**batch, max_new_tokens=1)
                stats = h.stats
            gen, decodes = O.build(model, batch, name, stats)
            gen(1)
            assert decodes == (name != "vhr")


def test_llava7b_shape_dims_without_weights_and_refused_on_cpu():
    import torch
    from transformers import LlavaForConditionalGeneration
    from typer.testing import CliRunner

    from vtoolkit.bench import midsize
    from vtoolkit.cli import app

    cfg, _ = midsize.llava7b_config()
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == (4096, 32, 32, 32, 11008, 32000)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (1024, 24, 336, 14)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < n < 7.1e9                                # LLaVA-1.5-7B: 7.06 B parameters
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, ["bench", "--shape", "llava7b"])
        assert res.exit_code == 2 and "CUDA" in res.output
        with pytest.raises(ValueError, match="CUDA"):
            midsize.llava7b(device="cpu")


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


def test_bench_other_methods_and_option_errors(tmp_path, fake_clock):
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
    assert [r["method"] for r in rows] == ["baseline", "fastv", "oracle"] and rows[1]["ratio"] == 0.5
    assert rows[1]["visual_tokens"] == 32 and rows[1]["pruned_from_layer"] == 2


def test_cpu_clock_counts_work_not_waiting():
    import time

    from typer.testing import CliRunner

    from vtoolkit.bench.measure import time_once
    from vtoolkit.cli import app

    assert time_once(lambda: time.sleep(0.2)) >= 0.19                    # wall: the wait counts
    assert time_once(lambda: time.sleep(0.2), clock="cpu") < 0.1          # CPU: a sleeping process does no work
    res = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--clock", "gpu"])
    assert res.exit_code == 2 and "--clock must be wall or cpu" in res.output


@pytest.mark.parametrize("arch", ["qwen3_vl", "llava_onevision", "internvl"])
def test_bench_arch_builds_the_family_and_runs_one_round(tmp_path, fake_clock, arch):
    """``--arch`` with ``--shape tiny``: the family's small stand-in (same structure as the mid-size one), FasterVLM
    and FastV rows against the same-run baseline with the family's FLOPs bound, each followed by its prefill oracle
    row (the decode cells of an oracle stay empty); a decoding method has no oracle row there."""
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--arch", "qwen4_vl", "--shape", "tiny"])
    assert res.exit_code == 2 and "--arch must be one of qwen3_vl, llava_onevision, internvl" in res.output
    for method, extra in [("fastervlm", []), ("fastv", ["--set", "K=2"])]:
        fake_clock["n"] = 0          # a round times an odd number of calls (the oracle's prefill only)
        out = tmp_path / f"{method}.json"
        res = runner.invoke(app, ["bench", "--arch", arch, "--shape", "tiny", "--method", method, "--keep-ratios",
                                  "0.25", *extra, "--decode-tokens", "1", "--repeats", "1", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert f"{method} on tiny {arch}" in res.output
        rows = json.loads(out.read_text())
        assert [r["method"] for r in rows] == ["baseline", method, "oracle"]
        base, r, o = rows
        assert o["oracle_of"] == 1 and o["prefill_s"] > 0 and o.get("decode_s") is None
        assert r["visual_tokens"] < base["visual_tokens"] == base["visual_tokens_before"]
        assert r["pruned_from_layer"] == (2 if method == "fastv" else 0)
        assert 0 < r["analytic_prefill_ratio"] < 1.0 == base["analytic_prefill_ratio"]
        assert r["prefill_ratio"] == r["prefill_s"] / base["prefill_s"]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "llava_onevision", "internvl"])
def test_family_oracles_run_what_the_method_ran(arch):
    """The bench's family oracles (stock ``get_image_features``, stock scatter, the stock language model on the kept
    rows at their policy's positions, Qwen3-VL's DeepStack at the kept visual rows only) give the method's own
    prefill logits, for a pre-LLM pruner (FasterVLM) and a mid-stack one (FastV at K=1, before Qwen3-VL's last
    DeepStack layer), and not the unpruned model's."""
    import torch

    import vtoolkit as vt
    from vtoolkit.bench import oracle as O
    from vtoolkit.bench.run import make_batch
    from vtoolkit.models import tiny

    model, proc = tiny.build(arch)
    batch = make_batch(model, proc, 2)
    with torch.no_grad():
        base = model(**batch).logits[:, -1:]
    for method, kw in [("fastervlm", dict(keep_ratio=0.25)), ("fastv", dict(K=1, keep_ratio=0.5))]:
        assert O.has_oracle(model, method)
        h = vt.apply_method(model, method, **kw)
        try:
            with torch.no_grad():
                ref = model(**batch).logits[:, -1:]
            stats = h.stats
        finally:
            h.remove()
        keep = O.kept_positions(model, batch, stats)
        with torch.no_grad():
            if method == "fastervlm":
                got = O.family_prefill(model, batch, keep, stats["positions"])
            else:
                x = O.family_inputs(model, batch)
                got = O.midstack_forward(model, x["embeds"], stats["layer"], torch.stack(keep),
                                         positions=x["positions"], visual=x["visual"], deepstack=x["deepstack"])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert (got - base).abs().max() > 1e-3
    assert not O.has_oracle(model, "vcd")
