"""`vtoolkit score pope|chair|mme`: JSON output equals the fixtures' expected numbers, tables render, errors exit 2."""
import json
import os

import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA
from vtoolkit.eval.cli_score import score_app

DATA = SHARED_DATA
POPE = DATA / "pope"
CH = DATA / "chair"
MME = DATA / "mme"

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _nltk_data():
    if not DATA.exists():
        pytest.fail(f"fixtures not found at {DATA}: the shared/ folder must sit next to the repository")
    old = os.environ.get("NLTK_DATA")
    os.environ["NLTK_DATA"] = str(DATA / "nltk_data")
    yield
    if old is None:
        os.environ.pop("NLTK_DATA", None)
    else:
        os.environ["NLTK_DATA"] = old


def _run(*args):
    return runner.invoke(score_app, [str(a) for a in args])


def _json(*args):
    res = _run(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


EDGE = ("--answers", POPE / "scorer_cases" / "edge_answers.jsonl", "--questions",
        POPE / "scorer_cases" / "edge_labels.jsonl")
SYNTH = ("--answers", POPE / "scorer_cases" / "answers_coco_random_synthetic.jsonl", "--questions",
         POPE / "official" / "coco" / "coco_pope_random.json")


def test_mounted_on_main_app():
    from vtoolkit.cli import app

    res = runner.invoke(app, ["score", "--help"])
    assert res.exit_code == 0
    for cmd in ("pope", "chair", "mme"):
        assert cmd in res.output


@pytest.mark.parametrize("rule,key", [("official", "official_pope_evaluate_py"), ("opera", "opera_pope_eval_py"),
                                      ("vcd", "vcd_eval_pope_py")])
def test_pope_json(rule, key):
    exp = json.loads((POPE / "scorer_cases" / "expected_coco_random_synthetic.json").read_text())["results"][key]
    out = _json("pope", *SYNTH, "--rule", rule)
    r = out["splits"]["coco_pope_random"]
    assert out["rule"] == rule
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (exp["TP"], exp["FP"], exp["TN"], exp["FN"])
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert r[k] == exp[k]
    assert r["pope_f1_score"] == exp["f1"]


def test_pope_lmms_eval_json():
    exp = json.loads((POPE / "scorer_cases" / "expected_edge_cases.json").read_text())["results"]["lmms_eval_pope"]
    r = _json("pope", *EDGE, "--rule", "lmms_eval")["splits"]["edge_labels"]
    assert (r["pope_accuracy"], r["pope_precision"], r["pope_recall"], r["pope_f1_score"], r["pope_yes_ratio"]) == (
        exp["accuracy"], exp["precision"], exp["recall"], exp["f1_score"], exp["yes_ratio"])


def test_pope_two_splits_table_and_average():
    res = _run("pope", *SYNTH, *EDGE)
    assert res.exit_code == 0, res.output
    assert "coco_pope_random" in res.stdout and "edge_labels" in res.stdout and "average" in res.stdout
    assert "66.67" in res.stdout and "54.55" in res.stdout  # F1 of each split, %
    out = _json("pope", *SYNTH, *EDGE)
    assert out["average"]["f1"] == pytest.approx((0.6666666666666666 + 0.5454545454545454) / 2)


def test_pope_errors():
    res = _run("pope", "--answers", POPE / "scorer_cases" / "edge_answers.jsonl", "--questions",
               POPE / "official" / "coco" / "coco_pope_random.json")
    assert res.exit_code == 2 and "10 answers but 3000 labels" in res.output
    res = _run("pope", *EDGE, "--answers", POPE / "scorer_cases" / "edge_answers.jsonl")
    assert res.exit_code == 2 and "pairs" in res.output
    res = _run("pope", "--answers", "nope.jsonl", "--questions", POPE / "scorer_cases" / "edge_labels.jsonl")
    assert res.exit_code == 2 and "no such file" in res.output
    res = _run("pope", *EDGE, "--rule", "gpt")
    assert res.exit_code == 2  # click usage error
    res = _run("pope", "--answers", POPE / "scorer_cases" / "edge_labels.jsonl", "--questions",
               POPE / "scorer_cases" / "edge_labels.jsonl", "--answer-key", "label", "--rule", "official")
    assert res.exit_code == 0  # labels scored against themselves through --answer-key


def test_pope_zero_division_flag(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"answer": "no"}\n{"answer": "no"}\n')
    q = tmp_path / "q.jsonl"
    q.write_text('{"label": "yes"}\n{"label": "no"}\n')
    res = _run("pope", "-a", a, "-q", q, "--zero-division", "raise")
    assert res.exit_code == 2 and "precision" in res.output and "Pass --zero-division zero to report 0" in res.output
    out = _json("pope", "-a", a, "-q", q, "--zero-division", "zero")
    assert out["splits"]["q"]["precision"] == 0


def test_pope_every_answer_no_scores_with_precision_undefined(tmp_path):
    """A model that answers every question "No": the official scorer would divide 0/0 for precision (it crashes, so
    it defines no value); `score pope` exits 0 and reports precision and F1 as undefined, with the reason."""
    a = tmp_path / "a.jsonl"
    a.write_text("".join(f'{{"question_id": {i}, "answer": "{t}"}}\n'
                         for i, t in enumerate(["No", "No.", "no", "No, there is not."], 1)))
    q = tmp_path / "q.jsonl"
    q.write_text("".join(f'{{"question_id": {i}, "text": "Is there a dog?", "label": "{lab}"}}\n'
                         for i, lab in enumerate(["yes", "no", "yes", "no"], 1)))
    res = _run("pope", "-a", a, "-q", q)
    assert res.exit_code == 0, res.output
    assert "n/a (no yes answers)" in res.output
    assert "note: q: precision undefined: no 'yes' answers (TP + FP = 0)" in res.output
    r = _json("pope", "-a", a, "-q", q)["splits"]["q"]
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.5, None, 0.0, None, 0.0)
    assert r["notes"]["precision"] == r["notes"]["f1"] == "undefined: no 'yes' answers (TP + FP = 0)"
    out = _json("pope", "-a", a, "-q", q, "-a", a, "-q", q)   # the mean over splits is undefined too
    assert out["average"]["f1"] is None and out["average"]["accuracy"] == 0.5
    assert "undefined: in split(s) q#0, q#1" in out["average"]["notes"]["f1"]
    assert _json("pope", "-a", a, "-q", q, "--rule", "lmms_eval")["splits"]["q"]["precision"] == 0   # its value


