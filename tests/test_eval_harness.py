"""The eval harness never reports a wrong or empty result as success: run folders, resume, label alignment, exit
codes, sweep checks, report comparability, CHAIR agreement with `vtoolkit score chair`, --limit; each through the CLI
or the API, on a tiny LLaVA and the demo data."""
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import vtoolkit as vt
from conftest import tiny_model
from vtoolkit.cli import app
from vtoolkit.eval import demo_data as dd
from vtoolkit.eval import runner
from vtoolkit.eval.runner import read_predictions

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "pope.max_new_tokens=2", "--no-progress"]
METHODS = ", ".join(sorted(r["name"] for r in vt.list_methods()))   # the registry's "Available: ..." list


@pytest.fixture
def tiny(monkeypatch):
    """`vtoolkit eval` / `sweep` get the cached tiny LLaVA instead of building one; ``tiny.builds`` counts calls."""
    model, proc, _ = tiny_model("llava")

    class Builds:
        n = 0

    def load(*a, **k):
        Builds.n += 1
        return model, proc

    monkeypatch.setattr(runner, "load_model", load)
    return Builds


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    """Two POPE splits x 2 images x 2 questions (8 samples)."""
    return dd.make_pope_json(tmp_path_factory.mktemp("data") / "pope", n_images=2)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.startswith("error: ")]


