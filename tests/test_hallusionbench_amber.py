"""HallusionBench and AMBER (discriminative) as plug-in benchmarks: scorers on hand-made answer files against the
official formulas written out here, the official file layouts read back, and an end-to-end eval on a tiny model."""
import json
from collections import defaultdict

import pytest

from vtoolkit.eval import demo_data as dd
from vtoolkit.eval.benchmarks.amber import score_amber
from vtoolkit.eval.benchmarks.hallusionbench import score_hallusionbench
from vtoolkit.eval.datasets import load_dataset
from vtoolkit.eval.scorers._io import vlmevalkit_yorn


# ------------------------------------------------------------------------------------------- HallusionBench
def _yorn(text: str) -> str:
    """VLMEvalKit's YOrN_Extraction: the project's port is checked against VLMEvalKit's outputs by the POPE scorer
    tests (rule vlmevalkit); what this file checks is the grouping and the formulas."""
    return vlmevalkit_yorn(text)


HB_ROWS = [  # category, subcategory, set, figure, question, visual_input, label, prediction
    ("VD", "illusion", 0, 0, 0, "1", "yes", "Yes."), ("VD", "illusion", 0, 0, 1, "1", "no", "No, it is not."),
    ("VD", "illusion", 0, 1, 0, "1", "no", "Yes"), ("VD", "illusion", 0, 1, 1, "1", "yes", "yes"),
    ("VS", "chart", 0, 0, 0, "0", "yes", "I think yes"), ("VS", "chart", 0, 0, 1, "0", "no", "maybe"),
    ("VS", "chart", 0, 1, 0, "1", "yes", "Yes!"), ("VS", "chart", 0, 1, 1, "1", "no", "No"),
    ("VS", "chart", 0, 2, 0, "2", "no", "No"), ("VS", "chart", 0, 2, 1, "2", "yes", "Yes, yes."),
    ("VD", "math", 1, 0, 0, "1", "no", "no"), ("VD", "math", 1, 1, 0, "1", "yes", "Yes and no"),
]


def _hb_rows():
    return [{"id": f"r{i}", "category": c, "subcategory": s, "set_id": str(st), "figure_id": str(f),
             "question_id": str(q), "visual_input": v, "label": lab, "prediction": p}
            for i, (c, s, st, f, q, v, lab, p) in enumerate(HB_ROWS)]


def _hb_expected(rows, rule):
    correct = [_yorn(r["prediction"]).lower() == r["label"] for r in rows]
    figs, qs = defaultdict(list), defaultdict(list)
    for r, ok in zip(rows, correct):
        if rule == "vlmevalkit":   # VLMEvalKit Hallusion_rating: l2-category_set_figure / l2-category_set_question
            figs[f"{r['subcategory']}_{r['set_id']}_{r['figure_id']}"].append(ok)
            qs[f"{r['subcategory']}_{r['set_id']}_{r['question_id']}"].append(ok)
        else:                      # official utils.py get_eval_fig / get_eval_pair_all
            if not (r["category"] == "VS" and r["figure_id"] == "0"):
                figs["_".join([r["category"], r["subcategory"], r["set_id"], r["figure_id"]])].append(ok)
            qs["_".join([r["category"], r["subcategory"], r["set_id"], r["question_id"]])].append(ok)
    return (sum(correct) / len(correct), sum(all(v) for v in figs.values()) / len(figs),
            sum(all(v) for v in qs.values()) / len(qs))


@pytest.mark.parametrize("rule", ["vlmevalkit", "official"])
def test_hallusionbench_scores_follow_the_rules(rule):
    rows = _hb_rows()
    res = score_hallusionbench(rows, rule)
    a, f, q = _hb_expected(rows, rule)
    assert (res["overall"]["aAcc"], res["overall"]["fAcc"], res["overall"]["qAcc"]) == pytest.approx((a, f, q))
    assert res["overall"]["n_unknown"] == sum(_yorn(r["prediction"]) == "Unknown" for r in rows) == 2
    vd = [r for r in rows if r["category"] == "VD"]
    assert res["per_category"]["VD"]["aAcc"] == pytest.approx(_hb_expected(vd, rule)[0])
    # the hand count: 12 questions, correct = rows 0, 1, 3, 4, 6, 7, 8, 9, 10 -> 9 / 12
    assert res["overall"]["aAcc"] == pytest.approx(9 / 12)


