"""POPE scorer (Li et al., EMNLP 2023): yes/no answer parsing + accuracy / precision / recall / F1 / yes-ratio.

Pure Python, no model imports. Every rule below reproduces one original scorer *exactly* (same floats) on hand-worked
cases and the original scripts' outputs (the test suite checks them: ``tests/test_scorers_pope.py``).

Answer-parsing rules (``rule=``)
--------------------------------
``official`` (default) -- RUCAIBox/POPE ``evaluate.py`` @3df3ba1; LLaVA ``llava/eval/eval_pope.py`` is identical.
    Keep only the text before the first ``"."``, delete every ``","``, split on the single space ``" "``; the answer
    is **no** iff a token is exactly ``"No"``, ``"not"`` or ``"no"``, otherwise **yes** (so "NO", "Nope", "I don't
    know", "" all count as yes).
``opera`` -- shikiw/OPERA ``pope_eval.py::recorder`` @61426ef.
    Delete every ``"."`` and ``","`` (whole answer, not only the first sentence), split on ``" "``; **no** iff a token
    is in {"No", "not", "no", "NO"} or ends with ``"n't"``, otherwise yes.
``vcd`` -- DAMO-NLP-SG/VCD ``experiments/eval/eval_pope.py`` @d6568ff.
    ``a = answer.lower().strip()``; for a *yes* label the prediction is yes iff the substring ``"yes"`` occurs in
    ``a``; for a *no* label the prediction is no iff the substring ``"no"`` occurs (it also matches "not", "know",
    "snow"...). Each gold label only tests its own keyword, so the parse depends on the label.
``lmms_eval`` -- EvolvingLMMs-Lab/lmms-eval ``tasks/pope/utils.py`` @75571cf.
    ``pred = answer.lower().strip()`` must equal ``"yes"``/``"no"`` exactly; anything else ("yes.", "Yes, ...") is
    "other": wrong for accuracy and left out of precision/recall.
``vlmevalkit`` -- open-compass/VLMEvalKit ``YOrN_Extraction`` + ``POPE_rating`` @e8e78f0, exact matching (no LLM
    judge). "Unknown" answers are wrong for accuracy and count as "no" for precision/recall/F1.

Metrics (positive class = yes), over the N questions of one split
-----------------------------------------------------------------
- ``accuracy = (TP + TN) / N``
- ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1 = 2 * P * R / (P + R)``
  (lmms-eval and VLMEvalKit evaluate ``2 * (P * R) / (P + R)``; the grouping is kept so the floats match)
- ``yes_ratio = (TP + FP) / N``: the fraction of *predictions* that are yes. For ``lmms_eval`` the reported
  ``yes_ratio`` / ``pope_yes_ratio`` reproduces lmms-eval's long-standing bug and is computed from the **labels**
  (always 0.5 on POPE); ``pred_yes_ratio`` always holds the prediction-based value.
- For ``lmms_eval``: TP = label yes & pred "yes", FP = label no & pred "yes", FN = label yes & pred "no",
  TN = label no & pred "no"; ``n_other`` answers are in N (accuracy) but in none of the four counts.
- For ``vlmevalkit``: all values are fractions here (VLMEvalKit prints them x100); multiply by 100 to get its numbers.
  An Unknown answer with a *yes* label counts in FN (VLMEvalKit's y_pred is ``extracted == "Yes"``), one with a *no*
  label in none of the four counts; all Unknowns are in ``n_other`` and wrong for accuracy.

Division by zero (``zero_division=``)
-------------------------------------
``None`` (default) behaves like the original of the rule where the original defines a value: ``lmms_eval`` and
``vlmevalkit`` return 0 for a ratio with a zero denominator (lmms-eval returns the *int* 0, kept as is). ``official``,
``opera`` and ``vcd`` divide without guards, so their scripts crash with ZeroDivisionError and define no value; for
them the default reports the metric as **undefined**: the value is ``None`` (``null`` in JSON, "n/a" in tables) and
``notes[metric]`` says why:

- precision when ``TP + FP == 0``: "undefined: no 'yes' answers (TP + FP = 0)" -- e.g. a model that answers every
  question "No" (accuracy, recall = 0 and the yes-ratio are still reported);
- recall when ``TP + FN == 0``: "undefined: no 'yes' labels (TP + FN = 0)";
- F1 when precision or recall is undefined (same note);
- F1 when ``P == R == 0`` (defined, no true positive): 0.0, the limit of ``2PR/(P+R)`` and the value of
  ``2TP / (2TP + FP + FN)``, with a note (a model that is wrong on every yes-question has F1 0, not "undefined").

``zero_division="undefined"`` forces this for every rule, ``"raise"`` raises :class:`ZeroDivisionError` as the
unguarded scripts do, ``"zero"`` reports 0. ``N == 0`` is a ValueError for every rule. The mean over splits of a
metric that is undefined in some split is undefined too (``None``, noted with the splits).

Deviations from the originals (all stricter, none changes a number)
-------------------------------------------------------------------
- Labels must be yes/no (case-insensitive, surrounding spaces ignored); the official script silently maps any
  non-"no" label to yes, we raise ValueError naming the offending row.
- Answers and labels must have the same length (the originals ``zip`` and silently truncate); with ``align="auto"``
  (default) and question ids on both sides the ids must match too. Alignment itself is by position, as in the
  originals (the ids are only checked), unless ``align="question_id"`` reorders the answers by id.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from vtoolkit.eval.scorers._io import PathLike, first_key, read_json_records, vlmevalkit_yorn

__all__ = [
    "ANSWER_KEYS",
    "LABEL_KEYS",
    "POPE_RULES",
    "PopeReport",
    "PopeResult",
    "load_pope_answers",
    "load_pope_labels",
    "load_pope_questions",
    "parse_pope_answer",
    "score_pope",
    "score_pope_files",
    "score_pope_splits",
]

Rule = Literal["official", "opera", "vcd", "lmms_eval", "vlmevalkit"]
POPE_RULES: tuple = ("official", "opera", "vcd", "lmms_eval", "vlmevalkit")
_GUARDED = {"lmms_eval", "vlmevalkit"}  # rules whose original guards zero denominators
ZERO_DIVISION = (None, "raise", "zero", "undefined")
ANSWER_KEYS = ("answer", "text", "prediction", "pred", "response", "output")
LABEL_KEYS = ("label", "answer", "gt_answer", "ground_truth")

_OFFICIAL_NEG = frozenset({"No", "not", "no"})
_OPERA_NEG = frozenset({"No", "not", "no", "NO"})


# ----------------------------------------------------------------------------------------------------- parsing
def _norm_label(label, where: str) -> str:
    if not isinstance(label, str):
        raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
    lab = label.strip().lower()
    if lab not in ("yes", "no"):
        raise ValueError(f"{where}: label must be 'yes' or 'no' (case-insensitive), got {label!r}")
    return lab


def parse_pope_answer(answer: str, rule: Rule = "official", label: str | None = None) -> str:
    """Map one free-form answer to ``"yes"``, ``"no"`` or (``lmms_eval``/``vlmevalkit`` only) ``"other"``.

    ``label`` is required for ``rule="vcd"`` only, because VCD's parse depends on the gold label.
    """
    if answer is None:
        answer = ""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string, got {type(answer).__name__}")
    if rule == "official":
        text = answer.split(".")[0] if "." in answer else answer
        words = text.replace(",", "").split(" ")
        return "no" if any(w in _OFFICIAL_NEG for w in words) else "yes"
    if rule == "opera":
        words = answer.replace(".", "").replace(",", "").split(" ")
        return "no" if any(w in _OPERA_NEG or w.endswith("n't") for w in words) else "yes"
    if rule == "vcd":
        if label is None:
            raise ValueError("rule 'vcd' needs the gold label: VCD only tests the label's own keyword")
        lab = _norm_label(label, "vcd")
        a = answer.lower().strip()
        if lab == "yes":
            return "yes" if "yes" in a else "no"
        return "no" if "no" in a else "yes"
    if rule == "lmms_eval":
        pred = answer.lower().strip()
        return pred if pred in ("yes", "no") else "other"
    if rule == "vlmevalkit":
        ext = vlmevalkit_yorn(answer)
        return {"Yes": "yes", "No": "no"}.get(ext, "other")
    raise ValueError(f"unknown POPE rule {rule!r}; choose one of {list(POPE_RULES)}")


# ----------------------------------------------------------------------------------------------------- results
@dataclass
class PopeResult:
    """Metrics of one split. Fractions in [0, 1]. ``to_dict()`` adds lmms-eval-style ``pope_*`` keys."""

    rule: str
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    n_other: int
    accuracy: float
    precision: float | None     # None: undefined (see ``notes``)
    recall: float | None
    f1: float | None
    yes_ratio: float
    pred_yes_ratio: float
    split: str | None = None
    preds: list = field(default_factory=list, repr=False)
    notes: dict = field(default_factory=dict)   # metric -> why it is undefined (or 0 by convention)

    def to_dict(self, with_preds: bool = False) -> dict:
        d = asdict(self)
        if not with_preds:
            d.pop("preds")
        d.update({
            "pope_accuracy": self.accuracy,
            "pope_precision": self.precision,
            "pope_recall": self.recall,
            "pope_f1_score": self.f1,
            "pope_yes_ratio": self.yes_ratio,
        })
        return d


@dataclass
class PopeReport:
    """Per-split results plus the plain arithmetic mean of each metric over the splits."""

    rule: str
    splits: dict
    average: dict

    def to_dict(self) -> dict:
        return {"rule": self.rule, "splits": {k: v.to_dict() for k, v in self.splits.items()}, "average": self.average}


UNDEFINED_NOTES = {"precision": "undefined: no 'yes' answers (TP + FP = 0)",
                   "recall": "undefined: no 'yes' labels (TP + FN = 0)"}


class _Undefined(Exception):
    """A ratio with a zero denominator under ``zero_division='undefined'``."""


def _ratio(num, den, what: str, mode: str, rule: str):
    if den == 0:
        if mode == "zero":
            return 0
        if mode == "undefined":
            raise _Undefined(what)
        raise ZeroDivisionError(
            f"POPE {what} is undefined ({what} denominator is 0); the original '{rule}' scorer raises here too. "
            f"Pass zero_division='zero' to report 0 instead, or zero_division='undefined' to report it as "
            f"undefined.")
    return num / den


def _metrics(tp: int, fp: int, fn: int, rule: str, mode: str) -> tuple:
    """``(precision, recall, f1, notes)`` with the rule's arithmetic; ``mode`` is raise | zero | undefined."""
    notes: dict = {}
    f = (lambda x: x) if rule in ("lmms_eval", "vlmevalkit") else float

    def ratio(num, den, what):
        try:
            return _ratio(f(num), f(den), what, mode, rule)
        except _Undefined:
            notes[what] = UNDEFINED_NOTES[what]
            return None

    precision = ratio(tp, tp + fp, "precision")
    recall = ratio(tp, tp + fn, "recall")
    if precision is None or recall is None:
        f1 = None
        notes["f1"] = notes.get("precision") or notes["recall"]
    elif precision + recall == 0 and mode == "undefined":
        f1 = 0.0
        notes["f1"] = "0: precision = recall = 0 (no true positives; the limit of 2PR/(P+R), = 2TP/(2TP+FP+FN))"
    elif rule in ("lmms_eval", "vlmevalkit"):
        f1 = _ratio(2 * (precision * recall), precision + recall, "F1", mode, rule)
    else:
        f1 = _ratio(2 * precision * recall, precision + recall, "F1", mode, rule)
    return precision, recall, f1, notes