# ------------------------------------------------------------------------------------------------ 1. run folders
def test_a_new_run_into_a_folder_with_results_is_refused_before_building(tmp_path, pope, tiny):
    out = tmp_path / "run"
    res = invoke("eval", "--model", "tiny:llava", "--method", "fastervlm", "--data", pope, "--out", out, "--limit", 2,
                 *FAST)
    assert res.exit_code == 0, res.output
    before = {f: (out / f).read_bytes() for f in ("config.json", "metrics.json", "predictions/pope.jsonl")}
    mme = dd.make_mme_folder(tmp_path / "MME", n_images=1, tasks={"existence": "plain"})
    other = ["eval", "--model", "tiny:llava", "--method", "random", "--bench", "mme", "--data", mme, "--out", out,
             "--set", "mme.max_new_tokens=2", "--no-progress"]
    res = invoke(*other)
    assert res.exit_code == 2 and tiny.n == 1
    assert error_lines(res) == [f"error: --out {out} already holds results of an earlier run (config.json, env.json, "
                                f"metrics.json, ...): pass --resume to continue it, --overwrite to delete them and "
                                f"start over, or choose another --out"]
    assert {f: (out / f).read_bytes() for f in before} == before
    res = invoke(*other, "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["mme.jsonl"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["method"] == "random" and conf["benchmarks"] == ["mme"]
    assert list(json.loads((out / "metrics.json").read_text())["benchmarks"]) == ["mme"]


def test_shards_of_a_crashed_run_are_not_merged_into_a_new_one(tmp_path, pope, tiny):
    out = tmp_path / "run"
    (out / "predictions").mkdir(parents=True)
    stale = {"id": "pope/coco_pope_popular/1", "prediction": "stale answer", "error": None}
    (out / "predictions" / "pope.rank1.jsonl").write_text(json.dumps(stale) + "\n")
    args = ["eval", "--model", "tiny:llava", "--data", pope, "--out", out, "--limit", 2, *FAST]
    res = invoke(*args)
    assert res.exit_code == 2 and tiny.n == 0
    assert "already holds results of an earlier run (predictions/pope.rank1.jsonl)" in error_lines(res)[0]
    res = invoke(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    rows = read_predictions(out / "predictions" / "pope.jsonl")
    assert len(rows) == 2 and "stale answer" not in {r["prediction"] for r in rows}
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["pope.jsonl"]


# ------------------------------------------------------------------------------------------------ 2. resume
def test_resume_refuses_any_setting_that_changes_predictions(tmp_path, pope, tiny, monkeypatch):
    out = tmp_path / "run"
    base = ["eval", "--model", "tiny:llava", "--data", pope, "--out", out, "--limit", 2, *FAST]
    assert invoke(*base).exit_code == 0
    res = invoke(*base, "--resume", "--batch-size", 2, "--seed", 1, "--dtype", "float32", "--set",
                 "pope.max_new_tokens=3", "--attn-implementation", "eager")
    assert res.exit_code == 2 and tiny.n == 1
    lines = error_lines(res)
    assert lines[0].startswith(f"error: --resume: {out} was run with other settings that change predictions")
    assert lines[1:] == ['error:   batch_size: 1 -> 2', 'error:   dtype: "auto" -> "float32"', 'error:   seed: 0 -> 1',
                         'error:   attn_implementation: null -> "eager"',
                         'error:   protocols.pope.max_new_tokens: 2 -> 3']
    real = runner.versions()
    monkeypatch.setattr(runner, "versions", lambda: {**real, "transformers": "5.99.0"})
    res = invoke(*base, "--resume")
    assert res.exit_code == 2
    assert error_lines(res)[1:] == [f'error:   versions.transformers: "{real["transformers"]}" -> "5.99.0"']
    monkeypatch.setattr(runner, "versions", lambda: real)
    # scoring settings do not change predictions: a finished run is re-scored
    res = invoke(*base, "--resume", "--set", "pope.scorer_rule=opera")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["benchmarks"]["pope"]["rule"] == "opera"


def test_retry_errors_runs_failed_rows_again(tmp_path, tiny):
    data = dd.make_pope_json(tmp_path / "pope", n_images=2, splits=("random",))
    img = data / "images" / "COCO_val2014_000000000101.jpg"
    img.rename(img.with_suffix(".bak"))
    out = tmp_path / "run"
    args = ["eval", "--model", "tiny:llava", "--data", data, "--out", out, *FAST]
    res = invoke(*args)
    assert res.exit_code == 0
    assert "warning: pope: 2 of 4 rows failed (first: pope/coco_pope_random/3: unreadable image: FileNotFoundError: " \
           f"image not found: {img}); scored over the other 2" in res.output
    img.with_suffix(".bak").rename(img)
    res = invoke(*args, "--resume")   # failed rows count as done
    assert res.exit_code == 0 and "errors=2" in res.output
    res = invoke(*args, "--retry-errors")
    assert res.exit_code == 0 and "errors=0" in res.output and "warning" not in res.output
    rows = read_predictions(out / "predictions" / "pope.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["error"] is None for r in rows)


# ------------------------------------------------------------------------------------------------ 3. alignment
def test_pope_labels_come_from_the_data_aligned_by_sample_id(pope):
    from vtoolkit.eval.datasets import load_dataset, public_record
    from vtoolkit.eval.protocol import resolve_protocol
    from vtoolkit.eval.runner import score_benchmark

    proto = resolve_protocol("pope", {"zero_division": "zero"})
    ds = load_dataset("pope", str(pope), proto)
    rows = [{**public_record(r), "prediction": "Yes"} for r in ds.records]
    assert score_benchmark("pope", rows, proto, ds)["status"] == "scored"
    edited = [dict(r) for r in rows]
    edited[1]["label"] = "yes" if rows[1]["label"] == "no" else "no"   # written when the data said otherwise
    res = score_benchmark("pope", edited, proto, ds)
    assert res["headline"] is None and res["status"] == "not_scored"
    assert f"prediction {rows[1]['id']!r} was made with label {edited[1]['label']!r} but the data now has " \
           f"{rows[1]['label']!r}" in res["score_error"]
    swapped = [rows[1], rows[0], *rows[2:]]
    res = score_benchmark("pope", swapped, proto, ds)
    assert res["headline"] is None and "answers are not in question order" in res["score_error"]
    foreign = [*rows[:-1], {**rows[-1], "id": "pope/other/1"}]
    res = score_benchmark("pope", foreign, proto, ds)
    assert "'pope/other/1' is not a sample of the pope data" in res["score_error"]


# ------------------------------------------------------------------------------------------------ 4. exit codes
def test_a_benchmark_whose_rows_all_failed_exits_nonzero(tmp_path, tiny):
    data = dd.make_pope_json(tmp_path / "pope", n_images=1, splits=("random",))
    shutil.rmtree(data / "images")
    res = invoke("eval", "--model", "tiny:llava", "--data", data, "--out", tmp_path / "run", *FAST)
    assert res.exit_code == 1
    assert error_lines(res) == [
        f"error: pope: not scored: ValueError: no valid predictions to score: all 2 rows failed; 2 of 2 rows failed "
        f"(first: pope/coco_pope_random/1: unreadable image: FileNotFoundError: image not found: "
        f"{data / 'COCO_val2014_000000000100.jpg'})"]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["benchmarks"]["pope"]
    assert m["status"] == "not_scored" and m["headline"] is None
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"model": "tiny:llava", "benchmarks": ["pope"], "data": {"pope": str(data)},
                                     "protocol": {"pope": {"max_new_tokens": 2}}}))
    res = invoke("sweep", sweep, "--out", tmp_path / "sweep", "--no-progress")
    assert res.exit_code == 1
    assert error_lines(res)[0].startswith("error: baseline: pope: not scored: ValueError: no valid predictions")


