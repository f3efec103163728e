"""What a first-time user trips on (issue 18 items 8-9): a run whose model answers every POPE question "No" still
scores; the README's API example runs on ref:shapes as written; the demo-data layout, the demo-reproducing `eval`
command, `score chair --variant synthetic`, no pointer at a `shared/` path, the shipped tiny sweep, the protocol
`source` text and the multi-process command are what the code does."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


# ------------------------------------------------------------------ 9b/9c/9g. what the demo writes, and one row again
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`vtoolkit demo` (run_demo) at a quick size, one setting: FasterVLM keep 25 %."""
    from vtoolkit import demo

    out = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "QUICK", {"pope_images": 4, "mme_images": 1, "chair_images": 2})
        res = demo.run_demo(out, quick=True, progress=False, settings=[("fastervlm", {"keep_ratio": 0.25})],
                            echo=lambda *a: None)
    assert res["ok"], res["rows"]
    return out


def _blocks(text: str, lang: str) -> list[str]:
    return [b.split("```")[0] for b in text.split(f"```{lang}\n")[1:]]


def test_readme_lists_what_vtoolkit_demo_writes(demo_run):
    text = section("Tiny models and demo data (offline)")
    block = next(b for b in _blocks(text, "text") if "runs/demo/" in b)
    paths = [ln.split()[0] for ln in block.splitlines() if ln.strip()]
    assert len(paths) == 9 and all(p.startswith("runs/demo/") for p in paths)
    for p in paths:
        assert list(demo_run.glob(p[len("runs/demo/"):])), f"README lists {p} but vtoolkit demo does not write it"


def test_the_documented_eval_command_reproduces_a_demo_row(demo_run, tmp_path):
    text = section("Tiny models and demo data (offline)")
    cmd = next(b for b in _blocks(text, "bash") if b.startswith("vtoolkit eval")).replace("\\\n", " ")
    args = shlex.split(cmd.replace("runs/demo/", f"{demo_run}/").replace("runs/fastervlm_25", str(tmp_path / "x")))
    res = invoke(*args[1:], "--no-progress")
    assert res.exit_code == 0, res.output
    ours = json.loads((tmp_path / "x" / "metrics.json").read_text())["benchmarks"]
    demo = json.loads((demo_run / "runs" / "fastervlm_keep_ratio=0.25" / "metrics.json").read_text())["benchmarks"]
    assert {b: m["headline"] for b, m in ours.items()} == {b: m["headline"] for b, m in demo.items()}
    assert set(ours) == {"pope", "mme", "chair"}
    import pandas as pd

    row = pd.read_csv(demo_run / "table.csv").set_index("setting").loc["fastervlm keep_ratio=0.25"]
    assert row["pope_f1"] == pytest.approx(ours["pope"]["headline"], abs=1e-12)
    assert row["chair_s"] == pytest.approx(ours["chair"]["headline"], abs=1e-12)
    # 9g: the recorded protocol says what this run used, not only the defaults' origin
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())["protocols"]
    assert cfg["pope"]["source"].endswith("; this run uses instead: max_new_tokens=8")
    assert "scorer_rule='synthetic'" in cfg["chair"]["source"] and "n_images=None" in cfg["chair"]["source"]


def test_protocol_source_reports_the_overrides():
    from vtoolkit.eval.protocol import DEFAULTS, resolve_protocol

    assert resolve_protocol("pope").source == DEFAULTS["pope"].source
    assert resolve_protocol("pope", {"max_new_tokens": 128}).source == DEFAULTS["pope"].source   # not a change
    p = resolve_protocol("mme", {"max_new_tokens": 8, "scorer_rule": "lmms_eval"})
    assert p.source == DEFAULTS["mme"].source + "; this run uses instead: max_new_tokens=8, scorer_rule='lmms_eval'"
    assert resolve_protocol("pope", {"max_new_tokens": 8, "source": "mine"}).source == "mine"


