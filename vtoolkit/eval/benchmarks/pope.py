"""POPE (Li et al., EMNLP 2023): yes/no object-existence questions, scored per split and averaged.

Data layouts
------------
``json``: one or more official question files (JSON Lines or one JSON array, LF or CRLF; keys ``question_id``,
``image``, ``text``, ``label``), images from ``images=`` (default: ``<file dir>/images``, ``<file dir>/val2014``).
A directory of ``*.json``/``*.jsonl`` files is one split per file.
``parquet``: lmms-lab/POPE (``question_id``, ``question``, ``answer``, ``image`` (HF Image struct), ``category``,
``image_source``, ``id``); ``data/`` (config ``default``) is preferred over ``Full/``.

Protocol (defaults): the question + ``"\\nAnswer the question using a single word or phrase."`` (LLaVA-1.5's eval
scripts and lmms-eval's default), greedy, ``max_new_tokens=128`` (LLaVA / lmms-eval; OPERA uses 10), scored with the
official POPE rule (= LLaVA ``eval_pope.py``), per split plus the mean over splits; the other rules of
:mod:`vtoolkit.eval.scorers.pope` are ``--set pope.scorer_rule=...``. Where the official script divides by zero
(precision when no answer is "yes") the metric is reported *undefined* (``null``, with a note) and the benchmark is
still scored; ``--set pope.zero_division=zero`` reports 0.

``--limit N`` keeps N samples spread evenly over the splits (the first records of each split), so the headline "mean
over splits" averages every split once N >= the number of splits; with fewer, the headline says which it averages.
"""
from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer

from vtoolkit.eval.benchmark import Benchmark, register_benchmark
from vtoolkit.eval.cli_score import ZeroDivisionUndefined as PopeZeroDivision
from vtoolkit.eval.cli_score import _err_text, _fail, _pct, _print, _print_json, _table, _zd
from vtoolkit.eval.datasets import (
    Dataset,
    DataSpec,
    iter_parquet_rows,
    parquet_files,
    read_json_rows,
    resolve_image,
    spread_over_splits,
    unique_id,
)
from vtoolkit.eval.protocol import LLAVA_SHORT_ANSWER
from vtoolkit.eval.scorers.pope import POPE_RULES

PopeRule = Enum("PopeRule", {r: r for r in POPE_RULES}, type=str)
_NA_SHORT = {"precision": "no yes answers", "recall": "no yes labels"}


def _pct_note(v, notes: dict, key: str) -> str:
    """A percentage, or "n/a (why)" for an undefined POPE metric."""
    if v is not None:
        return _pct(v)
    why = next((short for k, short in _NA_SHORT.items() if k in notes and notes[k] == notes.get(key)), None)
    return f"n/a ({why})" if why else "n/a"


@register_benchmark("pope")
class POPE(Benchmark):
    title = "POPE"
    description = "yes/no object existence (random / popular / adversarial splits); F1 per split, mean over splits"
    layouts = ("json", "parquet")
    rules = POPE_RULES
    zero_division = (None, "raise", "zero", "undefined")
    defaults = {"post_prompt": LLAVA_SHORT_ANSWER, "max_new_tokens": 128, "scorer_rule": "official",
                "source": "LLaVA-1.5 eval / lmms-eval pope: short-answer prompt, greedy, 128 new tokens; "
                          "official POPE evaluate.py parsing"}
    headline = "F1 (mean over splits)"
    unit = "0-1"
    metrics = (("accuracy", ("average", "accuracy")), ("precision", ("average", "precision")),
               ("recall", ("average", "recall")), ("yes_ratio", ("average", "pred_yes_ratio")))
    data_example = "/data/pope/coco"

    def detect_layout(self, path: Path) -> str:
        if path.is_file() and path.suffix != ".parquet":
            if not path.exists():
                raise FileNotFoundError(f"pope data not found: {path}")
            return "json"
        return super().detect_layout(path)

    def load(self, spec: DataSpec, layout: str, protocol) -> Dataset:
        return _pope_json(spec) if layout == "json" else _pope_parquet(spec)

    def select(self, records, n):
        return spread_over_splits(records, n), "the first records of each split, n spread evenly over the splits"

    def score(self, valid, protocol, dataset, out_dir) -> dict:
        return _score_pope(valid, protocol, dataset)

    def add_score_command(self, app) -> None:
        app.command(self.name)(pope_cmd)