def _align(answers: Sequence, labels: Sequence, answer_ids, label_ids, align: str):
    if len(answers) != len(labels):
        raise ValueError(f"POPE: {len(answers)} answers but {len(labels)} labels; the answer file must have exactly "
                         f"one answer per question, in question order (check you used the right split / file "
                         f"version, e.g. the 2910-question v2023-08 random split)")
    if align == "position" or answer_ids is None or label_ids is None:
        if align == "question_id":
            raise ValueError("align='question_id' needs question ids on both answers and questions")
        return list(answers)
    a_ids = [str(x) for x in answer_ids]
    l_ids = [str(x) for x in label_ids]
    if a_ids == l_ids:
        return list(answers)
    if align == "question_id":
        if len(set(a_ids)) != len(a_ids) or set(a_ids) != set(l_ids):
            missing = sorted(set(l_ids) - set(a_ids))[:5]
            raise ValueError(f"POPE: answer question_ids do not match the questions' (e.g. missing {missing}) or are "
                             f"duplicated")
        by_id = dict(zip(a_ids, answers))
        return [by_id[i] for i in l_ids]
    first = next(i for i, (a, b) in enumerate(zip(a_ids, l_ids)) if a != b)
    raise ValueError(f"POPE: answers are not in question order: row {first + 1} has question_id {a_ids[first]!r} "
                     f"but the question file has {l_ids[first]!r}. Pass align='question_id' to reorder by id, or "
                     f"align='position' to score by position as the original scripts do.")


