"""MME scorer (Fu et al. 2023): per-subtask acc / acc+ / score, Perception (/2000) and Cognition (/800) totals.

Pure Python, no model imports. Input is the official eval-tool layout: a results directory with one
``<subtask>.txt`` per subtask, each line ``image_name<TAB>question<TAB>GT (Yes|No)<TAB>model response``, the two
questions of an image on consecutive lines.

Rules (``rule=``), each reproducing its original's floats exactly (``tests/test_scorers_mme.py``)
-------------------------------------------------------------------------------------------
``official`` (default) -- ``eval_tool/calculation.py`` (BradyFU/Awesome-Multimodal-Large-Language-Models, branch
    Evaluation @dd29509). Response ``r`` (lower-cased): exactly "yes"/"no" -> itself; else look only at ``r[:4]``:
    contains "yes" -> yes, elif contains "no" -> no, else **other** (always wrong). Images = consecutive line pairs.
    ``acc = correct / n_questions``, ``acc_plus = images with both correct / n_images``,
    ``score = 100 * acc + 100 * acc_plus``; totals are sums in the official subtask order.
``lmms_eval`` -- lmms-eval ``tasks/mme/utils.py`` @75571cf. ``r = response.lower().strip()`` with every "."
    removed; exact yes/no -> itself; a single character: "y" -> yes, "n" -> no, else other; else the ``r[:4]`` test.
    Images are grouped by image name (lmms-eval's ``question_id``); per image ``acc_i = correct/2 * 100``,
    ``acc+_i = 100 if both correct``; ``score = sum_i (acc+_i + acc_i) / n_images`` (the same value as the official
    formula up to float rounding).
``vlmevalkit`` -- VLMEvalKit ``YOrN_Extraction`` + ``MME_rating`` @e8e78f0, exact matching (no GPT judge): "Yes"/"No"
    only when exactly one of the tokens "yes"/"no" occurs (after VLMEvalKit's punctuation stripping), else Unknown
    (wrong). Images grouped by name; ``score = mean(correct) * 100 + mean(both correct per image) * 100``; totals
    are ``perception`` and ``reasoning`` (= cognition) sums in VLMEvalKit's (alphabetical) order.

On the official LaVIN example results all three give Perception 963.6114445778312 (lmms-eval: ...311 by float
summation order); Cognition is 249.64285714285714 for official and lmms-eval, 248.92857142857144 for VLMEvalKit
(11 commonsense answers are "other"/Unknown for different reasons).

Deviations (none changes a number on well-formed input)
--------------------------------------------------------
- Line endings (LF/CRLF) are stripped before parsing; the official tool keeps the "\\n" on the response, which never
  changes a parse. Blank lines are skipped (the official tool crashes on them).
- A line without exactly 4 TAB-separated fields, a GT other than yes/no, an odd number of lines (official pairing) or
  an image with != 2 questions (lmms-eval/VLMEvalKit grouping) raises ValueError naming file and line.
- Only the subtask files present are scored; the totals sum over the present subtasks of each group and
  ``missing`` lists the absent ones (``strict=True`` requires all 14). Other ``.txt`` files are listed in
  ``ignored``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vtoolkit.eval.scorers._io import PathLike, vlmevalkit_yorn

__all__ = [
    "COGNITION_TASKS",
    "MME_RULES",
    "PERCEPTION_TASKS",
    "MMEItem",
    "MMEResult",
    "parse_mme_answer",
    "read_mme_results_dir",
    "read_mme_task_file",
    "score_mme",
    "score_mme_dir",
]

Rule = Literal["official", "lmms_eval", "vlmevalkit"]
MME_RULES: tuple = ("official", "lmms_eval", "vlmevalkit")

# official eval_tool order (also the order lmms-eval's aggregation meets the categories on the LaVIN data)
PERCEPTION_TASKS: tuple = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                           "artwork", "OCR")
COGNITION_TASKS: tuple = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_VLMEVALKIT_ORDER = {
    "perception": ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                   "scene"),
    "cognition": ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"),
}


@dataclass(frozen=True)
class MMEItem:
    image: str
    question: str
    gt: str  # "yes" / "no"
    response: str
    line: int = 0


def parse_mme_answer(response: str, rule: Rule = "official") -> str:
    """Map a response to ``"yes"``, ``"no"`` or ``"other"`` with the given rule (see module docstring)."""
    if response is None:
        response = ""
    if rule == "official":
        r = response.lower()
        if r in ("yes", "no"):
            return r
        p = r[:4]
        return "yes" if "yes" in p else ("no" if "no" in p else "other")
    if rule == "lmms_eval":
        r = response.lower().strip().replace(".", "")
        if r in ("yes", "no"):
            return r
        if len(r) == 1:
            return {"y": "yes", "n": "no"}.get(r, "other")
        p = r[:4]
        return "yes" if "yes" in p else ("no" if "no" in p else "other")
    if rule == "vlmevalkit":
        return {"Yes": "yes", "No": "no"}.get(vlmevalkit_yorn(response), "other")
    raise ValueError(f"unknown MME rule {rule!r}; choose one of {list(MME_RULES)}")


def read_mme_task_file(path: PathLike) -> list[MMEItem]:
    """Read one eval-tool ``<subtask>.txt`` file (4 TAB-separated fields per line)."""
    p = Path(path)
    items = []
    text = p.read_bytes().decode("utf-8-sig")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise ValueError(f"{p}:{i}: expected 4 TAB-separated fields (image, question, GT, response), got "
                             f"{len(parts)}; responses must be single-line and TAB-free")
        img, q, gt, resp = parts
        g = gt.strip().lower()
        if g not in ("yes", "no"):
            raise ValueError(f"{p}:{i}: GT must be Yes or No, got {gt!r}")
        items.append(MMEItem(img, q, g, resp, i))
    return items


def read_mme_results_dir(results_dir: PathLike) -> tuple[dict[str, list[MMEItem]], list[str]]:
    """Read every known ``<subtask>.txt`` in ``results_dir``; returns ``({task: items}, ignored_file_names)``."""
    d = Path(results_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"MME results dir not found: {d}")
    known = PERCEPTION_TASKS + COGNITION_TASKS
    tasks, ignored = {}, []
    for f in sorted(d.glob("*.txt")):
        if f.stem in known:
            tasks[f.stem] = read_mme_task_file(f)
        else:
            ignored.append(f.name)
    if not tasks:
        raise ValueError(f"{d}: no MME subtask files found; expected files named <subtask>.txt for subtasks "
                         f"{list(known)}")
    return tasks, ignored


@dataclass
class MMEResult:
    rule: str
    tasks: dict[str, dict]
    perception: float
    cognition: float
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.perception + self.cognition

    def to_dict(self) -> dict:
        return {"rule": self.rule, "perception": self.perception, "cognition": self.cognition,
                "mme_perception_score": self.perception, "mme_cognition_score": self.cognition,
                "perception_max": 200 * sum(t in self.tasks for t in PERCEPTION_TASKS),
                "cognition_max": 200 * sum(t in self.tasks for t in COGNITION_TASKS),
                "tasks": self.tasks, "missing": self.missing, "ignored": self.ignored}


def _groups_by_position(task: str, items: Sequence[MMEItem]) -> list[list[MMEItem]]:
    if len(items) % 2:
        raise ValueError(f"MME {task}: {len(items)} lines; the official tool pairs consecutive lines (2 questions per "
                         f"image), so the count must be even")
    return [list(items[i:i + 2]) for i in range(0, len(items), 2)]


def _groups_by_image(task: str, items: Sequence[MMEItem]) -> list[list[MMEItem]]:
    groups: dict[str, list[MMEItem]] = {}
    for it in items:
        groups.setdefault(it.image, []).append(it)
    for img, g in groups.items():
        if len(g) != 2:
            raise ValueError(f"MME {task}: image {img!r} has {len(g)} questions (lines "
                             f"{[x.line for x in g]}); MME needs exactly 2 per image")
    return list(groups.values())


def _score_task(task: str, items: Sequence[MMEItem], rule: str) -> dict:
    if not items:
        raise ValueError(f"MME {task}: no questions")
    groups = _groups_by_position(task, items) if rule == "official" else _groups_by_image(task, items)
    for it in items:
        if str(it.gt).strip().lower() not in ("yes", "no"):
            raise ValueError(f"MME {task}: GT must be Yes or No, got {it.gt!r} (image {it.image!r})")
    correct = [[parse_mme_answer(it.response, rule) == it.gt.strip().lower() for it in g] for g in groups]
    n_q = sum(len(g) for g in correct)
    n_img = len(groups)
    n_correct = sum(sum(g) for g in correct)
    n_plus = sum(all(g) for g in correct)
    other = sum(parse_mme_answer(it.response, rule) == "other" for it in items)
    acc = n_correct / n_q
    acc_plus = n_plus / n_img
    if rule == "official":
        score = 0
        score += acc * 100
        score += acc_plus * 100
    elif rule == "lmms_eval":
        total = 0
        for g in correct:
            scores = [1.0 if c else 0.0 for c in g]
            s_acc = sum(scores) / len(scores) * 100.0
            s_plus = (sum(scores) == 2) * 100.0
            total += s_plus + s_acc
        score = total / n_img
    else:  # vlmevalkit
        score = acc * 100 + acc_plus * 100
    return {"n_questions": n_q, "n_images": n_img, "acc": acc, "acc_plus": acc_plus, "score": score,
            "other_num": other}


def score_mme(tasks: Mapping[str, Sequence[MMEItem]], rule: Rule = "official", *, strict: bool = False,
              ignored: list[str] | None = None) -> MMEResult:
    """Score ``{subtask: items}``. ``acc``/``acc_plus`` are fractions, ``score`` is in [0, 200]."""
    if rule not in MME_RULES:
        raise ValueError(f"unknown MME rule {rule!r}; choose one of {list(MME_RULES)}")
    known = PERCEPTION_TASKS + COGNITION_TASKS
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; expected names from {list(known)}")
    missing = [t for t in known if t not in tasks]
    if strict and missing:
        raise ValueError(f"MME: missing subtask file(s) {missing} (strict=True needs all 14)")
    per = {t: _score_task(t, tasks[t], rule) for t in known if t in tasks}
    if rule == "vlmevalkit":
        orders = (_VLMEVALKIT_ORDER["perception"], _VLMEVALKIT_ORDER["cognition"])
    else:
        orders = (PERCEPTION_TASKS, COGNITION_TASKS)
    totals = []
    for order in orders:
        base = 0
        for t in order:
            if t in per:
                base += per[t]["score"]
        totals.append(base)
    return MMEResult(rule=rule, tasks=per, perception=totals[0], cognition=totals[1], missing=missing,
                     ignored=list(ignored or []))


def score_mme_dir(results_dir: PathLike, rule: Rule = "official", *, strict: bool = False) -> MMEResult:
    """Score an eval-tool results directory (one ``<subtask>.txt`` per subtask)."""
    tasks, ignored = read_mme_results_dir(results_dir)
    return score_mme(tasks, rule, strict=strict, ignored=ignored)
