"""POPE scorer: every fixture in shared/data/pope reproduced exactly, for every rule, plus loaders and error paths."""
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from vtoolkit.eval.scorers.pope import (
    POPE_RULES,
    load_pope_answers,
    load_pope_labels,
    load_pope_questions,
    parse_pope_answer,
    score_pope,
    score_pope_files,
    score_pope_splits,
)

DATA = SHARED_DATA
POPE = DATA / "pope"
CASES = POPE / "scorer_cases"

# our rule name -> key of the original scorer in expected_*.json
ORIGINAL_KEY = {"official": "official_pope_evaluate_py", "opera": "opera_pope_eval_py", "vcd": "vcd_eval_pope_py",
                "lmms_eval": "lmms_eval_pope", "vlmevalkit": "vlmevalkit_exact_matching"}
FIXTURES = {  # name -> (answers, labels, expected)
    "edge": (CASES / "edge_answers.jsonl", CASES / "edge_labels.jsonl", CASES / "expected_edge_cases.json"),
    "synthetic": (CASES / "answers_coco_random_synthetic.jsonl", POPE / "official" / "coco" / "coco_pope_random.json",
                  CASES / "expected_coco_random_synthetic.json"),
}


@pytest.fixture(scope="module", autouse=True)
def _need_fixtures():
    if not POPE.exists():
        pytest.fail(f"POPE fixtures not found at {POPE}: the shared/ folder must sit next to the repository")


def _score(name, rule):
    answers, labels, _ = FIXTURES[name]
    rep = score_pope_files(answers, labels, rule)
    assert list(rep.splits) == [Path(labels).name.split(".")[0]]
    return next(iter(rep.splits.values()))


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("rule", POPE_RULES)
def test_fixture_reproduced_exactly(name, rule):
    exp = json.loads(FIXTURES[name][2].read_text())["results"][ORIGINAL_KEY[rule]]
    r = _score(name, rule)
    if rule == "vlmevalkit":  # VLMEvalKit reports x100; the multiplication is the same float operation it does
        assert r.accuracy * 100 == exp["acc"]
        assert r.precision * 100 == exp["precision"]
        assert r.recall * 100 == exp["recall"]
        assert r.f1 * 100 == exp["Overall_F1"]
        assert r.n_other == exp["n_unknown"]
        if "extracted" in exp:
            got = [{"yes": "Yes", "no": "No", "other": "Unknown"}[p] for p in r.preds]
            assert got == exp["extracted"]
        return
    if rule == "lmms_eval":
        assert (r.accuracy, r.precision, r.recall, r.f1, r.yes_ratio) == (
            exp["accuracy"], exp["precision"], exp["recall"], exp["f1_score"], exp["yes_ratio"])
        # same types too: lmms-eval returns the int 0 for a guarded ratio
        assert type(r.recall) is type(exp["recall"]) and type(r.f1) is type(exp["f1_score"])
        d = r.to_dict()
        assert d["pope_accuracy"] == exp["accuracy"] and d["pope_f1_score"] == exp["f1_score"]
        assert d["pope_yes_ratio"] == exp["yes_ratio"] == 0.5  # label-based, lmms-eval's bug reproduced
        return
    assert (r.tp, r.fp, r.tn, r.fn) == (exp["TP"], exp["FP"], exp["TN"], exp["FN"])
    assert r.accuracy == exp["accuracy"]
    assert r.precision == exp["precision"]
    assert r.recall == exp["recall"]
    assert r.f1 == exp["f1"]
    assert r.yes_ratio == exp["yes_ratio"] == r.pred_yes_ratio
    if "pred" in exp:
        assert [1 if p == "yes" else 0 for p in r.preds] == exp["pred"]


EDGE_TABLE = [  # benchmarks.md §1.6: answer, label, official, opera, vcd, lmms_eval, vlmevalkit
    ("Yes, there is a dog in the image.", "yes", "yes", "yes", "yes", "other", "yes"),
    ("No.", "yes", "no", "no", "no", "other", "no"),
    ("no", "no", "no", "no", "no", "no", "no"),
    ("Yes", "no", "yes", "yes", "yes", "yes", "yes"),
    ("There is not a cat. But yes, there is a dog.", "yes", "no", "no", "yes", "other", "yes"),
    ("I don't know", "no", "yes", "no", "no", "other", "other"),
    ("yes.", "yes", "yes", "yes", "yes", "other", "yes"),
    ("NO", "no", "yes", "no", "no", "no", "no"),
    ("Nope", "yes", "yes", "yes", "no", "other", "other"),
    ("There is no bird, but there is a plane. Yes.", "no", "no", "no", "no", "other", "other"),
]