def _pope_json(spec: DataSpec) -> Dataset:
    path = Path(spec.path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"POPE: no question files (*.json, *.jsonl) in {path}")
    base = files[0].parent
    if spec.images:
        img_root = Path(spec.images)
    else:
        cands = [base / "images", base / "val2014", base]
        img_root = next((c for c in cands if c.is_dir() and c != base), base)
    records, seen, info_files = [], {}, []
    for f in files:
        split = f.name.split(".")[0]
        rows = read_json_rows(f, "a POPE question file")
        info_files.append({"file": str(f), "split": split, "rows": len(rows)})
        for line_no, obj, err in rows:
            rec = {"bench": "pope", "split": split, "question_id": None, "image": None, "question": None,
                   "label": None, "error": err, "_ref": None}
            if err is None:
                if not isinstance(obj, dict):
                    err = f"{f.name} record {line_no}: expected an object, got {type(obj).__name__}"
                else:
                    rec["question_id"] = obj.get("question_id")
                    rec["image"] = obj.get("image", obj.get("image_source"))
                    rec["question"] = obj.get("text", obj.get("question"))
                    lab = obj.get("label", obj.get("answer"))
                    rec["label"] = lab.strip().lower() if isinstance(lab, str) else lab
                    missing = [k for k in ("image", "question", "label") if not rec[k]]
                    if missing:
                        err = f"{f.name} record {line_no}: missing field(s) {missing}"
                    elif rec["label"] not in ("yes", "no"):
                        err = f"{f.name} record {line_no}: label must be yes/no, got {lab!r}"
                    else:
                        rec["_ref"] = ("path", str(resolve_image(img_root, str(rec["image"]))))
            rec["error"] = err
            qid = rec["question_id"] if rec["question_id"] is not None else f"line{line_no}"
            rec["id"] = unique_id(seen, f"pope/{split}/{qid}")
            records.append(rec)
    return Dataset("pope", records, "json", {"files": info_files, "images": str(img_root),
                                             "splits": _split_sizes(records)})


def _split_sizes(records) -> dict:
    out: dict = {}
    for r in records:
        out[r.get("split")] = out.get(r.get("split"), 0) + 1
    return out


def _pope_parquet(spec: DataSpec) -> Dataset:
    root = Path(spec.path)
    files = parquet_files(root)
    if root.is_dir() and (root / "data").is_dir() and parquet_files(root / "data"):
        files = parquet_files(root / "data")  # config "default" (9000 rows, all splits); Full/ duplicates it
    records, seen = [], {}
    cols = ["id", "question_id", "question", "answer", "category", "image_source"]
    for f, g, i, row in iter_parquet_rows(files, cols):
        split = row.get("category") or f.name.split("-")[0]
        lab = row.get("answer")
        rec = {"bench": "pope", "split": split, "question_id": row.get("question_id"),
               "image": row.get("image_source"), "question": row.get("question"),
               "label": lab.strip().lower() if isinstance(lab, str) else lab, "error": None,
               "_ref": ("parquet", str(f), g, i)}
        missing = [k for k in ("question", "label") if not rec[k]]
        if missing:
            rec["error"] = f"{f.name} row {i} of group {g}: missing field(s) {missing}"
        elif rec["label"] not in ("yes", "no"):
            rec["error"] = f"{f.name} row {i} of group {g}: label must be yes/no, got {lab!r}"
        key = row.get("id") if row.get("id") is not None else row.get("question_id")
        key = key if key is not None else f"{f.stem}:{g}:{i}"
        rec["id"] = unique_id(seen, f"pope/{split}/{key}")
        records.append(rec)
    return Dataset("pope", records, "parquet", {"files": [str(f) for f in files], "splits": _split_sizes(records)})


def _score_pope(valid, protocol, dataset) -> dict:
    from vtoolkit.eval.scorers.pope import score_pope_splits

    answers: dict[str, tuple[list, list]] = {}
    for r in valid:   # the answers, in the order the predictions file holds them
        a = answers.setdefault(str(r.get("split")), ([], []))
        a[0].append(r["prediction"])
        a[1].append(r["id"])
    labels: dict[str, tuple[list, list]] = {}
    ids = {r["id"] for r in valid}
    for r in (dataset.records if dataset is not None else valid):   # the gold labels, in dataset order
        if r["id"] in ids:
            lab = labels.setdefault(str(r.get("split")), ([], []))
            lab[0].append(r["label"])
            lab[1].append(r["id"])
    if set(answers) != set(labels):
        raise ValueError(f"POPE splits of the predictions {sorted(answers)} differ from the data's {sorted(labels)}")
    splits = {s: (answers[s][0], labels[s][0], answers[s][1], labels[s][1]) for s in labels}
    rep = score_pope_splits(splits, protocol.scorer_rule, zero_division=protocol.zero_division)
    d = rep.to_dict()
    out = {"splits": d["splits"], "average": d["average"], "headline": d["average"]["f1"],
           "headline_name": pope_headline_name(list(labels), _data_splits(dataset) or list(labels)),
           "splits_scored": list(labels), "higher_is_better": True}
    if out["headline"] is None:   # scored; F1 undefined (no "yes" answer): say so instead of a number
        out["headline_note"] = d["average"]["notes"].get("f1", "undefined")
    return out


