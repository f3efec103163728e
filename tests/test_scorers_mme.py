"""MME scorer: the official LaVIN example results and the hand-made cases reproduced exactly, for all three rules."""
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from vtoolkit.eval.scorers.mme import (
    COGNITION_TASKS,
    MME_RULES,
    PERCEPTION_TASKS,
    parse_mme_answer,
    read_mme_task_file,
    score_mme_dir,
)

DATA = SHARED_DATA
MME = DATA / "mme"
LAVIN = MME / "eval_tool_LaVIN"
CASES = MME / "scorer_cases"


@pytest.fixture(scope="module", autouse=True)
def _need_fixtures():
    if not MME.exists():
        pytest.fail(f"MME fixtures not found at {MME}: the shared/ folder must sit next to the repository")


def test_lavin_official_exact():
    exp = json.loads((LAVIN / "expected_scores_official.json").read_text())["scores"]
    res = score_mme_dir(LAVIN)
    assert res.perception == exp["Perception_total"] == 963.6114445778312
    assert res.cognition == exp["Cognition_total"] == 249.64285714285714
    assert set(res.tasks) == set(PERCEPTION_TASKS + COGNITION_TASKS)
    for task, v in res.tasks.items():
        assert v == exp[task], task  # n_questions, n_images, acc, acc_plus, score, other_num: all exact
    assert sum(v["n_questions"] for v in res.tasks.values()) == 2374
    assert res.missing == [] and res.ignored == []
    d = res.to_dict()
    assert d["mme_perception_score"] == res.perception and d["perception_max"] == 2000 and d["cognition_max"] == 800


@pytest.mark.parametrize("rule,key,pkey,ckey", [
    ("lmms_eval", "lmms_eval", "mme_perception_score", "mme_cognition_score"),
    ("vlmevalkit", "vlmevalkit_exact_matching", "perception", "reasoning(cognition)"),
])
def test_lavin_other_rules_exact(rule, key, pkey, ckey):
    exp = json.loads((LAVIN / "expected_scores_lmms_eval_and_vlmevalkit.json").read_text())[key]
    res = score_mme_dir(LAVIN, rule)
    assert res.perception == exp[pkey]
    assert res.cognition == exp[ckey]
    assert {t: v["score"] for t, v in res.tasks.items()} == exp["per_task"]


def test_lavin_headline_numbers():
    assert score_mme_dir(LAVIN, "lmms_eval").perception == 963.6114445778311  # float summation order differs
    assert score_mme_dir(LAVIN, "vlmevalkit").cognition == 248.92857142857144


@pytest.mark.parametrize("rule,key", [("official", "official_parse"), ("lmms_eval", "lmms_eval_parse"),
                                      ("vlmevalkit", "vlmevalkit_extract")])
def test_scorer_cases_parse(rule, key):
    exp = json.loads((CASES / "expected.json").read_text())["items"]
    for task, items in exp.items():
        got = read_mme_task_file(CASES / f"{task}.txt")
        assert [(g.image, g.response) for g in got] == [(e["image"], e["pred"]) for e in items]
        for g, e in zip(got, items):
            want = e[key].lower().replace("unknown", "other")
            assert parse_mme_answer(g.response, rule) == want, (task, g.response)


@pytest.mark.parametrize("rule,key,pkey,ckey", [
    ("official", None, None, None),
    ("lmms_eval", "lmms_eval", "mme_perception_score", "mme_cognition_score"),
    ("vlmevalkit", "vlmevalkit_exact_matching", "perception", "reasoning(cognition)"),
])
def test_scorer_cases_scores(rule, key, pkey, ckey):
    exp = json.loads((CASES / "expected.json").read_text())
    res = score_mme_dir(CASES, rule)
    if rule == "official":
        assert {t: v["score"] for t, v in res.tasks.items()} == exp["official_scores"]
        assert (res.perception, res.cognition) == (112.5, 125.0)
        assert "total score: 112.5" in exp["official_calculation_py_stdout"]
        assert res.tasks["existence"]["acc"] == 5 / 8 and res.tasks["existence"]["acc_plus"] == 0.5
        assert res.tasks["existence"]["other_num"] == 2 and res.tasks["code_reasoning"]["other_num"] == 1
    else:
        assert {t: v["score"] for t, v in res.tasks.items()} == exp[key]["per_task"]
        assert (res.perception, res.cognition) == (exp[key][pkey], exp[key][ckey])
    assert len(res.missing) == 12 and res.to_dict()["perception_max"] == 200