def score_pope(answers: Sequence[str], labels: Sequence[str], rule: Rule = "official", *,
               zero_division: Literal["raise", "zero", "undefined"] | None = None,
               answer_ids: Sequence | None = None, label_ids: Sequence | None = None,
               align: Literal["auto", "position", "question_id"] = "auto", split: str | None = None) -> PopeResult:
    """Score one POPE split. ``answers`` are the raw model outputs, ``labels`` the gold "yes"/"no" strings.

    See the module docstring for the rules, formulas and division-by-zero behaviour.
    """
    if rule not in POPE_RULES:
        raise ValueError(f"unknown POPE rule {rule!r}; choose one of {list(POPE_RULES)}")
    if zero_division not in ZERO_DIVISION:
        raise ValueError("zero_division must be None, 'raise', 'zero' or 'undefined'")
    answers = _align(list(answers), list(labels), answer_ids, label_ids, align)
    n = len(labels)
    if n == 0:
        raise ValueError("POPE: no questions to score")
    labs = [_norm_label(lab, f"label #{i + 1}") for i, lab in enumerate(labels)]
    mode = zero_division or ("zero" if rule in _GUARDED else "undefined")

    tp = fp = tn = fn = other = 0
    preds = []
    for ans, lab in zip(answers, labs):
        p = parse_pope_answer(ans, rule, label=lab)
        if rule == "vlmevalkit" and p == "other":
            # Unknown: wrong for accuracy, "no" for P/R/F1 (y_pred = extracted == "Yes")
            other += 1
            if lab == "yes":
                fn += 1
        elif p == "other":  # lmms_eval: wrong, out of P/R
            other += 1
        elif p == "yes":
            if lab == "yes":
                tp += 1
            else:
                fp += 1
        else:
            if lab == "no":
                tn += 1
            else:
                fn += 1
        preds.append(p)

    accuracy = (tp + tn) / n
    precision, recall, f1, notes = _metrics(tp, fp, fn, rule, mode)
    pred_yes_ratio = (tp + fp) / n
    if rule == "lmms_eval":
        yes_ratio = labs.count("yes") / n  # lmms-eval bug, reproduced: label-based
    else:
        yes_ratio = pred_yes_ratio
    return PopeResult(rule=rule, n=n, tp=tp, fp=fp, tn=tn, fn=fn, n_other=other, accuracy=accuracy,
                      precision=precision, recall=recall, f1=f1, yes_ratio=yes_ratio, pred_yes_ratio=pred_yes_ratio,
                      split=split, preds=preds, notes=notes)