def _data_splits(dataset) -> list[str]:
    """The POPE splits of the data (before any ``--limit``), in the data's order."""
    if dataset is None:
        return []
    sizes = dataset.info.get("splits") or {}
    return [str(s) for s in sizes] or list(dict.fromkeys(str(r.get("split")) for r in dataset.records))


def pope_headline_name(scored: Sequence[str], data_splits: Sequence[str]) -> str:
    """The name of the POPE headline: ``POPE F1 (mean over splits)`` when every split of the data was scored, else
    which were: ``POPE F1 (mean over 1 of 3 splits: coco_pope_random)`` (a ``--limit`` smaller than the number of
    splits, or a split whose every row failed), so a summary never claims more than it measured."""
    missing = [s for s in data_splits if s not in scored]
    if not missing:
        return "POPE F1 (mean over splits)"
    total = len(set(data_splits) | set(scored))
    return f"POPE F1 (mean over {len(scored)} of {total} splits: {', '.join(scored)})"


def pope_cmd(
    answers: list[Path] = typer.Option(..., "--answers", "-a", help="answers file (JSONL/JSON; keys answer|text|"
                                       "prediction); repeat once per split"),
    questions: list[Path] = typer.Option(..., "--questions", "-q", help="POPE question file with labels (JSONL or "
                                         "JSON array); repeat, paired in order with --answers"),
    rule: PopeRule = typer.Option(PopeRule.official, "--rule", help="answer-parsing rule of the original scorer"),
    answer_key: str | None = typer.Option(None, "--answer-key", help="read answers from this key only"),
    align: str = typer.Option("auto", "--align", help="auto (check question ids if present) | position | "
                              "question_id (reorder answers by id)"),
    zero_division: PopeZeroDivision = typer.Option(
        PopeZeroDivision.original, "--zero-division",
        help="original: the rule's original value where it defines one (lmms_eval, vlmevalkit: 0), else undefined "
             "(official/opera/vcd crash on 0/0: the metric is reported n/a with the reason); raise; zero; undefined"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """POPE accuracy / precision / recall / F1 / yes-ratio per split, plus the mean over splits."""
    from vtoolkit.eval.scorers.pope import score_pope_files

    if align not in ("auto", "position", "question_id"):
        _fail("--align must be auto, position or question_id")
    try:
        rep = score_pope_files(answers, questions, rule.value, answer_key=answer_key, align=align,
                               zero_division=_zd(zero_division))
    except (ValueError, KeyError, FileNotFoundError, ZeroDivisionError, TypeError) as e:
        _fail(_err_text(e, {"zero_division": "--zero-division {}", "align": "--align {}"}))
    if as_json:
        _print_json(rep.to_dict())
        return
    t = _table(f"POPE (rule: {rule.value}; %)", ["split", "N", "Acc", "Prec", "Rec", "F1", "Yes", "TP", "FP", "TN",
                                                 "FN", "other"])
    for name, r in rep.splits.items():
        t.add_row(name, str(r.n), _pct(r.accuracy), _pct_note(r.precision, r.notes, "precision"),
                  _pct_note(r.recall, r.notes, "recall"), _pct_note(r.f1, r.notes, "f1"), _pct(r.yes_ratio),
                  str(r.tp), str(r.fp), str(r.tn), str(r.fn), str(r.n_other))
    if len(rep.splits) > 1:
        a = rep.average
        t.add_row("average", "", _pct(a["accuracy"]), _pct(a["precision"]), _pct(a["recall"]), _pct(a["f1"]),
                  _pct(a["yes_ratio"]), "", "", "", "", "")
    _print(t)
    for name, r in rep.splits.items():
        for k, why in r.notes.items():
            typer.echo(f"note: {name}: {'F1' if k == 'f1' else k} {why}")
    if len(rep.splits) > 1:
        for k, why in rep.average.get("notes", {}).items():
            typer.echo(f"note: average: {'F1' if k == 'f1' else k} {why}")