@pytest.mark.parametrize("resp,official,lmms", [
    ("Yes, there is", "yes", "yes"), ("yes.", "yes", "yes"), ("Yesterday", "yes", "yes"), ("No, ...", "no", "no"),
    ("Not really", "no", "no"), ("None", "no", "no"), ("Nope", "no", "no"), ("nobody", "no", "no"),
    ("Y", "other", "yes"), ("n", "other", "no"), ("There is no kite.", "other", "other"), ("", "other", "other"),
    ("  yes", "other", "yes"), ("y.", "other", "yes"),
])
def test_parse_rules(resp, official, lmms):
    assert parse_mme_answer(resp, "official") == official
    assert parse_mme_answer(resp, "lmms_eval") == lmms


def _write(d: Path, task: str, lines):
    d.mkdir(exist_ok=True)
    (d / f"{task}.txt").write_text("".join(lines))


def test_crlf_and_trailing_blank(tmp_path):
    _write(tmp_path, "existence", ["a.jpg\tQ1\tYes\tYes\r\n", "a.jpg\tQ2\tNo\tNo\r\n", "\r\n"])
    res = score_mme_dir(tmp_path)
    assert res.tasks["existence"]["score"] == 200.0 and res.perception == 200.0 and res.cognition == 0


def test_errors(tmp_path):
    d = tmp_path / "three_fields"
    _write(d, "count", ["a.jpg\tQ1\tYes\n", "a.jpg\tQ2\tNo\tNo\n"])
    with pytest.raises(ValueError, match=r"count.txt:1: expected 4 TAB-separated fields"):
        score_mme_dir(d)
    d = tmp_path / "tab_in_response"
    _write(d, "count", ["a.jpg\tQ1\tYes\tYes\tand more\n", "a.jpg\tQ2\tNo\tNo\n"])
    with pytest.raises(ValueError, match="got 5"):
        score_mme_dir(d)
    d = tmp_path / "bad_gt"
    _write(d, "color", ["a.jpg\tQ1\tMaybe\tYes\n", "a.jpg\tQ2\tNo\tNo\n"])
    with pytest.raises(ValueError, match="GT must be Yes or No"):
        score_mme_dir(d)
    d = tmp_path / "odd"
    _write(d, "OCR", ["a.jpg\tQ1\tYes\tYes\n", "a.jpg\tQ2\tNo\tNo\n", "b.jpg\tQ1\tYes\tYes\n"])
    with pytest.raises(ValueError, match="must be even"):
        score_mme_dir(d)
    with pytest.raises(ValueError, match="'b.jpg' has 1 questions"):
        score_mme_dir(d, "lmms_eval")
    with pytest.raises(ValueError, match="no MME subtask files"):
        score_mme_dir(tmp_path)  # only sub-directories here
    with pytest.raises(FileNotFoundError):
        score_mme_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown MME rule"):
        score_mme_dir(LAVIN, "gpt4")
    with pytest.raises(ValueError, match="strict=True"):
        score_mme_dir(CASES, strict=True)


def test_grouping_differs_by_rule(tmp_path):
    """official pairs consecutive lines; lmms-eval / VLMEvalKit group by image name."""
    _write(tmp_path, "position", ["a.jpg\tQ1\tYes\tYes\n", "b.jpg\tQ1\tYes\tYes\n",
                                  "a.jpg\tQ2\tNo\tYes\n", "b.jpg\tQ2\tNo\tYes\n"])
    assert score_mme_dir(tmp_path).tasks["position"]["acc_plus"] == 0.5  # pair (a1, b1) both right
    assert score_mme_dir(tmp_path, "lmms_eval").tasks["position"]["acc_plus"] == 0.0  # neither image both right
    _write(tmp_path, "position", ["a.jpg\tQ1\tYes\tYes\n", "b.jpg\tQ1\tYes\tNo\n",
                                  "a.jpg\tQ2\tNo\tNo\n", "b.jpg\tQ2\tNo\tYes\n"])
    assert score_mme_dir(tmp_path).tasks["position"]["acc_plus"] == 0.0
    assert score_mme_dir(tmp_path, "vlmevalkit").tasks["position"]["acc_plus"] == 0.5  # image a both right


def test_items_api_normalises_gt():
    from vtoolkit.eval.scorers.mme import MMEItem, score_mme

    items = [MMEItem("a.jpg", "Q1", "Yes", "yes"), MMEItem("a.jpg", "Q2", "No", "No")]
    assert score_mme({"OCR": items}).tasks["OCR"]["score"] == 200.0
    with pytest.raises(ValueError, match="GT must be Yes or No"):
        score_mme({"OCR": [MMEItem("a.jpg", "Q1", "y", "yes"), MMEItem("a.jpg", "Q2", "No", "No")]})
    with pytest.raises(ValueError, match="unknown MME subtask"):
        score_mme({"ocr": items})


def test_rules_constant():
    assert MME_RULES == ("official", "lmms_eval", "vlmevalkit")