def test_hallusionbench_rules_differ_where_the_official_drops_no_figure_questions():
    rows = _hb_rows()
    v, o = score_hallusionbench(rows, "vlmevalkit"), score_hallusionbench(rows, "official")
    assert v["overall"]["n_figures"] == 7 and o["overall"]["n_figures"] == 6   # VS figure 0 left out by official
    with pytest.raises(ValueError, match="unknown HallusionBench rule"):
        score_hallusionbench(rows, "gpt4")


def test_hallusionbench_official_layout_round_trip(tmp_path):
    root = dd.make_hallusionbench(tmp_path / "hb", n_sets=2)
    ds = load_dataset("hallusionbench", root)
    raw = json.loads((root / "HallusionBench.json").read_text())
    assert len(ds) == len(raw) == 20 and ds.n_errors() == 0
    text_only = [r for r in ds.records if r["_ref"] == ("text",)]
    assert len(text_only) == sum(r["visual_input"] == "0" for r in raw) == 4
    assert all(r["image"] is None for r in text_only)
    with_image = [r for r in ds.records if r["_ref"] != ("text",)]
    assert all((root / r["image"]).is_file() for r in with_image)
    # images= points at the folder holding VD/ and VS/: the official get_image_file_location rule
    moved = load_dataset("hallusionbench", {"path": str(root / "HallusionBench.json"),
                                            "images": str(root / "hallusion_bench")})
    assert [r["_ref"] for r in moved.records] == [r["_ref"] for r in ds.records]


# ------------------------------------------------------------------------------------------- AMBER
AMBER_ROWS = [  # type, truth, response
    ("discriminative-hallucination", "yes", "Yes"), ("discriminative-hallucination", "no", "No"),
    ("discriminative-hallucination", "no", "Yes"), ("discriminative-hallucination", "yes", "No"),
    ("discriminative-attribute-state", "no", "No"), ("discriminative-attribute-state", "yes", "Yes."),
    ("discriminative-attribute-number", "no", "No"), ("discriminative-attribute-number", "no", "no"),
    ("discriminative-attribute-action", "yes", "Yes"), ("discriminative-attribute-action", "no", "No"),
    ("discriminative-relation", "no", "No"), ("discriminative-relation", "yes", "No"),
    ("discriminative-relation", "no", "Yes"),
]


def _amber_rows():
    return [{"id": f"a{i}", "type": t, "label": truth, "prediction": resp}
            for i, (t, truth, resp) in enumerate(AMBER_ROWS)]


def _official(rows, eps):
    """inference.py's counters and rounding, for one dimension (response compared as the exact string)."""
    correct = sum((r["label"] == "yes" and r["prediction"] == "Yes") or (r["label"] == "no" and r["prediction"] == "No")
                  for r in rows)
    ans_no = sum(r["prediction"] == "No" for r in rows)
    ans_no_true = sum(r["prediction"] == "No" and r["label"] == "no" for r in rows)
    truth_no = sum(r["label"] == "no" for r in rows)
    acc = round(correct / len(rows) * 100, 1)
    p = round(ans_no_true / ans_no * 100, 1)
    rec = round(ans_no_true / truth_no * 100, 1)
    f1 = round(2 * (p / 100) * (rec / 100) / ((p / 100) + (rec / 100) + eps) * 100, 1)
    return {"accuracy": acc, "precision": p, "recall": rec, "f1": f1}


def test_amber_scores_follow_inference_py():
    rows = _amber_rows()
    res = score_amber(rows, "official")
    pick = {"existence": ["discriminative-hallucination"],
            "attribute": ["discriminative-attribute-state", "discriminative-attribute-number",
                          "discriminative-attribute-action"],
            "relation": ["discriminative-relation"], "state": ["discriminative-attribute-state"],
            "number": ["discriminative-attribute-number"], "action": ["discriminative-attribute-action"]}
    exp = {"discriminative": _official(rows, 0.0001)}
    for name, types in pick.items():
        exp[name] = _official([r for r in rows if r["type"] in types], 0.001 if name == "existence" else 0.0001)
    for name, e in exp.items():
        got = {k: res[name][k] for k in e}
        assert got == e, name
    # "Yes." and "no" are neither Yes nor No for inference.py: wrong answers; the vlmevalkit rule extracts them
    assert res["attribute"]["accuracy"] == round(4 / 6 * 100, 1)
    v = score_amber(rows, "vlmevalkit")
    assert v["attribute"]["accuracy"] == 100.0