# ------------------------------------------------------------------------------------ 9d. score chair --variant synthetic
def test_score_chair_offers_the_synthetic_rule(tmp_path, monkeypatch):
    import nltk

    from vtoolkit.data import scenes as S
    from vtoolkit.data import synthetic

    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "no_nltk"))   # the synthetic rule needs no NLTK data
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk")])
    root = synthetic.make_chair(tmp_path / "chair", n_images=2)
    inst = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    present = {i: sorted({cats[a["category_id"]] for a in inst["annotations"] if a["image_id"] == i}) for i in (1, 2)}
    absent = next(c for c in S.CLASSES if c not in present[2] and S.PARTNER.get(c) not in present[2])
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": f"A {present[1][0]}."}) + "\n"
                    + json.dumps({"image_id": 2, "caption": f"A {present[2][0]} and a {absent}."}) + "\n")
    res = invoke("score", "chair", "--captions", caps, "--coco-annotations", root / "annotations",
                 "--variant", "synthetic", "--json")
    assert res.exit_code == 0, res.output
    o = json.loads(res.stdout)["overall"]
    assert (o["CHAIRs"], o["CHAIRi"], o["n_mentions"]) == (0.5, pytest.approx(1 / 3), 3)
    res = invoke("score", "chair", "--help")
    assert "synthetic" in res.output


# ------------------------------------------------------------------------------ 9e. nothing points at shared/...
def test_no_doc_config_or_message_points_at_a_shared_folder():
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "configs").rglob("*.yaml")),
             *sorted((REPO / "examples").glob("*.py")), *sorted((REPO / "vtoolkit").rglob("*.py")),
             *sorted((REPO / "vtoolkit").rglob("*.yaml"))]
    bad = [f"{f.relative_to(REPO)}:{i}: {ln.strip()}" for f in files
           for i, ln in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
           if re.search(r"(?<![\w-])shared/", ln)]
    assert not bad, "\n".join(bad)


def test_the_missing_nltk_data_message_names_no_shared_folder(tmp_path, monkeypatch):
    import nltk

    from vtoolkit.eval.scorers import chair as chair_mod

    monkeypatch.setattr(chair_mod, "_BACKENDS", {})
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(chair_mod.ChairResourceError) as ei:
        chair_mod.CHAIR("opera")
    msg = str(ei.value)
    assert "shared" not in msg and "python -m nltk.downloader -d DIR punkt_tab averaged_perceptron_tagger_eng " \
                                   "wordnet" in msg


# ----------------------------------------------------------------- 9f. the tiny sweep says what to run first, then runs
def test_pruning_baselines_tiny_says_what_to_run_first_then_runs(tmp_path, monkeypatch):
    import yaml

    model, proc, _ = tiny_model("llava")
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: (model, proc))
    monkeypatch.chdir(tmp_path)
    sweep = REPO / "configs" / "sweeps" / "pruning_baselines_tiny.yaml"
    prepare = yaml.safe_load(sweep.read_text())["prepare"]
    assert f"#   {prepare}" in sweep.read_text()   # the header comment shows the same command
    res = invoke("sweep", sweep, "--dry-run")
    assert res.exit_code == 2
    assert res.output.splitlines()[-1] == ("error: pruning_baselines_tiny.yaml: its data is written by (run it first, "
                                           f"from the folder you run the sweep in): {prepare}")
    argv = shlex.split(prepare)
    assert argv[0] == "python"
    subprocess.run([sys.executable, *argv[1:]], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    res = invoke("sweep", sweep, "--limit", 2, "--no-progress")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "runs" / "pruning_baselines_tiny").glob("*/metrics.json"))) == 6


# ----------------------------------------------------------------------- 9h. the README's multi-process command
def test_readme_multi_process_command_starts_two_processes_on_cpu(tmp_path):
    text = README[README.index("Several processes: "):]
    cmd = re.search(r"`(accelerate launch [^`]*?) \.\.\.`", text).group(1)
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if not Path(exe).exists():
        pytest.skip("accelerate console script not installed")
    pope = dd.make_pope_json(tmp_path / "pope", n_images=2, splits=("random",), per_image=3)   # 6 samples
    argv = [exe, *shlex.split(cmd)[1:], "--model", "tiny:llava", "--bench", "pope", "--data", str(pope),
            "--set", "pope.max_new_tokens=2", "--out", str(tmp_path / "dp"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("pope: POPE F1") == 1   # rank 0 scores and prints, once
    assert json.loads((tmp_path / "dp" / "config.json").read_text())["world_size"] == 2
