"""`vtoolkit score {pope,chair,mme}`: score saved model outputs with the exact original scorers (no model needed).

Mounted on the main app by ``vtoolkit/eval/cli.py::register`` as ``app.add_typer(score_app, name="score")``.
Every command prints a rich table, or JSON with ``--json``; bad inputs exit with status 2 and a one-line message.
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

score_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Score saved outputs: POPE, CHAIR, MME (exact re-implementations of the original scripts).")


class PopeRule(str, Enum):
    official = "official"
    opera = "opera"
    vcd = "vcd"
    lmms_eval = "lmms_eval"
    vlmevalkit = "vlmevalkit"


class ChairVariant(str, Enum):
    opera = "opera"
    original = "original"
    synthetic = "synthetic"


class MMERule(str, Enum):
    official = "official"
    lmms_eval = "lmms_eval"
    vlmevalkit = "vlmevalkit"


class ZeroDivision(str, Enum):
    original = "original"
    raise_ = "raise"
    zero = "zero"


class PopeZeroDivision(str, Enum):
    original = "original"
    raise_ = "raise"
    zero = "zero"
    undefined = "undefined"


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _err_text(e: BaseException, flags: dict[str, str]) -> str:
    """The error's message (KeyError's quotes dropped) with the scorer's keyword hints written as this command's
    options (``zero_division='zero'`` -> ``--zero-division zero``)."""
    from vtoolkit.eval.scorers._io import with_flags

    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return with_flags(text, flags)


def _zd(z) -> str | None:
    return None if z.value == "original" else z.value


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _table(title: str, columns: list[str]):
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def _print(table) -> None:
    from vtoolkit.cli import print_table

    print_table(table)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.2f}"


_NA_SHORT = {"precision": "no yes answers", "recall": "no yes labels"}


def _pct_note(v, notes: dict, key: str) -> str:
    """A percentage, or "n/a (why)" for an undefined POPE metric."""
    if v is not None:
        return _pct(v)
    why = next((short for k, short in _NA_SHORT.items() if k in notes and notes[k] == notes.get(key)), None)
    return f"n/a ({why})" if why else "n/a"


@score_app.command("pope")
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


@score_app.command("chair")
def chair_cmd(
    captions: Path = typer.Option(..., "--captions", "-c", help="generated captions: JSONL/JSON with image_id + "
                                  "caption (OPERA/HALC logs), or {'imgToEval': ...}"),
    gt: Path | None = typer.Option(None, "--gt", "-g", help="prebuilt ground truth {image_id: [objects]} "
                                      "(.json or .json.gz)"),
    gt_overlay: Path | None = typer.Option(None, "--gt-overlay", help="per-image GT replacements applied on top "
                                              "of --gt (e.g. the pattern-variant diff)"),
    coco_annotations: Path | None = typer.Option(None, "--coco-annotations", help="instead of --gt: COCO 2014 "
                                                    "annotations dir (instances_* + captions_*); slow"),
    variant: ChairVariant = typer.Option(ChairVariant.opera, "--variant", help="opera (NLTK WordNet; OPERA/HALC/"
                                         "lmms-eval), original (pattern singularize; Rohrbach et al.) or synthetic "
                                         "(the synthetic scenes of vtoolkit demo / ref:shapes; no NLTK data)"),
    image_id_key: str = typer.Option("image_id", "--image-id-key"),
    caption_key: str = typer.Option("caption", "--caption-key"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="custom synonym file (one line per object, "
                                            "'node, syn1, syn2')"),
    unknown_image: str = typer.Option("error", "--unknown-image", help="error | empty (original behaviour)"),
    zero_division: ZeroDivision = typer.Option(ZeroDivision.original, "--zero-division",
                                               help="original/raise: like the scripts; zero: report 0"),
    nltk_compat: str = typer.Option("3.9", "--nltk-compat", help="3.9 (tokens as NLTK 3.9.1-3.10.0, reproduces "
                                    "published Len) | installed"),
    save: Path | None = typer.Option(None, "--save", help="write overall + per-caption details to this JSON"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """CHAIRs, CHAIRi, Recall and Len of generated captions against COCO ground-truth objects."""
    from vtoolkit.eval.scorers.chair import CHAIR, ChairResourceError, build_gt_from_coco, load_captions, load_gt

    if (gt is None) == (coco_annotations is None):
        _fail("pass exactly one of --gt and --coco-annotations")
    if unknown_image not in ("error", "empty"):
        _fail("--unknown-image must be error or empty")
    if nltk_compat not in ("3.9", "installed"):
        _fail("--nltk-compat must be 3.9 or installed")
    try:
        caps = load_captions(captions, image_id_key, caption_key)
        ev = CHAIR(variant.value, synonyms=synonyms, nltk_compat=nltk_compat)
        gts = load_gt(gt, gt_overlay) if gt is not None else build_gt_from_coco(coco_annotations, ev)
        res = ev.compute(caps, gts, unknown_image=unknown_image, zero_division=_zd(zero_division))
    except ChairResourceError as e:
        _fail(str(e))
    except (ValueError, KeyError, FileNotFoundError, ZeroDivisionError, TypeError) as e:
        _fail(_err_text(e, {"zero_division": "--zero-division {}", "unknown_image": "--unknown-image {}"}))
    if save is not None:
        save.write_text(json.dumps(res.to_dict(with_captions=True), indent=1, ensure_ascii=False))
    if as_json:
        _print_json(res.to_dict())
        return
    o = res.overall
    t = _table(f"CHAIR (variant: {res.variant}; CHAIRs/CHAIRi/Recall in %, Len = mean tokens)",
               ["captions", "CHAIRs", "CHAIRi", "Recall", "Len", "mentions", "hallucinated"])
    t.add_row(str(o["n_captions"]), f"{o['CHAIRs'] * 100:.1f}", f"{o['CHAIRi'] * 100:.1f}",
              f"{o['Recall'] * 100:.1f}", f"{o['Len'] * 100:.2f}", str(o["n_mentions"]),
              str(o["n_hallucinated_mentions"]))
    _print(t)


@score_app.command("mme")
def mme_cmd(
    results_dir: Path = typer.Option(..., "--results-dir", "-d", help="eval_tool layout: one <subtask>.txt per "
                                     "subtask, lines 'image<TAB>question<TAB>Yes|No<TAB>response'"),
    rule: MMERule = typer.Option(MMERule.official, "--rule", help="official eval_tool | lmms_eval | vlmevalkit "
                                 "(exact matching)"),
    strict: bool = typer.Option(False, "--strict", help="require all 14 subtask files"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """MME acc / acc+ / score per subtask and the Perception (/2000) and Cognition (/800) totals."""
    from vtoolkit.eval.scorers.mme import COGNITION_TASKS, PERCEPTION_TASKS, score_mme_dir

    try:
        res = score_mme_dir(results_dir, rule.value, strict=strict)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(_err_text(e, {"strict": "--strict"}))
    if as_json:
        _print_json(res.to_dict())
        return
    d = res.to_dict()
    t = _table(f"MME (rule: {rule.value})", ["subtask", "questions", "acc %", "acc+ %", "score", "other"])
    for group, tasks, total, mx in (("Perception", PERCEPTION_TASKS, res.perception, d["perception_max"]),
                                    ("Cognition", COGNITION_TASKS, res.cognition, d["cognition_max"])):
        for name in tasks:
            if name in res.tasks:
                v = res.tasks[name]
                t.add_row(name, str(v["n_questions"]), _pct(v["acc"]), _pct(v["acc_plus"]), f"{v['score']:.2f}",
                          str(v["other_num"]))
        if mx:
            t.add_row(f"[bold]{group}[/bold]", "", "", "", f"[bold]{total:.2f}[/bold] / {mx}", "")
    _print(t)
    if res.missing:
        typer.echo(f"note: missing subtask files: {', '.join(res.missing)}", err=True)
