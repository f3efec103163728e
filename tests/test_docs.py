"""The README, examples and configs say what the code does: the methods table equals the registry, the tiny model names
and transformers range are the real ones, the demo data layout is what demo_data writes, the measured command is a
valid `vtoolkit bench` call, nothing points outside the repository, the quickstart refuses unsupported combinations
and the shipped sweeps pass the sweep checks."""
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import vtoolkit as vt
from conftest import load_example
from vtoolkit.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README text under the heading ``## title`` (up to the next ``## ``)."""
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_methods_table_equals_the_registry():
    from vtoolkit.registry import adapter_class_for, supported_model_types

    block = README.split("<!-- methods:begin -->\n")[1].split("<!-- methods:end -->")[0]
    res = CliRunner().invoke(app, ["list", "--markdown"])
    assert res.exit_code == 0
    assert block == res.output, f"README methods table is stale; replace it with `vtoolkit list --markdown`:\n" \
                                f"{res.output}"
    rows = {r.split("|")[1].strip(" `"): r.split("|")[4] for r in block.splitlines()[2:]}
    assert sorted(rows) == sorted(r["name"] for r in vt.list_methods())
    for r in vt.list_methods():
        archs = r["architectures"]
        want = {t for t in supported_model_types()
                if "*" in archs or t in archs or adapter_class_for(t).family in archs}
        assert set(re.findall(r"[a-z0-9_]+", rows[r["name"]].replace("any", ""))) == want, r["name"]


def test_tiny_model_names_and_transformers_range():
    from vtoolkit.compat import MAX_VERSION_EXCLUSIVE, MIN_VERSION
    from vtoolkit.models.tiny import ARCHS

    assert set(re.findall(r"tiny:([a-z0-9_]+)", README)) == set(ARCHS)
    assert f"transformers >= {MIN_VERSION}, < {MAX_VERSION_EXCLUSIVE}" in README


def test_demo_data_layout_is_what_demo_data_writes(tmp_path):
    from vtoolkit.eval import demo_data as dd

    data = tmp_path / "data"   # as the README's make_* calls write them
    dd.make_pope_json(data / "pope")
    dd.make_mme_parquet(data / "MME")
    dd.make_coco(data / "coco")
    block = section("Tiny models and demo data (offline)").split("```text\n")[1].split("```")[0]
    paths = [ln.split()[0] for ln in block.splitlines() if ln.strip() and not ln.startswith(" ")]
    assert len(paths) == 7
    for p in paths:
        assert list(data.glob(p)), f"README lists {p} but demo_data does not write it"


def test_measured_section_is_dated_and_runs_the_bench_command(monkeypatch):
    from vtoolkit.bench import midsize

    text = section("Measured")
    assert "2026-11-22" in text and "issue" not in text.lower()
    commands = re.findall(r"^vtoolkit bench .*$", text, flags=re.M)
    assert len(commands) == 4

    class Built(Exception):
        pass

    def build(**kwargs):
        raise Built

    monkeypatch.setattr(midsize, "build", build)
    for cmd in commands:   # every option exists and every value passes the checks (exit 2 otherwise)
        res = CliRunner().invoke(app, cmd.split()[1:])
        assert res.exit_code == 1 and "error: Built" in res.output, (cmd, res.output)


def test_nothing_points_outside_the_repository():
    files = [REPO / "README.md", *sorted((REPO / "configs").rglob("*.yaml")), *sorted((REPO / "examples").glob("*.py"))]
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/" not in text, f
        for ref in re.findall(r"(?<![\w/])((?:configs|examples|vtoolkit|tests)/[\w/.-]+\.(?:py|yaml|md))", text):
            assert (REPO / ref).exists(), f"{f.name} names {ref}, which is not in the repository"


def _quickstart():
    return load_example("quickstart")