def test_mme_json_and_table():
    exp = json.loads((MME / "eval_tool_LaVIN" / "expected_scores_official.json").read_text())["scores"]
    out = _json("mme", "--results-dir", MME / "eval_tool_LaVIN")
    assert out["perception"] == exp["Perception_total"] == 963.6114445778312
    assert out["cognition"] == exp["Cognition_total"] == 249.64285714285714
    assert out["tasks"]["commonsense_reasoning"]["other_num"] == 11
    out = _json("mme", "-d", MME / "eval_tool_LaVIN", "--rule", "vlmevalkit")
    assert out["cognition"] == 248.92857142857144
    res = _run("mme", "-d", MME / "eval_tool_LaVIN")
    assert res.exit_code == 0 and "963.61 / 2000" in res.stdout and "249.64 / 800" in res.stdout
    res = _run("mme", "-d", MME / "scorer_cases", "--rule", "lmms_eval")
    assert res.exit_code == 0 and "125.00 / 200" in res.stdout and "200.00 / 200" in res.stdout


def test_mme_errors(tmp_path):
    res = _run("mme", "-d", tmp_path / "missing")
    assert res.exit_code == 2 and "not found" in res.output
    res = _run("mme", "-d", MME / "scorer_cases", "--strict")
    assert res.exit_code == 2 and "strict" in res.output


@pytest.mark.parametrize("variant,key", [("opera", "opera_wordnet"), ("original", "maxlinn_pattern")])
def test_chair_json_synthetic(variant, key, tmp_path):
    exp = json.loads((CH / "synthetic_cases" / f"expected_{key}.json").read_text())["overall_metrics"]
    save = tmp_path / "out.json"
    out = _json("chair", "--captions", CH / "synthetic_cases" / "caps.jsonl", "--gt", CH / "synthetic_cases" / "gt.json",
                "--variant", variant, "--save", save)
    assert out["variant"] == variant
    for k, v in exp.items():
        assert out["overall"][k] == v
    saved = json.loads(save.read_text())
    assert len(saved["per_caption"]) == 20 and saved["per_caption"][6]["image_id"] == 7


def test_chair_table_on_opera_log_with_overlay():
    res = _run("chair", "-c", CH / "opera_logs" / "minigpt4_ours.jsonl",
               "-g", CH / "coco2014_trainval_gt_objects_opera_wordnet.json.gz",
               "--gt-overlay", CH / "coco2014_trainval_gt_objects_maxlinn_pattern_diff.json", "--variant", "original")
    assert res.exit_code == 0, res.output
    exp = json.loads((CH / "opera_logs" / "expected_overall_metrics.json").read_text())["minigpt4_ours"][
        "maxlinn_pattern"]
    assert f"{exp['CHAIRs'] * 100:.1f}" in res.stdout and f"{exp['CHAIRi'] * 100:.1f}" in res.stdout
    assert "23.0" in res.stdout and "8.8" in res.stdout  # benchmarks.md §2.9 minigpt4_ours, pattern: 23.0 / 8.75


def test_chair_errors(tmp_path):
    caps = CH / "synthetic_cases" / "caps.jsonl"
    res = _run("chair", "-c", caps)
    assert res.exit_code == 2 and "exactly one of --gt and --coco-annotations" in res.output
    g = tmp_path / "gt.json"
    g.write_text(json.dumps({"1": ["dog"]}))
    res = _run("chair", "-c", caps, "-g", g)
    assert res.exit_code == 2 and "image id 2 is not in the ground truth" in res.output
    res = _run("chair", "-c", caps, "-g", g, "--unknown-image", "empty", "--json")
    assert res.exit_code == 0
    res = _run("chair", "-c", caps, "-g", CH / "synthetic_cases" / "gt.json", "--variant", "bleu")
    assert res.exit_code == 2
