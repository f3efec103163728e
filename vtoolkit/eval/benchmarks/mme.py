"""MME (Fu et al., 2023): yes/no questions, two per image, 14 subtasks; Perception /2000 and Cognition /800.

Data layouts
------------
``folder``: the official ``MME_Benchmark_release_version`` (split subtasks ``<task>/images`` +
``<task>/questions_answers_YN``, the others ``<task>/<id>.{png,jpg}`` next to ``<task>/<id>.txt``, each .txt holding
two ``question<TAB>Yes|No`` lines). ``parquet``: lmms-lab/MME (``question_id`` = image path, ``question``,
``answer``, ``category``, ``image``).

Protocol (defaults): lmms-eval's default prompt: `` Please answer yes or no.`` is removed and
``"\\nAnswer the question using a single word or phrase."`` appended; greedy, ``max_new_tokens=16``; official
``calculation.py`` scoring (Perception /2000, Cognition /800). The answers are also written in the official eval-tool
format into the run folder (``mme_results/<task>.txt``: image, question, GT, response), so the original script can
re-score them.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from vtoolkit.eval.benchmark import Benchmark, register_benchmark
from vtoolkit.eval.cli_score import _err_text, _fail, _pct, _print, _print_json, _table
from vtoolkit.eval.datasets import IMAGE_EXTS, Dataset, DataSpec, iter_parquet_rows, parquet_files, unique_id
from vtoolkit.eval.protocol import LLAVA_SHORT_ANSWER, MME_SUFFIX
from vtoolkit.eval.scorers.mme import COGNITION_TASKS, MME_RULES, PERCEPTION_TASKS

MME_TASKS = tuple(PERCEPTION_TASKS) + tuple(COGNITION_TASKS)
MMERule = Enum("MMERule", {r: r for r in MME_RULES}, type=str)


@register_benchmark("mme")
class MME(Benchmark):
    title = "MME"
    description = "yes/no, two questions per image, 14 subtasks; acc + acc+ per subtask, perception + cognition"
    layouts = ("folder", "parquet")
    rules = MME_RULES
    defaults = {"post_prompt": LLAVA_SHORT_ANSWER, "strip_suffix": MME_SUFFIX, "max_new_tokens": 16,
                "scorer_rule": "official",
                "source": "lmms-eval mme default prompt, greedy, 16 new tokens; official eval_tool calculation.py"}
    headline = "total (perception + cognition)"
    unit = "points"
    metrics = (("perception", ("perception",)), ("cognition", ("cognition",)))
    artifacts = ("mme_results",)
    data_example = "/data/MME_Benchmark_release_version"

    def detect_layout(self, path: Path) -> str:
        if path.is_file() and path.suffix != ".parquet":
            from vtoolkit.config import ConfigError

            raise ConfigError(f"mme: expected a folder, got the file {path}")
        return super().detect_layout(path)

    def load(self, spec: DataSpec, layout: str, protocol) -> Dataset:
        return _mme_folder(spec) if layout == "folder" else _mme_parquet(spec)

    def score(self, valid, protocol, dataset, out_dir) -> dict:
        return _score_mme(valid, protocol, out_dir)

    def add_score_command(self, app) -> None:
        app.command(self.name)(mme_cmd)


def _mme_task_dirs(root: Path) -> list[tuple[str, Path]]:
    for base in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        found = [(t, base / t) for t in MME_TASKS if (base / t).is_dir()]
        if found:
            return found
    raise FileNotFoundError(f"MME: no subtask folders ({', '.join(MME_TASKS[:3])}, ...) in {root} or one level below")


def _mme_folder(spec: DataSpec) -> Dataset:
    root = Path(spec.path)
    records, seen, sizes = [], {}, {}
    for task, tdir in _mme_task_dirs(root):
        if (tdir / "questions_answers_YN").is_dir():
            qdir, idir = tdir / "questions_answers_YN", tdir / "images"
        else:
            qdir, idir = tdir, tdir
        txts = sorted(qdir.glob("*.txt"))
        for txt in txts:
            stem = txt.stem
            img = next((idir / (stem + e) for e in IMAGE_EXTS if (idir / (stem + e)).is_file()), None)
            img_name = img.name if img else stem
            try:
                lines = [ln for ln in txt.read_text(encoding="utf-8-sig").replace("\r", "").split("\n") if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                lines, file_err = [], f"{task}/{txt.name}: unreadable ({e})"
            else:
                file_err = None if lines else f"{task}/{txt.name}: no questions"
            if file_err:
                records.append({"id": unique_id(seen, f"mme/{task}/{img_name}#0"), "bench": "mme", "split": task,
                                "image": f"{task}/{img_name}", "question": None, "label": None,
                                "error": file_err, "_ref": None})
                continue
            for k, line in enumerate(lines):
                parts = line.split("\t")
                rec = {"id": unique_id(seen, f"mme/{task}/{img_name}#{k}"), "bench": "mme", "split": task,
                       "image": f"{task}/{img_name}", "question": None, "label": None, "error": None,
                       "_ref": ("path", str(img)) if img else None}
                if len(parts) < 2 or not parts[0].strip():
                    rec["error"] = f"{task}/{txt.name} line {k + 1}: expected 'question<TAB>Yes|No'"
                else:
                    rec["question"] = parts[0].strip()
                    rec["label"] = parts[1].strip().lower()
                    if rec["label"] not in ("yes", "no"):
                        rec["error"] = f"{task}/{txt.name} line {k + 1}: answer must be Yes/No, got {parts[1]!r}"
                    elif img is None:
                        rec["error"] = f"{task}/{txt.name}: image {stem}.* not found in {idir}"
                records.append(rec)
                sizes[task] = sizes.get(task, 0) + 1
    return Dataset("mme", records, "folder", {"root": str(root), "subtasks": sizes, "n_questions": len(records)})


def _mme_parquet(spec: DataSpec) -> Dataset:
    files = parquet_files(Path(spec.path))
    records, seen, sizes = [], {}, {}
    for f, g, i, row in iter_parquet_rows(files, ["question_id", "question", "answer", "category"]):
        task = row.get("category")
        qid = row.get("question_id")
        lab = row.get("answer")
        rec = {"bench": "mme", "split": task, "image": qid, "question": row.get("question"),
               "label": lab.strip().lower() if isinstance(lab, str) else lab, "error": None,
               "_ref": ("parquet", str(f), g, i)}
        missing = [k for k, v in (("category", task), ("question_id", qid), ("question", rec["question"]),
                                  ("answer", lab)) if not v]
        if missing:
            rec["error"] = f"{f.name} row {i} of group {g}: missing field(s) {missing}"
        elif rec["label"] not in ("yes", "no"):
            rec["error"] = f"{f.name} row {i} of group {g}: answer must be Yes/No, got {lab!r}"
        elif task not in MME_TASKS:
            rec["error"] = f"{f.name} row {i} of group {g}: unknown MME category {task!r}"
        base = f"mme/{task}/{qid if qid else f'{f.stem}:{g}:{i}'}"
        k = seen.get(base + "#", 0)
        seen[base + "#"] = k + 1
        rec["id"] = unique_id(seen, f"{base}#{k}")
        records.append(rec)
        sizes[task] = sizes.get(task, 0) + 1
    return Dataset("mme", records, "parquet", {"files": [str(f) for f in files], "subtasks": sizes,
                                               "n_questions": len(records)})


def _one_line(s: str) -> str:
    return " ".join((s or "").replace("\t", " ").split())


def _score_mme(valid, protocol, out_dir) -> dict:
    from vtoolkit.eval.scorers.mme import MMEItem, score_mme

    by_img: dict[tuple, list] = {}
    for r in valid:
        by_img.setdefault((r["split"], r["image"]), []).append(r)
    tasks: dict[str, list] = {}
    dropped = []
    for (task, img), rs in by_img.items():
        if len(rs) != 2:  # the partner question had an error: the image cannot be scored (acc+ needs both)
            dropped.append(f"{task}/{img}")
            continue
        for r in rs:
            tasks.setdefault(task, []).append(MMEItem(image=str(img).split("/")[-1], question=r["question"],
                                                      gt=r["label"], response=_one_line(r["prediction"])))
    if out_dir is not None:
        d = Path(out_dir) / "mme_results"
        d.mkdir(parents=True, exist_ok=True)
        for task, items in tasks.items():
            (d / f"{task}.txt").write_text("".join(f"{it.image}\t{it.question}\t{it.gt.capitalize()}\t{it.response}\n"
                                                   for it in items), encoding="utf-8")
    res = score_mme(tasks, protocol.scorer_rule).to_dict()
    return {**res, "dropped_images": dropped, "headline": res["perception"] + res["cognition"],
            "headline_name": "MME total (perception + cognition)", "higher_is_better": True}


def mme_cmd(
    results_dir: Path = typer.Option(..., "--results-dir", "-d", help="eval_tool layout: one <subtask>.txt per "
                                     "subtask, lines 'image<TAB>question<TAB>Yes|No<TAB>response'"),
    rule: MMERule = typer.Option(MMERule.official, "--rule", help="official eval_tool | lmms_eval | vlmevalkit "
                                 "(exact matching)"),
    strict: bool = typer.Option(False, "--strict", help="require all 14 subtask files"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """MME acc / acc+ / score per subtask and the Perception (/2000) and Cognition (/800) totals."""
    from vtoolkit.eval.scorers.mme import score_mme_dir

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
