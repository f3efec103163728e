"""HallusionBench (Guan et al., CVPR 2024): yes/no questions on original and edited figures, and without a figure.

Each question belongs to a *set* (``category`` VD "visual dependent" / VS "visual supplement", ``subcategory``,
``set_id``); ``figure_id`` 0 is the original figure, 1.. edited ones, and VS questions with ``visual_input == "0"``
are asked **without any image** (text-only records, batched with the others). Answers are yes/no
(``gt_answer`` "1" / "0").

Data layout
-----------
``json``: the official ``HallusionBench.json`` (a JSON array; keys ``category``, ``subcategory``, ``visual_input``,
``set_id``, ``figure_id``, ``question_id``, ``question``, ``gt_answer``, ``gt_answer_details``, ``filename``), the
file itself or a folder holding it. Images: ``filename`` (e.g. ``./hallusion_bench/VD/ocr/0_1.png``) relative to the
JSON's folder; with ``images=`` (the folder that holds ``VD/`` and ``VS/``, default ``<JSON folder>/hallusion_bench``)
or a row without ``filename``, the official ``utils.get_image_file_location`` rule
``<images>/<category>/<subcategory>/<set_id>_<figure_id>.png``.

Scoring (rule-based, no LLM judge)
----------------------------------
An answer is mapped to Yes / No / Unknown by VLMEvalKit's ``YOrN_Extraction`` (open-compass/VLMEvalKit
``vlmeval/dataset/utils/yorn.py``: lower case, VLMEvalKit's punctuation processing, "yes" among the words and "no"
not -> Yes, the reverse -> No, else Unknown); a question is correct iff the extraction equals the gold answer
(Unknown is wrong). Over the questions:

- ``aAcc`` = mean correctness over all questions;
- ``fAcc`` = share of figures whose questions are ALL correct;
- ``qAcc`` = share of questions (one question asked over a set's figures) correct on EVERY figure.

``scorer_rule="vlmevalkit"`` (default) groups as VLMEvalKit's ``Hallusion_rating`` does: figures by
``(l2-category, set_id, figure_id)`` and questions by ``(l2-category, set_id, question_id)`` with ``l2-category`` =
the official ``subcategory``, no-figure questions included; results overall, per ``category`` and per
``subcategory``, as fractions (VLMEvalKit prints x100). ``scorer_rule="official"`` groups as the official
``utils.py`` (``get_eval_fig`` / ``get_eval_pair_all``): keys include ``category``, and ``fAcc`` leaves out the VS
questions without a figure.

Where this differs from the paper's numbers: the paper (and the official ``evaluation.py``) judge correctness with
GPT-4 against ``gt_answer_details`` ("correct" / "incorrect" / "unclear"), so free-form answers that a judge accepts
may be Unknown here; with short yes/no answers (the default prompt asks for one word) the two agree.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from vtoolkit.config import ConfigError
from vtoolkit.eval.benchmark import Benchmark, register_benchmark
from vtoolkit.eval.datasets import Dataset, DataSpec, text_only_ref, unique_id
from vtoolkit.eval.protocol import LLAVA_SHORT_ANSWER
from vtoolkit.eval.scorers._io import vlmevalkit_yorn

RULES = ("vlmevalkit", "official")
_FIELDS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "question", "gt_answer")


def extract_yes_no(answer: str) -> str:
    """VLMEvalKit's ``YOrN_Extraction``: ``"Yes"``, ``"No"`` or ``"Unknown"``."""
    return vlmevalkit_yorn(answer)


def score_hallusionbench(rows: Sequence[Mapping], rule: str = "vlmevalkit") -> dict:
    """aAcc / fAcc / qAcc of ``rows`` (each with ``category``, ``subcategory``, ``set_id``, ``figure_id``,
    ``question_id``, ``visual_input``, ``label`` yes/no and ``prediction``), overall, per category and per
    subcategory (see the module docstring for the two grouping rules)."""
    if rule not in RULES:
        raise ValueError(f"unknown HallusionBench rule {rule!r}; choose one of {list(RULES)}")
    if not rows:
        raise ValueError("no answers to score")
    scored = []
    for r in rows:
        gold = str(r["label"]).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"{r.get('id')}: label must be yes/no, got {r['label']!r}")
        ext = extract_yes_no(r["prediction"])
        scored.append({**r, "extracted": ext, "correct": ext.lower() == gold})

    def block(sub: Sequence[Mapping]) -> dict:
        figs: dict[str, list[bool]] = {}
        qs: dict[str, list[bool]] = {}
        for r in sub:
            key = [str(r["subcategory"]), str(r["set_id"])]
            if rule == "official":
                key = [str(r["category"])] + key
                if not (r["category"] == "VS" and str(r["figure_id"]) == "0"):
                    figs.setdefault("_".join(key + [str(r["figure_id"])]), []).append(r["correct"])
            else:
                figs.setdefault("_".join(key + [str(r["figure_id"])]), []).append(r["correct"])
            qs.setdefault("_".join(key + [str(r["question_id"])]), []).append(r["correct"])
        return {"aAcc": sum(r["correct"] for r in sub) / len(sub),
                "fAcc": sum(all(v) for v in figs.values()) / len(figs) if figs else None,
                "qAcc": sum(all(v) for v in qs.values()) / len(qs),
                "n_questions": len(sub), "n_figures": len(figs), "n_question_groups": len(qs),
                "n_unknown": sum(r["extracted"] == "Unknown" for r in sub)}

    out = {"rule": rule, "overall": block(scored), "per_category": {}, "per_subcategory": {}}
    for key, name in (("category", "per_category"), ("subcategory", "per_subcategory")):
        for value in dict.fromkeys(str(r[key]) for r in scored):
            out[name][value] = block([r for r in scored if str(r[key]) == value])
    return out