@pytest.mark.parametrize("row", EDGE_TABLE, ids=[r[0][:20] for r in EDGE_TABLE])
def test_parse_table(row):
    answer, label, *expected = row
    got = [parse_pope_answer(answer, rule, label=label) for rule in ("official", "opera", "vcd", "lmms_eval",
                                                                       "vlmevalkit")]
    assert got == expected


@pytest.mark.parametrize("answer,expected", [
    ("", "yes"), (".", "yes"), ("None", "yes"), ("not sure", "no"), ("Not sure", "yes"), ("No!", "yes"),
    ("3.5 no", "yes"), ("Yes. no", "yes"), ("yes, no", "no"),
])
def test_official_quirks(answer, expected):
    assert parse_pope_answer(answer, "official") == expected


def test_opera_quirks():
    assert parse_pope_answer("It isn't.", "opera") == "no"
    assert parse_pope_answer("Yes. But no.", "opera") == "no"  # whole answer scanned
    assert parse_pope_answer("NO", "opera") == "no"


def test_hand_checks_official():
    r = score_pope(["Yes", "No"], ["yes", "no"])
    assert (r.tp, r.tn, r.accuracy, r.precision, r.recall, r.f1, r.yes_ratio) == (1, 1, 1.0, 1.0, 1.0, 1.0, 0.5)
    r = score_pope(["yes", "yes", "yes", "no"], ["yes", "yes", "no", "no"])
    assert (r.tp, r.fp, r.tn, r.fn) == (2, 1, 1, 0)
    assert r.accuracy == 0.75 and r.recall == 1.0 and r.yes_ratio == 0.75
    assert r.precision == pytest.approx(2 / 3) and r.f1 == pytest.approx(0.8)


def test_zero_division_per_rule():
    for rule in ("official", "opera", "vcd"):   # the originals crash on 0/0: reported as undefined, with the reason
        r = score_pope(["no", "no"], ["yes", "no"], rule)
        assert (r.precision, r.recall, r.f1, r.accuracy) == (None, 0.0, None, 0.5)
        assert r.notes == {"precision": "undefined: no 'yes' answers (TP + FP = 0)",
                           "f1": "undefined: no 'yes' answers (TP + FP = 0)"}
        with pytest.raises(ZeroDivisionError, match="precision"):
            score_pope(["no", "no"], ["yes", "no"], rule, zero_division="raise")
    r = score_pope(["yes", "no"], ["no", "no"])   # no yes label: recall undefined
    assert (r.precision, r.recall, r.f1) == (0.0, None, None) and "no 'yes' labels" in r.notes["recall"]
    r = score_pope(["no", "no"], ["yes", "no"], "lmms_eval", zero_division="undefined")
    assert r.precision is None and r.to_dict()["pope_precision"] is None
    for rule in ("lmms_eval", "vlmevalkit"):
        r = score_pope(["no", "no"], ["yes", "no"], rule)
        assert (r.precision, r.recall, r.f1) == (0, 0, 0)
    r = score_pope(["no", "no"], ["yes", "no"], "official", zero_division="zero")
    assert (r.precision, r.recall, r.f1, r.accuracy) == (0, 0, 0, 0.5)
    with pytest.raises(ZeroDivisionError):
        score_pope(["no", "no"], ["yes", "no"], "lmms_eval", zero_division="raise")
    # TP = 0 with non-zero denominators: P = R = 0 -> F1 = 0 (the limit), noted; the original raises
    r = score_pope(["no", "yes"], ["yes", "no"])
    assert (r.precision, r.recall, r.f1) == (0.0, 0.0, 0.0) and r.notes["f1"].startswith("0: precision = recall = 0")
    with pytest.raises(ZeroDivisionError, match="F1"):
        score_pope(["no", "yes"], ["yes", "no"], zero_division="raise")


def test_errors():
    with pytest.raises(ValueError, match="2 answers but 3 labels"):
        score_pope(["yes", "no"], ["yes", "no", "no"])
    with pytest.raises(ValueError, match="label must be 'yes' or 'no'.*'maybe'"):
        score_pope(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError, match="label #1"):
        score_pope(["yes"], [1])
    with pytest.raises(ValueError, match="unknown POPE rule"):
        score_pope(["yes"], ["yes"], "bogus")
    with pytest.raises(ValueError, match="no questions"):
        score_pope([], [])
    with pytest.raises(ValueError, match="needs the gold label"):
        parse_pope_answer("yes", "vcd")
    with pytest.raises(TypeError):
        parse_pope_answer(3, "official")


def test_labels_are_case_insensitive():
    assert score_pope(["Yes", "No"], ["Yes", " NO "]).accuracy == 1.0