def test_amber_zero_division_is_undefined_not_a_crash():
    rows = [{"id": "x", "type": "discriminative-relation", "label": "yes", "prediction": "Yes"}]
    res = score_amber(rows)
    assert res["relation"]["precision"] is None and "no 'No' answer" in res["relation"]["notes"]["precision"]
    assert score_amber(rows, zero_division="zero")["relation"]["f1"] == 0.0
    with pytest.raises(ZeroDivisionError):
        score_amber(rows, zero_division="raise")


def test_amber_official_layout_round_trip(tmp_path):
    root = dd.make_amber(tmp_path / "amber", n_images=3, n_generative=2)
    ds = load_dataset("amber", root)
    queries = json.loads((root / "query" / "query_discriminative.json").read_text())
    assert len(ds) == len(queries) == 15 and ds.n_errors() == 0
    ann = json.loads((root / "annotations.json").read_text())
    for r in ds.records:   # annotations[id - 1], as inference.py indexes them
        assert r["label"] == ann[r["question_id"] - 1]["truth"] and r["type"] == ann[r["question_id"] - 1]["type"]
    assert ds.info["dimensions"] == {"existence": 3, "attribute": 9, "relation": 3}


# ------------------------------------------------------------------------------------------- end to end
def test_eval_runs_both_on_a_tiny_model(tmp_path):
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    hb = dd.make_hallusionbench(tmp_path / "hb", n_sets=1)
    am = dd.make_amber(tmp_path / "amber", n_images=1)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["eval", "--model", "tiny:qwen2_vl", "--method", "fastervlm", "--set",
                                   "keep_ratio=0.5", "--bench", "hallusionbench,amber", "--data", f"hallusionbench={hb}",
                                   "--data", f"amber={am}", "--set", "hallusionbench.max_new_tokens=2", "--set",
                                   "amber.max_new_tokens=2", "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert res.exit_code in (0, 1), res.output
    m = json.loads((out / "metrics.json").read_text())["benchmarks"]
    assert m["hallusionbench"]["status"] == "scored" and m["hallusionbench"]["n_errors"] == 0
    assert m["hallusionbench"]["n"] == 10 and set(m["hallusionbench"]["per_category"]) == {"VD", "VS"}
    assert m["amber"]["n"] == 5 and m["amber"]["n_errors"] == 0
    preds = [json.loads(x) for x in (out / "predictions" / "hallusionbench.jsonl").read_text().splitlines()]
    assert sorted({p["visual_tokens_after"] == 0 for p in preds}) == [False, True]   # text-only rows ran too


def test_synthetic_versions_on_the_reference_scenes(tmp_path):
    """Synthetic AMBER / HallusionBench from held-out scenes: each question's truth follows from the scene."""
    from vtoolkit.data import scenes as S
    from vtoolkit.data import synthetic as sy

    am = load_dataset("amber", sy.make_amber(tmp_path / "am", n_images=6))
    assert am.n_errors() == 0 and set(am.info["dimensions"]) == {"existence", "attribute", "relation"}
    for r in am.records:
        scene = S.make_scene(S.BENCH_SEED + sy.BENCH_OFFSETS["amber"], int(r["image"].split("_")[1].split(".")[0]) - 1)
        if r["type"] == "discriminative-hallucination":
            present = any(f" {c} " in f" {r['question'].rstrip('?').replace('an ', 'a ')} " for c in scene.classes)
            assert (r["label"] == "yes") == present, r
    hb = load_dataset("hallusionbench", sy.make_hallusionbench(tmp_path / "hb", n_sets=3))
    assert len(hb) == 12 and hb.n_errors() == 0
    labels = {(r["set_id"], r["figure_id"], r["question_id"]): r["label"] for r in hb.records}
    for s in ("0", "1", "2"):   # the removed class: yes on the original, no on the edit; the kept one: yes on both
        assert (labels[(s, "0", "0")], labels[(s, "1", "0")], labels[(s, "0", "1")], labels[(s, "1", "1")]) == \
               ("yes", "no", "yes", "yes")
