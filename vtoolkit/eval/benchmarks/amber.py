"""AMBER, discriminative part (Wang et al., 2023): yes/no questions on existence, attribute and relation.

Data layout
-----------
``official``: the AMBER repository's ``data/`` folder (or the repository itself): ``query/query_discriminative.json``
(a JSON array of ``{"id", "image", "query"}``; ``query_discriminative-{existence,attribute,relation}.json`` are
read when the combined file is absent) and ``annotations.json`` (``annotations[id - 1]`` holds ``type`` and
``truth``), images ``AMBER_<n>.jpg`` in ``images=`` (default: ``<root>/image``, ``<root>/images``,
``<root>/../image``). Generative queries (``type == "generative"``) are skipped: the generative part needs spaCy's
``en_core_web_lg`` vectors for its synonym test, which cannot be installed here, and is not approximated.

Scoring: the official ``inference.py`` (junyangwang0410/AMBER @5e1fd52) rules
-----------------------------------------------------------------------------
The positive class is **"No"** (a hallucination is caught when the model says no). Over a dimension's questions:
``Accuracy = correct / N``; ``Precision = (answer "No" and truth "no") / answers "No"``; ``Recall = (answer "No" and
truth "no") / truths "no"``; each ``round(x * 100, 1)``, and ``F1 = round(2 * (P/100) * (R/100) / (P/100 + R/100 +
eps) * 100, 1)`` from the ROUNDED precision and recall, ``eps = 0.001`` for Existence and ``0.0001`` for the others
(as the script). Dimensions: Existence (type ``discriminative-hallucination``), Attribute (``-attribute-state``,
``-number``, ``-action``, each also reported alone), Relation (every other discriminative type), and the overall
"Discriminative Task". Numbers are percentages, as the script prints them.

``scorer_rule="official"`` (default) compares the answer as the script does: ``response == "Yes"`` /
``response == "No"`` exactly (the runner strips surrounding white space; "yes", "Yes." count as neither, so the
prompt asks for one word). ``scorer_rule="vlmevalkit"`` first maps the answer with VLMEvalKit's yes/no extraction
(as its AMBER task does), then applies the same formulas. Where the script divides by zero (e.g. no "No" answer) it
crashes; here the metric is ``None`` with a note (``zero_division="zero"``: 0; ``"raise"``: ZeroDivisionError).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from vtoolkit.config import ConfigError
from vtoolkit.eval.benchmark import Benchmark, register_benchmark
from vtoolkit.eval.datasets import Dataset, DataSpec, unique_id
from vtoolkit.eval.protocol import LLAVA_SHORT_ANSWER
from vtoolkit.eval.scorers._io import vlmevalkit_yorn

RULES = ("official", "vlmevalkit")
ATTRIBUTE_TYPES = {"discriminative-attribute-state": "state", "discriminative-attribute-number": "number",
                   "discriminative-attribute-action": "action"}
EXISTENCE_TYPE = "discriminative-hallucination"


def dimension(kind: str) -> str:
    """``existence``, ``attribute`` or ``relation`` of an annotation ``type`` (the script's if/elif chain)."""
    if kind == EXISTENCE_TYPE:
        return "existence"
    return "attribute" if kind in ATTRIBUTE_TYPES else "relation"


def _answer(response: str, rule: str) -> str:
    if rule == "vlmevalkit":
        return vlmevalkit_yorn(response)
    return str(response)


def _ratio(num: int, den: int, what: str, zero_division):
    if den:
        return round(num / den * 100, 1), None
    if zero_division == "raise":
        raise ZeroDivisionError(f"{what}: division by zero")
    if zero_division == "zero":
        return 0.0, None
    return None, f"undefined: {what} has a zero denominator"


def _block(rows: Sequence[Mapping], eps: float, zero_division) -> dict:
    n = len(rows)
    correct = sum(r["_ok"] for r in rows)
    ans_no = sum(r["_ans"] == "No" for r in rows)
    ans_no_true = sum(r["_ans"] == "No" and r["_truth"] == "no" for r in rows)
    truth_no = sum(r["_truth"] == "no" for r in rows)
    notes = {}
    acc, notes["accuracy"] = _ratio(correct, n, "accuracy (no questions)", zero_division)
    prec, notes["precision"] = _ratio(ans_no_true, ans_no, "precision (no 'No' answer)", zero_division)
    rec, notes["recall"] = _ratio(ans_no_true, truth_no, "recall (no 'no' truth)", zero_division)
    if prec is None or rec is None:
        f1, notes["f1"] = None, notes["precision"] or notes["recall"]
    else:
        f1 = round(2 * (prec / 100) * (rec / 100) / ((prec / 100) + (rec / 100) + eps) * 100, 1)
    return {"accuracy": acc, "precision": prec, "recall": rec, "f1": f1, "n": n,
            "notes": {k: v for k, v in notes.items() if v}}


def score_amber(rows: Sequence[Mapping], rule: str = "official", zero_division=None) -> dict:
    """The official discriminative metrics of ``rows`` (each with ``type``, ``label`` (the truth, yes/no) and
    ``prediction``): ``discriminative`` (all), ``existence``, ``attribute`` (+ ``state``, ``number``, ``action``),
    ``relation``; a dimension without questions is left out."""
    if rule not in RULES:
        raise ValueError(f"unknown AMBER rule {rule!r}; choose one of {list(RULES)}")
    if zero_division not in (None, "raise", "zero"):
        raise ValueError(f"zero_division must be None, 'raise' or 'zero', got {zero_division!r}")
    if not rows:
        raise ValueError("no answers to score")
    prepared = []
    for r in rows:
        truth = str(r["label"]).strip().lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"{r.get('id')}: truth must be yes/no, got {r['label']!r}")
        ans = _answer(r["prediction"], rule)
        ok = (truth == "yes" and ans == "Yes") or (truth == "no" and ans == "No")
        prepared.append({**r, "_truth": truth, "_ans": ans, "_ok": ok})
    groups = {"discriminative": (prepared, 0.0001),
              "existence": ([r for r in prepared if r["type"] == EXISTENCE_TYPE], 0.001),
              "attribute": ([r for r in prepared if r["type"] in ATTRIBUTE_TYPES], 0.0001)}
    for kind, short in ATTRIBUTE_TYPES.items():
        groups[short] = ([r for r in prepared if r["type"] == kind], 0.0001)
    groups["relation"] = ([r for r in prepared if dimension(r["type"]) == "relation"], 0.0001)
    return {name: _block(sub, eps, zero_division) for name, (sub, eps) in groups.items() if sub}