def test_alignment_by_question_id():
    with pytest.raises(ValueError, match="not in question order: row 1"):
        score_pope(["no", "yes"], ["yes", "no"], answer_ids=[2, 1], label_ids=[1, 2])
    r = score_pope(["no", "yes"], ["yes", "no"], answer_ids=[2, 1], label_ids=["1", "2"], align="question_id")
    assert r.accuracy == 1.0
    r = score_pope(["no", "yes"], ["yes", "no"], answer_ids=[2, 1], label_ids=[1, 2], align="position",
                   zero_division="zero")
    assert r.accuracy == 0.0
    with pytest.raises(ValueError, match="do not match"):
        score_pope(["no", "yes"], ["yes", "no"], answer_ids=[3, 1], label_ids=[1, 2], align="question_id")


@pytest.mark.parametrize("rel,n", [
    ("official/coco/coco_pope_random.json", 3000),        # JSONL, LF
    ("official/coco/coco_pope_popular.json", 3000),       # JSONL, CRLF
    ("official/coco/coco_pope_adversarial.json", 3000),   # JSONL, CRLF
    ("official/aokvqa/aokvqa_pope_seem_random.json", 3000),  # pretty-printed JSON array
    ("official/gqa/gqa_pope_seem_adversarial.json", 3000),
    ("legacy/coco_pope_random_v2023-08_2910q.json", 2910),
    ("legacy/coco_pope_adversarial_v2023-10_imange57.json", 3000),
])
def test_question_loader(rel, n):
    qs = load_pope_questions(POPE / rel)
    assert len(qs) == n
    assert {q["label"] for q in qs} == {"yes", "no"}
    assert qs[0]["question_id"] == 1 and qs[0]["question"].startswith("Is there")
    assert not any("\r" in (q["image"] or "") or "\r" in q["question"] for q in qs)
    labels = load_pope_labels(POPE / rel)
    assert labels.count("yes") == 1500 and labels.count("no") == n - 1500


def test_answer_loader_keys(tmp_path):
    for key in ("answer", "text", "prediction"):
        p = tmp_path / f"{key}.jsonl"
        p.write_text("\r\n".join(json.dumps({"question_id": i, key: a}) for i, a in enumerate(["Yes", "No"], 1)))
        ans, ids = load_pope_answers(p)
        assert ans == ["Yes", "No"] and ids == [1, 2]
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(["yes", "no"], indent=2))
    assert load_pope_answers(p) == (["yes", "no"], None)
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question_id": 1, "output_text": "yes"}\n')
    with pytest.raises(KeyError, match="no answer field"):
        load_pope_answers(p)
    assert load_pope_answers(p, answer_key="output_text")[0] == ["yes"]
    p = tmp_path / "broken.jsonl"
    p.write_text('{"answer": "yes"}\n{"answer": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_pope_answers(p)


def test_lmms_lab_style_labels(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps({"question_id": str(i), "question": "Is there a dog?", "answer": a,
                                       "category": "random"}) for i, a in enumerate(["yes", "no"], 1)))
    assert load_pope_labels(p) == ["yes", "no"]


def test_split_average():
    splits = {"a": (["yes", "no", "no", "yes"], ["yes", "no", "yes", "no"]),
              "b": (["yes", "yes"], ["yes", "no"])}
    rep = score_pope_splits(splits)
    assert set(rep.splits) == {"a", "b"}
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert rep.average[k] == pytest.approx((getattr(rep.splits["a"], k) + getattr(rep.splits["b"], k)) / 2)
    assert rep.average["pope_f1_score"] == rep.average["f1"] and rep.average["n_splits"] == 2
    d = rep.to_dict()
    assert d["splits"]["a"]["pope_accuracy"] == 0.5 and "preds" not in d["splits"]["a"]


def test_three_coco_splits_files():
    """Scoring the same synthetic answers against three files: only the random file is the matching one, but the
    mechanics (pairing, naming, averaging) are exercised on real files."""
    ans = CASES / "answers_coco_random_synthetic.jsonl"
    files = [POPE / "official" / "coco" / f"coco_pope_{s}.json" for s in ("random", "popular", "adversarial")]
    rep = score_pope_files([ans] * 3, files, "official")
    assert list(rep.splits) == ["coco_pope_random", "coco_pope_popular", "coco_pope_adversarial"]
    assert rep.splits["coco_pope_random"].f1 == 0.6666666666666666
    mean_f1 = sum(r.f1 for r in rep.splits.values()) / 3
    assert rep.average["f1"] == pytest.approx(mean_f1)
    with pytest.raises(ValueError, match="in pairs"):
        score_pope_files([ans, ans], files, "official")
