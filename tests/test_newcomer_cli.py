"""What a first-time user tripped on (issue 18, items 1-5), through the command line: a setting is applied or
refused (never recorded and ignored); every wrong setting exits 2 before the first batch (before the model is built
where the settings alone tell); data errors name the file; --resume says what it dropped, Ctrl-C says how to resume,
`train dyvte` does not write over an earlier run; the POPE headline says which splits it averages."""
import json
import sys

import pytest
import test_cli_errors
import test_eval_harness
import torch
from test_cli_errors import one_error_line
from test_eval_harness import FAST, error_lines, invoke

from vtoolkit.eval import runner
from vtoolkit.eval.runner import read_predictions

# the fixtures of those files, reused by name
no_model_build, tiny, pope = test_cli_errors.no_model_build, test_eval_harness.tiny, test_eval_harness.pope


def _eval(data, out, *extra):
    return ["eval", "--model", "tiny:llava", "--data", str(data), "--out", str(out), *FAST, *extra]


# ------------------------------------------------------------------------------------------------ 1. applied or refused
def test_attn_implementation_and_device_map_are_applied_to_tiny_models_or_refused(tmp_path, pope, no_model_build):
    res = invoke(*_eval(pope, tmp_path / "a", "--attn-implementation", "foo"))
    assert res.exit_code == 2
    assert one_error_line(res).startswith("error: --attn-implementation 'foo' is not an attention implementation "
                                          "transformers knows. Choose one of eager, sdpa, ")
    if not torch.cuda.is_available():
        res = invoke(*_eval(pope, tmp_path / "b", "--device-map", "cuda:0"))
        assert res.exit_code == 2
        assert one_error_line(res) == ("error: --device-map 'cuda:0': this machine has no CUDA device "
                                       "(torch.cuda.is_available() is False); leave --device-map out or pass cpu to "
                                       "run on the CPU")
    else:
        res = invoke(*_eval(pope, tmp_path / "b", "--device-map", "cuda:99"))
        assert res.exit_code == 2 and "CUDA device(s)" in one_error_line(res)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "config.json").exists()


def test_a_tiny_model_runs_with_the_attention_and_device_it_was_given():
    model, _ = runner.load_model("tiny:llava", attn_implementation="eager", device_map="cpu")
    assert model.config.get_text_config()._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    assert next(model.parameters()).device.type == "cpu"
    model, _ = runner.load_model("tiny:llava")
    assert model.config.get_text_config()._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------ 2. exit 2, before a batch
@pytest.fixture
def no_batch(monkeypatch):
    """Fail the test if a batch (or the warm-up call) is generated."""
    def boom(*a, **k):
        raise AssertionError("a batch ran before the settings were checked")

    monkeypatch.setattr(runner, "_generate", boom)


@pytest.mark.parametrize("args, message", [
    (["--method", "fastv", "--set", "K=100"], "error: --set: fastv: K=100 must be < the 4 LLM layers"),
    (["--method", "fastervlm", "--set", "keep_tokens=10000"],
     "error: --set: fastervlm: keep_tokens=10000 exceeds the 64 visual tokens of crop 0 of image 0 (sample 0); use "
     "keep_tokens <= 64, or keep_ratio"),
    (["--method", "fastv", "--set", "keep_tokens=65"],
     "error: --set: fastv: keep_tokens=65 exceeds the 64 visual tokens of image 0 (sample 0); use keep_tokens <= 64, "
     "or keep_ratio"),
    (["--method", "dyvte", "--set", "exit_layer=4"], "error: --set: dyvte: exit_layer=4 is out of range for this "
                                                     "4-layer LLM"),
])
def test_what_only_the_model_knows_is_checked_after_loading_before_the_first_batch(tmp_path, pope, tiny, no_batch,
                                                                                  args, message):
    res = invoke(*_eval(pope, tmp_path / "run", "--limit", 2, *args))
    assert res.exit_code == 2 and tiny.n == 1
    assert one_error_line(res).startswith(message)
    assert not (tmp_path / "run" / "predictions").exists()


def test_a_sweep_checks_every_grid_point_on_the_model_before_the_first_run(tmp_path, pope, tiny, no_batch):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny:llava", "benchmarks": ["pope"], "data": {"pope": str(pope)},
                                    "limit": 2, "methods": [{"method": "fastv", "grid": {"K": [2, 4, 9]}}]}))
    res = invoke("sweep", path, "--out", tmp_path / "out", "--no-progress")
    assert res.exit_code == 2 and tiny.n == 1
    assert error_lines(res) == ["error: sweep.yaml: fastv_K=4: fastv: K=4 must be < the 4 LLM layers",
                                "error: sweep.yaml: fastv_K=9: fastv: K=9 must be < the 4 LLM layers"]
    assert not (tmp_path / "out").exists()


def test_a_bad_attn_implementation_on_a_checkpoint_exits_2_before_building(tmp_path, pope, no_model_build):
    res = invoke("eval", "--model", "ref:shapes", "--attn-implementation", "sdpaa", "--data", pope, "--out",
                 tmp_path / "run", *FAST)
    assert res.exit_code == 2
    assert "error: --attn-implementation 'sdpaa' is not an attention implementation transformers knows. Did you " \
           "mean 'sdpa'?" in one_error_line(res)