def _find(root: Path, *names: str) -> Path | None:
    for base in (root, root / "data"):
        for n in names:
            if (base / n).exists():
                return base / n
    return None


@register_benchmark("amber")
class AMBER(Benchmark):
    title = "AMBER"
    description = ("discriminative yes/no (existence, attribute, relation); accuracy, precision, recall, F1 of "
                   "'No' per dimension (official inference.py); the generative part is not provided")
    layouts = ("official",)
    rules = RULES
    defaults = {"post_prompt": LLAVA_SHORT_ANSWER, "max_new_tokens": 16, "scorer_rule": "official",
                "source": "AMBER query + LLaVA short-answer suffix (as vtoolkit's POPE / MME), greedy, 16 new "
                          "tokens; official AMBER inference.py discriminative metrics"}
    headline = "F1 (discriminative, positive class 'No')"
    unit = "%"
    metrics = (("accuracy", ("discriminative", "accuracy")), ("existence_f1", ("existence", "f1")),
               ("attribute_f1", ("attribute", "f1")), ("relation_f1", ("relation", "f1")))
    data_example = "/data/AMBER/data"

    def detect_layout(self, path: Path) -> str:
        if not path.exists():
            raise FileNotFoundError(f"amber data not found: {path}")
        return "official"

    def load(self, spec: DataSpec, layout: str, protocol) -> Dataset:
        root = Path(spec.path)
        ann_path = Path(spec.annotations) if spec.annotations else _find(root, "annotations.json")
        if ann_path is None or not ann_path.is_file():
            raise FileNotFoundError(f"AMBER: no annotations.json in {root} (or give annotations=FILE)")
        qdir = _find(root, "query")
        if qdir is None:
            raise FileNotFoundError(f"AMBER: no query/ folder in {root} or {root / 'data'}")
        files = ([qdir / "query_discriminative.json"] if (qdir / "query_discriminative.json").is_file() else
                 [qdir / f"query_discriminative-{d}.json" for d in ("existence", "attribute", "relation")
                  if (qdir / f"query_discriminative-{d}.json").is_file()])
        if not files:
            raise FileNotFoundError(f"AMBER: no query_discriminative*.json in {qdir}")
        annotations = json.loads(ann_path.read_text(encoding="utf-8"))
        if spec.images:
            img_dir = Path(spec.images)
        else:
            cands = [root / "image", root / "images", root.parent / "image", root.parent / "images"]
            img_dir = next((c for c in cands if c.is_dir()), root / "image")
        records, seen = [], {}
        for f in files:
            try:
                queries = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f}: not valid JSON ({e})") from None
            for q in queries:
                qid = q.get("id") if isinstance(q, Mapping) else None
                rec = {"bench": "amber", "split": None, "question_id": qid, "type": None,
                       "image": q.get("image") if isinstance(q, Mapping) else None,
                       "question": q.get("query") if isinstance(q, Mapping) else None, "label": None,
                       "error": None, "_ref": None}
                rec["id"] = unique_id(seen, f"amber/{qid}")
                if not isinstance(qid, int) or not 1 <= qid <= len(annotations):
                    rec["error"] = f"{f.name}: query id {qid!r} has no annotation (annotations[id - 1])"
                else:
                    ann = annotations[qid - 1]
                    rec["type"] = ann.get("type")
                    if rec["type"] == "generative":
                        continue   # the generative part is not provided (see the module docstring)
                    rec["split"] = dimension(rec["type"])
                    truth = ann.get("truth")
                    rec["label"] = truth.strip().lower() if isinstance(truth, str) else None
                    if not rec["question"] or not rec["image"]:
                        rec["error"] = f"{f.name}: query {qid}: missing image or query"
                    elif rec["label"] not in ("yes", "no"):
                        rec["error"] = f"annotations.json id {qid}: truth must be yes/no, got {truth!r}"
                    else:
                        rec["_ref"] = ("path", str(img_dir / rec["image"]))
                records.append(rec)
        sizes: dict = {}
        for r in records:
            sizes[r["split"]] = sizes.get(r["split"], 0) + 1
        return Dataset("amber", records, "official", {"queries": [str(f) for f in files],
                                                      "annotations": str(ann_path), "images": str(img_dir),
                                                      "dimensions": sizes})

    def score(self, valid, protocol, dataset, out_dir) -> dict:
        res = score_amber(valid, protocol.scorer_rule, zero_division=protocol.zero_division)
        head = res["discriminative"]
        out = {**res, "headline": head["f1"], "headline_name": "AMBER F1 (discriminative)",
               "higher_is_better": True}
        if head["f1"] is None:
            out["headline_note"] = head["notes"].get("f1", "undefined")
        return out