def test_quickstart_refuses_an_unsupported_architecture_before_building(monkeypatch, capsys,
                                                                      vcd_without_qwen3_vl):
    class Built(Exception):
        pass

    def build(arch, *a, **k):
        raise Built(arch)

    monkeypatch.setattr(vt.models.tiny, "build", build)
    qs = _quickstart()
    with pytest.raises(SystemExit) as info:
        qs.main(["--arch", "qwen3_vl", "--method", "vcd"])
    assert info.value.code == 2
    assert ("method 'vcd' does not support 'qwen3_vl' models; it supports internvl, llava, llava_next, "
            "llava_onevision, qwen2_5_vl, qwen2_vl") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qs.main(["--method", "fastervlm", "--set", "keep_ratio=abc"])
    assert "FasterVLMConfig option 'keep_ratio' must be a number or None" in capsys.readouterr().err
    readme_args = re.search(r"python examples/quickstart.py (.*?)`", README).group(1).split()
    with pytest.raises(Built):   # the README's combination passes the checks
        qs.main(readme_args)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_pass_the_sweep_checks(tmp_path, path):
    from vtoolkit.eval import demo_data as dd
    from vtoolkit.eval.sweep import check_sweep, load_sweep

    data = {"pope": str(dd.make_pope_json(tmp_path / "pope", n_images=1))}
    benches = yaml.safe_load(path.read_text()).get("benchmarks", [])
    if "mme" in benches:
        data["mme"] = str(dd.make_mme_parquet(tmp_path / "MME", n_images=1))
    if "chair" in benches:
        data["chair"] = str(dd.make_coco(tmp_path / "coco", n_images=1))
    spec = load_sweep(path, overrides={"model": "tiny:llava", "data": data})
    assert check_sweep(spec, path)[0] == ("none", {}, {})


# ------------------------------------------------------------------------------------- paths the docs and code name
# Files whose docstrings, comments and messages are read: the package, the README, docs/, configs/ and examples/.
def _doc_sources():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "vtoolkit").rglob("*.py")),
            *sorted((REPO / "configs").rglob("*.yaml")), *sorted((REPO / "examples").glob("*.py"))]


# A repository-relative path: starts with a top-level folder of this repository, right after a non-path character
# (so ``src/transformers/examples/x.py`` of an official repository or ``shared/docs/x.md`` is not read as one), and
# ends in a file extension. ``*`` is a glob (``configs/methods/*.yaml``).
REPO_PATH = re.compile(r"(?<![\w/.\-])((?:docs|vtoolkit|configs|examples|tests)/[\w/.*\-]*?\w\.(?:py|md|yaml|yml|json|"
                       r"safetensors|toml|txt))(?![\w/])")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]+")     # an upper-case path component stands for a name the user picks
MODULE_REF = re.compile(r":mod:`~?(vtoolkit(?:\.\w+)+)`")
CITATION = re.compile(r"(?:methods\.md|docs)(?: section| §)? (\d+(?:\.\d+)?)")


def test_every_repository_path_named_in_docstrings_and_docs_exists():
    missing = []
    for f in _doc_sources():
        text = f.read_text(encoding="utf-8")
        rel = f.relative_to(REPO)
        for ref in REPO_PATH.findall(text):
            parts = ref.split("/")
            placeholder = [i for i, q in enumerate(parts) if PLACEHOLDER.fullmatch(q.split(".")[0])]
            if placeholder:              # ``dyvte_routers/NAME.safetensors``: the folder before the placeholder exists
                ok = (REPO / "/".join(parts[:placeholder[0]])).is_dir()
            else:
                ok = bool(list(REPO.glob(ref))) if "*" in ref else (REPO / ref).exists()
            if not ok:
                missing.append(f"{rel} names {ref}")
        for mod in MODULE_REF.findall(text):
            p = REPO / mod.replace(".", "/")
            if not (p.with_suffix(".py").exists() or (p / "__init__.py").exists()):
                missing.append(f"{rel} names the module {mod}")
    assert not missing, "paths that are not in the repository:\n" + "\n".join(missing)


def test_methods_reference_has_every_method_and_every_cited_section():
    text = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))
    cited = {(f.relative_to(REPO), n) for f in _doc_sources() if f.name != "methods.md"
             for n in CITATION.findall(f.read_text(encoding="utf-8"))}
    assert cited, "no citation of docs/methods.md found"
    assert not [c for c in cited if c[1] not in headings], f"cited sections missing from docs/methods.md: " \
        f"{sorted(c for c in cited if c[1] not in headings)}"
    for r in vt.list_methods():                   # every registered method has its entry in the overview table
        assert f"(`{r['name']}`)" in text, r["name"]


# ``shared/`` (the project's working folder next to the repository) is not part of what users get: nothing
# shipped (code, docs, configs, examples) may point there.
def test_nothing_points_at_the_shared_folder():
    bad = []
    for f in _doc_sources():
        rel = f.relative_to(REPO).as_posix()
        for m in re.finditer(r"(?<![\w\-])(?:\.\./)*shared/[\w.\-]+", f.read_text(encoding="utf-8")):
            bad.append(f"{rel}: {m.group(0)}")
    assert not bad, "\n".join(bad)