# ------------------------------------------------------------------------------------------------ 5. sweep checks
def test_sweep_reports_every_problem_at_once_before_running(tmp_path, tiny):
    (tmp_path / "pope").mkdir()
    spec = {"model": "tiny:llava", "benchmarks": ["pope"], "data": {"pope": {"path": str(tmp_path / "pope"),
                                                                           "images": str(tmp_path / "nope")}},
            "batchsize": 4, "protocol": {"pope": {"max_new_tokens": 0}},
            "methods": [{"method": "fastervlm", "grid": {"keep_ratio": [0.25, 1.5]}},
                        {"method": "fastvlm"},
                        {"method": "random", "gird": {"keep_ratio": [0.1]}},
                        {"method": "fastv", "options": {"rato": 0.5}}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    expected = [
        "error: sweep.yaml: unknown key 'batchsize'. Did you mean 'batch_size'? Valid: name, model, dtype, device_map, "
        "attn_implementation, seed, benchmarks, data, protocol, limit, batch_size, out, methods, prepare",
        f"error: sweep.yaml: data: pope images: {tmp_path / 'nope'}: no such file or folder",
        "error: sweep.yaml: protocol: pope protocol: max_new_tokens must be >= 1, got 0",
        "error: sweep.yaml: methods[0]: fastervlm: keep_ratio (the share of visual tokens KEPT) must be in (0, 1], "
        "got 1.5",
        f"error: sweep.yaml: methods[1]: Unknown method 'fastvlm'. Did you mean 'fastervlm'? Available: {METHODS}.",
        "error: sweep.yaml: methods[2]: unknown key 'gird'. Did you mean 'grid'? Valid: method, preset, options, grid",
        "error: sweep.yaml: methods[3]: fastv: FastVConfig has no option 'rato'. Did you mean 'ratio'? Valid options: "
        f"{', '.join(vt.get_config_class('fastv').field_names())}."]
    for extra in ([], ["--dry-run"]):
        t0 = time.perf_counter()
        res = invoke("sweep", path, "--out", tmp_path / "out", *extra)
        elapsed = time.perf_counter() - t0
        assert res.exit_code == 2 and error_lines(res) == expected, res.output
        assert elapsed < 1.0, f"checking the sweep took {elapsed:.2f} s"
    assert tiny.n == 0 and not (tmp_path / "out").exists()


def test_sweep_data_option_keeps_the_entry_s_other_keys(tmp_path, tiny):
    real = dd.make_pope_json(tmp_path / "pope", n_images=1, splits=("random",))
    questions = tmp_path / "questions"
    questions.mkdir()
    shutil.copy(real / "coco_pope_random.json", questions)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny:llava", "benchmarks": ["pope"],
                                    "data": {"pope": {"path": "elsewhere", "images": str(real / "images")}},
                                    "protocol": {"pope": {"max_new_tokens": 2}}}))
    res = invoke("sweep", path, "--data", f"pope={questions}", "--out", tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.output
    conf = json.loads((tmp_path / "out" / "baseline" / "config.json").read_text())
    assert conf["data"]["pope"]["path"] == str(questions) and conf["data"]["pope"]["images"] == str(real / "images")
    m = json.loads((tmp_path / "out" / "baseline" / "metrics.json").read_text())["benchmarks"]["pope"]
    assert m["n_errors"] == 0 and m["status"] == "scored"


# ------------------------------------------------------------------------------------------------ 6. report
def _fake_run(root: Path, name: str, method: str, n: int, batch_size: int, score: float, latency: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    proto = {"bench": "pope", "max_new_tokens": 128, "scorer_rule": "official", "zero_division": None}
    bench = {"headline": score, "headline_name": "POPE F1 (mean over splits)", "higher_is_better": True, "n": n,
             "n_errors": 0, "latency_s": latency, "visual_tokens_after": 64.0 if method == "none" else 6.0,
             "protocol": proto, "data_fingerprint": "abc"}
    (d / "metrics.json").write_text(json.dumps({"model": "m", "method": method, "method_options": {}, "limit": None,
                                                "batch_size": batch_size, "dtype": "float16",
                                                "benchmarks": {"pope": bench}}))
    return d


def test_report_does_not_compare_runs_with_different_samples_or_batch(tmp_path):
    base = _fake_run(tmp_path, "baseline", "none", 8, 1, 0.80, 0.10)
    same = _fake_run(tmp_path, "fastervlm_ok", "fastervlm", 8, 1, 0.78, 0.05)
    other = _fake_run(tmp_path, "fastervlm_big", "fastervlm", 360, 4, 0.70, 0.90)
    res = invoke("report", base, same, other, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    warning = ("warning: fastervlm_big (pope) is not comparable with the baseline baseline: samples (360 vs 8); "
               "batch_size (4 vs 1); no delta or speedup computed")
    assert warning in res.output
    assert f"- {warning[len('warning: '):]}" in (tmp_path / "rep" / "report.md").read_text()
    import pandas as pd

    df = pd.read_csv(tmp_path / "rep" / "report.csv").set_index("run")
    assert df.at["fastervlm_ok", "speedup"] == pytest.approx(2.0) and df.at["fastervlm_ok", "delta"] < 0
    assert df[["delta", "speedup", "rel_score", "token_ratio"]].loc["fastervlm_big"].isna().all()


def test_report_without_baseline_says_so(tmp_path):
    run = _fake_run(tmp_path, "fastervlm", "fastervlm", 8, 1, 0.78, 0.05)
    res = invoke("report", run, "--out", tmp_path / "rep")
    assert res.exit_code == 0
    msg = ("pope on m: no baseline run (method none) among the runs given, so no delta, rel_score, speedup or "
           "token_ratio")
    assert f"warning: {msg}" in res.output and msg in (tmp_path / "rep" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ 7. CHAIR
def _chair_through_runner(coco: Path, out: Path, caption: str, zero_division=None) -> dict:
    from vtoolkit.eval.datasets import load_dataset, public_record
    from vtoolkit.eval.protocol import resolve_protocol
    from vtoolkit.eval.runner import score_benchmark

    proto = resolve_protocol("chair", {"n_images": 3, "zero_division": zero_division})
    ds = load_dataset("chair", str(coco), proto)
    rows = [{**public_record(r), "prediction": caption} for r in ds.records]
    out.mkdir(parents=True, exist_ok=True)
    return score_benchmark("chair", rows, proto, ds, out)


@pytest.mark.parametrize("caption", ["A photo of something.", "A dog next to a man on a chair."])
def test_eval_and_score_chair_agree_on_the_same_captions(tmp_path, caption):
    coco = dd.make_coco(tmp_path / "coco", n_images=4)
    out = tmp_path / "run"
    ev = _chair_through_runner(coco, out, caption)
    cli = invoke("score", "chair", "--captions", out / "chair_captions.jsonl", "--coco-annotations",
                 coco / "annotations", "--json")
    if "dog" not in caption:   # no object mentioned: CHAIRi = 0 / 0 is undefined for both
        assert ev["headline"] is None and ev["status"] == "not_scored"
        assert "CHAIRi (no object mentions in any caption) is undefined" in ev["score_error"]
        assert ev["score_error"].endswith("Pass --set chair.zero_division=zero to report 0.")
        assert cli.exit_code == 2
        assert "CHAIRi (no object mentions in any caption) is undefined" in cli.output
        assert "Pass --zero-division zero to report 0." in cli.output and "zero_division=" not in cli.output
        ev = _chair_through_runner(coco, out, caption, zero_division="zero")
        cli = invoke("score", "chair", "--captions", out / "chair_captions.jsonl", "--coco-annotations",
                     coco / "annotations", "--json", "--zero-division", "zero")
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["overall"] == ev["overall"]


# ------------------------------------------------------------------------------------------------ 8. --limit
def test_limit_spreads_pope_over_splits_and_must_be_positive(tmp_path, pope, tiny):
    from vtoolkit.eval.datasets import load_dataset

    ds = load_dataset("pope", str(pope)).limit(4)
    assert [r["split"] for r in ds.records] == ["coco_pope_popular"] * 2 + ["coco_pope_random"] * 2
    assert ds.info["limit_rule"] == "the first records of each split, n spread evenly over the splits"
    res = invoke("eval", "--model", "tiny:llava", "--data", pope, "--out", tmp_path / "run", "--limit", 2, *FAST)
    assert res.exit_code == 0, res.output
    splits = json.loads((tmp_path / "run" / "metrics.json").read_text())["benchmarks"]["pope"]["splits"]
    assert sorted(splits) == ["coco_pope_popular", "coco_pope_random"] and all(s["n"] == 1 for s in splits.values())
    for bad in ("0", "-3"):
        res = invoke("eval", "--model", "tiny:llava", "--data", pope, "--out", tmp_path / "x", "--limit", bad)
        assert res.exit_code == 2 and error_lines(res) == [f"error: --limit must be a positive integer, got {bad}"]


# ------------------------------------------------------------------------------------------------ 9. CLI errors
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: --batch-size must be a positive integer, got 0"),
    (["--dtype", "float17"], "error: --dtype 'float17' is not supported; choose one of auto, float16, bfloat16, "
                             "float32"),
    (["--method", "fastervlm", "--set", "keep_ratio=abc"],
     "error: --set: FasterVLMConfig option 'keep_ratio' must be a number or None, got str 'abc'"),
    (["--method", "fastervlm", "--set", "budget_scope=diagonal"],
     "error: --set: fastervlm: budget_scope must be one of ('per_crop', 'global'), got 'diagonal'"),
    (["--method", "fastvlm"], f"error: --method: Unknown method 'fastvlm'. Did you mean 'fastervlm'? Available: "
                              f"{METHODS}."),
    (["--model", "tiny:qwen3_vl", "--method", "vcd"],      # vcd narrowed by the fixture (all families supported)
     "error: --method: method 'vcd' does not support 'qwen3_vl' models; it supports internvl, llava, llava_next, "
     "llava_onevision, qwen2_5_vl, qwen2_vl (vtoolkit list)"),
    (["--model", "tiny:lava"], "error: --model 'tiny:lava': unknown tiny model; choose one of tiny:llava, "
                               "tiny:llava_next, tiny:qwen2_vl, tiny:qwen2_5_vl, tiny:qwen3_vl, "
                               "tiny:llava_onevision, tiny:internvl"),
    (["--set", "pope.max_new_token=3"], "error: --set: unknown pope protocol option(s) ['max_new_token']. Did you "
                                        "mean 'max_new_tokens' for 'max_new_token'?"),
    (["--set", "keep_ratio"], "error: --set 'keep_ratio' must look like key=value (e.g. keep_ratio=0.1)"),
    (["--bench", "pope,vqa"], "error: --bench: unknown benchmark 'vqa'; choose from pope, mme, chair"),
    (["--resume", "--overwrite"], "error: --resume and --overwrite exclude each other"),
])
def test_eval_errors_are_one_line_before_building(tmp_path, pope, tiny, args, message,
                                                  vcd_without_qwen3_vl):
    base = {"--model": "tiny:llava", "--data": f"pope={pope}", "--out": str(tmp_path / "run")}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    res = invoke("eval", *[x for kv in base.items() for x in kv], *args)
    assert res.exit_code == 2, res.output
    assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith(message), res.output
    assert res.output.strip() == error_lines(res)[0] and tiny.n == 0


def test_missing_and_malformed_files_are_one_line(tmp_path, pope, tiny):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: fastervlm\nkeep_ratio: [0.1\n")
    run = tmp_path / "run"
    cases = [
        (["eval", "--model", "tiny:llava", "--data", tmp_path / "nope", "--out", run],
         f"error: --data: pope path: {tmp_path / 'nope'}: no such file or folder"),
        (["eval", "--model", "tiny:llava", "--method", bad_yaml, "--data", pope, "--out", run],
         f"error: --method {bad_yaml}: not valid YAML at line 3, column 1: "),
        (["sweep", bad_yaml], f"error: {bad_yaml}: not valid YAML at line 3, column 1: "),
        (["sweep", tmp_path / "missing.yaml"], f"error: {tmp_path / 'missing.yaml'}: no such file"),
        (["report", tmp_path / "nowhere"], f"error: {tmp_path / 'nowhere'}: no such run folder"),
    ]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    cases.append((["report", tmp_path / "broken"], f"error: {tmp_path / 'broken' / 'metrics.json'}: not valid JSON"))
    for args, message in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith(message), (args, res.output)
    assert tiny.n == 0


def test_reference_model_name_and_synthetic_chair_rule_pass_validation():
    from vtoolkit.config import ConfigError
    from vtoolkit.eval.protocol import Protocol
    from vtoolkit.eval.validate import check_model

    assert check_model("ref:shapes") == "llava"
    with pytest.raises(ConfigError, match="ref:shapes"):
        check_model("ref:nope")
    Protocol(bench="chair", scorer_rule="synthetic").check()
    with pytest.raises(ConfigError, match="scorer_rule"):
        Protocol(bench="pope", scorer_rule="synthetic").check()
