"""What a first-time user trips on (issue 18 items 8-9): a run whose model answers every POPE question "No" still
scores; the README's API example runs on ref:shapes as written; the demo-data layout, the demo-reproducing `eval`
command, `score chair --variant synthetic`, no pointer at a `shared/` path, the shipped tiny sweep, the protocol
`source` text and the multi-process command are what the code does."""
import json
import re
from pathlib import Path

from typer.testing import CliRunner

from conftest import tiny_model
from vtoolkit.cli import app
from vtoolkit.eval import demo_data as dd
from vtoolkit.eval import runner

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


# ------------------------------------------------------------------------------------- 8. every POPE answer "No"
def test_a_run_answering_every_pope_question_no_scores_and_reports_precision_undefined(tmp_path, monkeypatch):
    model, proc, _ = tiny_model("llava")
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: (model, proc))
    real = runner._generate

    def always_no(*a, **k):
        texts, extra, dt = real(*a, **k)
        return ["No"] * len(texts), extra, dt

    monkeypatch.setattr(runner, "_generate", always_no)
    pope = dd.make_pope_json(tmp_path / "pope", n_images=2)
    res = invoke("eval", "--model", "tiny:llava", "--data", f"pope={pope}", "--out", tmp_path / "run",
                 "--set", "pope.max_new_tokens=2", "--no-progress")
    assert res.exit_code == 0, res.output
    note = "undefined: in split(s) coco_pope_popular, coco_pope_random, no 'yes' answers (TP + FP = 0)"
    assert f"pope: POPE F1 (mean over splits) = {note}" in res.output
    assert f"warning: pope: POPE F1 (mean over splits) {note}" in res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["benchmarks"]["pope"]
    assert m["status"] == "scored" and m["headline"] is None and m["headline_note"] == note
    assert m["average"]["accuracy"] == 0.5 and m["average"]["precision"] is None
    res = invoke("report", tmp_path / "run", "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    assert "n/a (in split(s) coco_pope_popular, coco_pope_random, no 'yes' answers (TP + FP = 0))" in (
        tmp_path / "rep" / "report.md").read_text()


# ------------------------------------------------------------------------------------- 9a. the README's API example
def test_readme_api_example_runs_on_ref_shapes_as_written_and_prints_what_it_says(capsys):
    import vtoolkit as vt

    text = section("Python API")
    code = text.split("```python\n")[1].split("```")[0]
    said = re.search(r"It prints `(\[.*?\])`", text).group(1)
    assert "vt.models.reference.load()" in code and "Answer the question using a single word or phrase." in code
    from vtoolkit.eval.protocol import LLAVA_SHORT_ANSWER

    assert repr(LLAVA_SHORT_ANSWER)[1:-1] in code   # the suffix the harness (and the training) uses
    scope: dict = {}
    try:
        exec(compile(code, "README.md: Python API", "exec"), scope)
    finally:
        if "model" in scope:
            for h in vt.active_handles(scope["model"]):
                h.remove()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [said]
    assert eval(said)[0] == "Yes"   # img1 shows two red hearts
    assert scope["h"].active is False and not vt.active_handles(scope["model"])