_AVG_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "pred_yes_ratio")


def score_pope_splits(splits: Mapping[str, tuple], rule: Rule = "official", **kwargs) -> PopeReport:
    """Score several splits: ``{name: (answers, labels)}`` (or ``(answers, labels, answer_ids, label_ids)``).

    ``average`` holds the arithmetic mean over the splits of each metric (e.g. LLaVA-1.5's "POPE F1" is the mean F1
    of the three COCO splits), with the lmms-eval-style ``pope_*`` keys too.
    """
    if not splits:
        raise ValueError("POPE: no splits given")
    res = {}
    for name, tup in splits.items():
        answers, labels, *ids = tup
        a_ids, l_ids = (ids + [None, None])[:2]
        res[name] = score_pope(answers, labels, rule, answer_ids=a_ids, label_ids=l_ids, split=name, **kwargs)
    avg: dict = {}
    notes: dict = {}
    for k in _AVG_KEYS:
        undefined = [name for name, r in res.items() if getattr(r, k) is None]
        if undefined:
            avg[k] = None
            why = res[undefined[0]].notes[k].removeprefix("undefined: ")
            notes[k] = f"undefined: in split(s) {', '.join(undefined)}, {why}"
        else:
            avg[k] = math.fsum(getattr(r, k) for r in res.values()) / len(res)
    avg["notes"] = notes
    avg.update({"pope_accuracy": avg["accuracy"], "pope_precision": avg["precision"], "pope_recall": avg["recall"],
                "pope_f1_score": avg["f1"], "pope_yes_ratio": avg["yes_ratio"], "n_splits": len(res)})
    return PopeReport(rule=rule, splits=res, average=avg)