# ------------------------------------------------------------------------------------------------ 3. data errors
def test_data_errors_name_the_file_and_exit_2_before_building(tmp_path, pope, no_model_build):
    bad = tmp_path / "latin1" / "q.json"
    bad.parent.mkdir()
    bad.write_bytes(b'{"question_id": 1, "image": "a.jpg", "text": "Is there a caf\xe9?", "label": "yes"}\n')
    res = invoke(*_eval(bad, tmp_path / "r1"))
    assert res.exit_code == 2
    assert one_error_line(res) == (f"error: {bad}: not a UTF-8 text file (byte 0xe9 at offset 60, line 1: invalid "
                                   f"continuation byte); save it as UTF-8")
    res = invoke("score", "pope", "--answers", bad, "--questions", bad)
    assert res.exit_code == 2 and str(bad) in one_error_line(res) and "not a UTF-8 text file" in res.output

    empty = tmp_path / "empty" / "q.json"
    empty.parent.mkdir()
    empty.write_text("\n")
    res = invoke(*_eval(empty, tmp_path / "r2"))
    assert res.exit_code == 2
    assert one_error_line(res) == (f"error: {empty}: an empty question file (no records); give a POPE question file "
                                   f"(JSON Lines or a JSON array)")

    res = invoke(*_eval(f"foo={pope}", tmp_path / "r3"))
    assert res.exit_code == 2
    assert one_error_line(res) == (f"error: --data 'foo={pope}': unknown benchmark 'foo'; write BENCH=PATH with BENCH "
                                   f"one of pope, mme, chair, hallusionbench, amber (or a bare PATH when one benchmark is "
                                   f"evaluated)")


# ------------------------------------------------------------------------------------------------ 4. resume, Ctrl-C, train
def test_resume_says_which_prediction_lines_it_dropped(tmp_path, pope, tiny):
    out = tmp_path / "run"
    assert invoke(*_eval(pope, out, "--limit", 3)).exit_code == 0
    preds = out / "predictions" / "pope.jsonl"
    lines = preds.read_bytes().splitlines()
    preds.write_bytes(lines[0] + b'\n{"id": "pope/x", "predic\n' + lines[1] + b"\n" + lines[2][:20])
    res = invoke(*_eval(pope, out, "--limit", 3, "--resume"))
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert warn == [f"warning: --resume: dropped 2 unreadable line(s) of {preds} (line 2: not valid JSON "
                    f"(Unterminated string starting at); line 4: cut off (the last write did not finish)); their "
                    f"samples run again"]
    assert len(read_predictions(preds)) == 3 and tiny.n == 2


def test_ctrl_c_says_where_the_run_is_and_how_to_resume_it(tmp_path, pope, tiny, monkeypatch):
    out = tmp_path / "run"
    args = [str(a) for a in _eval(pope, out, "--limit", 3, "--overwrite")]
    real, calls = runner._run_batch, []

    def interrupted_at_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_run_batch", interrupted_at_the_second_batch)
    monkeypatch.setattr(sys, "argv", ["vtoolkit", *args])
    res = invoke(*args)
    assert res.exit_code == 130
    resume = "vtoolkit " + " ".join(a for a in args if a != "--overwrite") + " --resume"
    assert res.output.splitlines() == [f"interrupted: the predictions written so far are kept in the run folder "
                                       f"{out}; continue with:", f"  {resume}"]
    assert len(read_predictions(out / "predictions" / "pope.jsonl")) == 1
    monkeypatch.setattr(runner, "_run_batch", real)
    res = invoke(*resume.split()[1:])
    assert res.exit_code == 0, res.output
    assert len(read_predictions(out / "predictions" / "pope.jsonl")) == 3


def test_train_dyvte_keeps_an_earlier_run_unless_resume_or_overwrite(tmp_path, monkeypatch):
    from test_dyvte_train import make_data

    from vtoolkit.models.tiny import build

    data, img = make_data(tmp_path, n=2)
    out = tmp_path / "routers"
    out.mkdir()
    (out / "routers.safetensors").write_bytes(b"earlier")
    (out / "train_config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    builds = []

    def load(*a, **k):
        builds.append(1)
        return build("llava")

    monkeypatch.setattr(runner, "load_model", load)
    base = ["train", "dyvte", "--model", "tiny:llava", "--data", data, "--images", img, "--out", out, "--max-steps",
            "1", "--batch-size", "2", "--router-hidden", "8", "--save-every", "0", "--no-progress"]
    res = invoke(*base)
    assert res.exit_code == 2 and not builds
    assert one_error_line(res) == (f"error: --out {out} already holds results of an earlier run (routers.safetensors, "
                                   f"train_config.json): pass --resume to continue it from its last checkpoint, "
                                   f"--overwrite to delete them and start over, or choose another --out")
    res = invoke(*base, "--resume")
    assert res.exit_code == 2 and not builds
    assert "no checkpoint to continue from" in one_error_line(res)
    res = invoke(*base, "--resume", "--overwrite")
    assert res.exit_code == 2 and "exclude each other" in one_error_line(res)
    assert (out / "routers.safetensors").read_bytes() == b"earlier"
    res = invoke(*base, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "routers.safetensors").read_bytes() != b"earlier" and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 1


# ------------------------------------------------------------------------------------------------ 5. honest summary
def test_the_pope_headline_says_which_splits_it_averages(tmp_path, pope, tiny):
    res = invoke(*_eval(pope, tmp_path / "one", "--limit", 1))
    assert res.exit_code == 0, res.output
    name = "POPE F1 (mean over 1 of 2 splits: coco_pope_popular)"
    assert res.output.startswith(f"pope: {name} = ")
    m = json.loads((tmp_path / "one" / "metrics.json").read_text())["benchmarks"]["pope"]
    assert m["headline_name"] == name and m["splits_scored"] == ["coco_pope_popular"]
    res = invoke(*_eval(pope, tmp_path / "two", "--limit", 2))
    assert res.exit_code == 0 and res.output.startswith("pope: POPE F1 (mean over splits) = ")