@register_benchmark("hallusionbench")
class HallusionBench(Benchmark):
    title = "HallusionBench"
    description = ("yes/no on original, edited and no figures (VD / VS); aAcc, fAcc, qAcc, rule-based "
                   "(VLMEvalKit's yes/no extraction, no LLM judge)")
    layouts = ("json",)
    rules = RULES
    defaults = {"post_prompt": LLAVA_SHORT_ANSWER, "max_new_tokens": 32, "scorer_rule": "vlmevalkit",
                "source": "HallusionBench question + LLaVA short-answer suffix (as vtoolkit's POPE / MME), greedy, "
                          "32 new tokens; VLMEvalKit Hallusion_rating with YOrN_Extraction (no GPT judge)"}
    headline = "aAcc (question accuracy)"
    unit = "0-1"
    metrics = (("fAcc", ("overall", "fAcc")), ("qAcc", ("overall", "qAcc")),
               ("unknown", ("overall", "n_unknown")))
    data_example = "/data/HallusionBench/HallusionBench.json"

    def detect_layout(self, path: Path) -> str:
        if not path.exists():
            raise FileNotFoundError(f"hallusionbench data not found: {path}")
        return "json"

    def load(self, spec: DataSpec, layout: str, protocol) -> Dataset:
        path = Path(spec.path)
        file = path if path.is_file() else path / "HallusionBench.json"
        if not file.is_file():
            raise FileNotFoundError(f"HallusionBench: no HallusionBench.json in {path}")
        try:
            rows = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{file}: expected a non-empty JSON array of questions")
        base = file.parent
        img_root = Path(spec.images) if spec.images else base / "hallusion_bench"
        records, seen = [], {}
        for i, obj in enumerate(rows):
            rec = {"bench": "hallusionbench", "split": None, "image": None, "question": None, "label": None,
                   "error": None, "_ref": None}
            if not isinstance(obj, Mapping):
                rec.update(error=f"{file.name} record {i}: expected an object", id=unique_id(seen, f"hb/{i}"))
                records.append(rec)
                continue
            for k in _FIELDS:
                if k != "question" and k != "gt_answer":
                    rec[k] = None if obj.get(k) is None else str(obj.get(k))
            rec["split"] = rec["category"]
            rec["question"] = obj.get("question")
            gt = str(obj.get("gt_answer", "")).strip()
            rec["label"] = {"1": "yes", "0": "no"}.get(gt)
            missing = [k for k in _FIELDS if obj.get(k) in (None, "")]
            key = "/".join(str(obj.get(k)) for k in ("category", "subcategory", "set_id", "figure_id",
                                                      "question_id"))
            rec["id"] = unique_id(seen, f"hallusionbench/{key}")
            if missing:
                rec["error"] = f"{file.name} record {i}: missing field(s) {missing}"
            elif rec["label"] is None:
                rec["error"] = f"{file.name} record {i}: gt_answer must be '1' or '0', got {obj.get('gt_answer')!r}"
            elif rec["visual_input"] == "0":
                rec["_ref"] = text_only_ref()     # asked without a figure
            else:
                name = obj.get("filename")
                own = f"{rec['set_id']}_{rec['figure_id']}.png"
                if spec.images or not name:   # <images>/<category>/<subcategory>/<file> (official utils.py rule)
                    img = img_root / rec["category"] / rec["subcategory"] / (Path(str(name)).name if name else own)
                else:
                    img = base / str(name)
                rec["image"] = str(img.relative_to(base)) if img.is_relative_to(base) else str(img)
                rec["_ref"] = ("path", str(img))
            records.append(rec)
        n_text = sum(r["_ref"] == text_only_ref() for r in records)
        return Dataset("hallusionbench", records, "json", {"file": str(file), "n_questions": len(records),
                                                           "n_without_image": n_text})

    def score(self, valid, protocol, dataset, out_dir) -> dict:
        res = score_hallusionbench(valid, protocol.scorer_rule)
        return {**res, "headline": res["overall"]["aAcc"], "headline_name": "HallusionBench aAcc",
                "higher_is_better": True}