# ----------------------------------------------------------------------------------------------------- loaders
def load_pope_questions(path: PathLike) -> list:
    """Load a POPE question file: JSON Lines or one JSON array, LF or CRLF.

    Returns dicts with ``question_id`` (or None), ``image``, ``question`` and ``label`` ("yes"/"no", normalised).
    The label key may be ``label`` (official/VCD files) or ``answer`` (lmms-lab/POPE rows); the question text key
    ``text`` (official) or ``question`` (lmms-lab).
    """
    recs = read_json_records(path)
    out = []
    for i, r in enumerate(recs, 1):
        where = f"{path}: record {i}"
        _, lab = first_key(r, LABEL_KEYS, "label", where)
        q = r.get("text", r.get("question"))
        out.append({"question_id": r.get("question_id"), "image": r.get("image", r.get("image_source")),
                    "question": q, "label": _norm_label(lab, where), "category": r.get("category")})
    if not out:
        raise ValueError(f"{path}: no questions found")
    return out


def load_pope_labels(path: PathLike) -> list:
    """Only the normalised labels of :func:`load_pope_questions`, in file order."""
    return [q["label"] for q in load_pope_questions(path)]


def load_pope_answers(path: PathLike, answer_key: str | None = None) -> tuple:
    """Load model answers: JSON Lines / JSON array of objects with ``answer`` (official), ``text`` (VCD/LLaVA) or
    ``prediction`` (and a few other common keys), or a JSON array of plain strings.

    Returns ``(answers, question_ids)``; ``question_ids`` is None unless every record has a ``question_id``.
    """
    recs = read_json_records(path)
    answers, ids = [], []
    keys = (answer_key,) if answer_key else ANSWER_KEYS
    for i, r in enumerate(recs, 1):
        if isinstance(r, str):
            answers.append(r)
            ids.append(None)
            continue
        _, a = first_key(r, keys, "answer", f"{path}: record {i}")
        if a is None:
            a = ""
        if not isinstance(a, str):
            raise ValueError(f"{path}: record {i}: answer must be a string, got {a!r}")
        answers.append(a)
        ids.append(r.get("question_id"))
    return answers, (ids if ids and all(x is not None for x in ids) else None)


def score_pope_files(answers: PathLike | Iterable[PathLike], questions: PathLike | Iterable[PathLike],
                     rule: Rule = "official", *, answer_key: str | None = None,
                     split_names: Sequence[str] | None = None, **kwargs) -> PopeReport:
    """Score answer file(s) against question file(s) (paired in order); split names default to the question stems."""
    a_list = [answers] if isinstance(answers, (str, Path)) else list(answers)
    q_list = [questions] if isinstance(questions, (str, Path)) else list(questions)
    if len(a_list) != len(q_list):
        raise ValueError(f"POPE: {len(a_list)} answer files but {len(q_list)} question files; pass them in pairs")
    names = list(split_names) if split_names else [Path(q).name.split(".")[0] for q in q_list]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    splits = {}
    for name, a, q in zip(names, a_list, q_list):
        qs = load_pope_questions(q)
        ans, a_ids = load_pope_answers(a, answer_key)
        splits[name] = (ans, [x["label"] for x in qs], a_ids,
                        [x["question_id"] for x in qs] if all(x["question_id"] is not None for x in qs) else None)
    return score_pope_splits(splits, rule, **kwargs)
