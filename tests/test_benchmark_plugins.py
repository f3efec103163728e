"""Benchmarks as plug-ins (issue 24): the registry, modules that name no benchmark, a third-party benchmark package
installed with pip and run end to end, and text-only records batched with image records."""
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_continuation, tiny_model
from vtoolkit.config import ConfigError
from vtoolkit.eval.benchmark import Benchmark, get_benchmark, list_benchmarks, register_benchmark

GENERIC_MODULES = ["vtoolkit/eval/runner.py", "vtoolkit/eval/sweep.py", "vtoolkit/eval/report.py",
                   "vtoolkit/eval/validate.py", "vtoolkit/eval/cli.py", "vtoolkit/eval/cli_eval.py",
                   "vtoolkit/eval/cli_score.py", "vtoolkit/eval/lmms_plugin.py", "vtoolkit/cli.py",
                   "vtoolkit/eval/datasets.py", "vtoolkit/eval/benchmark.py"]


def test_registry_lists_the_builtins_and_suggests_the_closest_name():
    import vtoolkit.eval

    names = list_benchmarks()
    assert vtoolkit.eval.list_benchmarks() == names
    assert names[:5] == ["pope", "mme", "chair", "hallusionbench", "amber"]
    with pytest.raises(ConfigError, match=r"unknown benchmark 'hallusionbnch'.*did you mean 'hallusionbench'"):
        get_benchmark("hallusionbnch")
    for n in names:
        b = get_benchmark(n)
        assert b.name == n and b.layouts and b.headline and b.default_protocol().bench == n
    with pytest.raises(ValueError, match="already registered"):
        @register_benchmark("pope")
        class Other(Benchmark):
            layouts = ("json",)


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_generic_modules_name_no_benchmark(module):
    """The runner, sweep, report, validation, CLI and lmms-eval plug-in know no benchmark by name: everything that
    differs lives in the benchmark's own module in vtoolkit/eval/benchmarks/."""
    text = (REPO / module).read_text(encoding="utf-8")
    found = [n for n in list_benchmarks() if re.search(rf"\b{re.escape(n)}\b", text, flags=re.IGNORECASE)]
    assert not found, f"{module} names {found}"


def test_list_benchmarks_cli_prints_names_and_metrics():
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    res = CliRunner().invoke(app, ["list", "--benchmarks", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["amber"]["metrics"] == ["accuracy", "existence_f1", "attribute_f1", "relation_f1"]
    assert rows["hallusionbench"]["metrics"][:2] == ["fAcc", "qAcc"] and rows["chair"]["higher_is_better"] is False


# ------------------------------------------------------------------------------------------- a third-party package
_PLUGIN = '''"""A throw-away benchmark: yes/no questions in a JSON Lines file, some without an image."""
import json
from pathlib import Path

from vtoolkit.eval.benchmark import Benchmark, register_benchmark
from vtoolkit.eval.datasets import Dataset, text_only_ref


@register_benchmark("yesnotoy")
class YesNoToy(Benchmark):
    title = "yes/no toy"
    layouts = ("jsonl",)
    defaults = {"post_prompt": " Answer yes or no.", "max_new_tokens": 3, "source": "toy"}
    headline = "accuracy"
    unit = "0-1"
    metrics = (("n_yes", ("n_yes",)),)

    def load(self, spec, layout, protocol):
        path = Path(spec.path)
        recs = []
        for i, line in enumerate(path.read_text().splitlines()):
            o = json.loads(line)
            img = o.get("image")
            recs.append({"id": f"yesnotoy/{i}", "bench": self.name, "split": None, "question": o["q"],
                         "label": o["a"], "image": img, "error": None,
                         "_ref": ("path", str(path.parent / img)) if img else text_only_ref()})
        return Dataset(self.name, recs, layout)

    def score(self, valid, protocol, dataset, out_dir):
        ok = [r["prediction"].strip().lower().startswith(r["label"]) for r in valid]
        return {"headline": sum(ok) / len(ok), "headline_name": "toy accuracy", "higher_is_better": True,
                "n_yes": sum(r["prediction"].strip().lower().startswith("yes") for r in valid)}
'''


def _wheel(path: Path) -> Path:
    """A real wheel (zip + dist-info with RECORD hashes) of the plug-in above, registering the entry point."""
    files = {"vtk_toy_bench.py": _PLUGIN,
             "vtk_toy_bench-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: vtk-toy-bench\nVersion: 0.1\n",
             "vtk_toy_bench-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n",
             "vtk_toy_bench-0.1.dist-info/entry_points.txt": "[vtoolkit.benchmarks]\nyesnotoy = vtk_toy_bench\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("vtk_toy_bench-0.1.dist-info/RECORD,,")
    whl = path / "vtk_toy_bench-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("vtk_toy_bench-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return whl


def test_a_benchmark_from_another_package_runs_end_to_end(tmp_path):
    from vtoolkit.models.tiny import demo_image

    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                          str(site), str(_wheel(tmp_path))], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = tmp_path / "toy"
    data.mkdir()
    demo_image(3, (80, 60)).save(data / "a.png")
    rows = [{"q": "Is there a dog?", "a": "yes", "image": "a.png"}, {"q": "Is water dry?", "a": "no"},
            {"q": "Is there a cat?", "a": "no", "image": "a.png"}]
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    listed = subprocess.run([sys.executable, "-m", "vtoolkit", "list", "--benchmarks", "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "yesnotoy" in [r["name"] for r in json.loads(listed.stdout)]
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "vtoolkit", "eval", "--model", "tiny:llava", "--method", "fastervlm",
                          "--set", "keep_ratio=0.25", "--bench", "yesnotoy", "--data", f"yesnotoy={data / 'q.jsonl'}",
                          "--batch-size", "3", "--out", str(out), "--no-progress"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    m = json.loads((out / "metrics.json").read_text())["benchmarks"]["yesnotoy"]
    assert m["status"] == "scored" and m["n_scored"] == 3 and m["headline_name"] == "toy accuracy"
    preds = [json.loads(x) for x in (out / "predictions" / "yesnotoy.jsonl").read_text().splitlines()]
    assert [p["visual_tokens_after"] for p in preds] == [16, 0, 16] and all(p["batch_size"] == 3 for p in preds)


# ------------------------------------------------------------------------------------------- text-only records
# every method whose defaults need no extra asset (DyVTE needs a trained router; it is exercised by its own tests)
METHODS = {"none": {}, "fastervlm": {"keep_ratio": 0.25}, "random": {"keep_ratio": 0.25},
           "fastv": {"K": 1, "keep_ratio": 0.5}, "var": {"sink_dims": [3, 17]}, "vhr": {}, "vcd": {},
           "damro": {}}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_text_only_rows_batched_with_image_rows_equal_each_alone(arch, method):
    """A row without any image in a batch with image rows: the method leaves it untouched (no visual tokens) and
    every row's greedy tokens equal the row run alone."""
    import vtoolkit as vt
    from vtoolkit.models.tiny import demo_image

    model, proc, adapter = tiny_model(arch)
    images = [demo_image(1, (160, 120)), [], demo_image(2, (120, 120))]
    qs = ["Is there a dog?", "What is the capital of France, in one word?", "Cat?"]
    pad = proc.tokenizer.pad_token_id
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": pad}
    with vt.apply_method(model, method, **METHODS[method]):
        batch = adapter.prepare_inputs(proc, images, qs)
        with torch.no_grad():
            out = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        singles = []
        for im, q in zip(images, qs):
            b1 = adapter.prepare_inputs(proc, [im], [q])
            with torch.no_grad():
                singles.append(model.generate(**b1, **kw)[0, b1["input_ids"].shape[1]:])
    for i, s in enumerate(singles):
        assert_same_continuation(out[i], s, pad, f"{method} on {arch}, row {i}")
    with torch.no_grad():   # the text-only row is the stock model's text-only answer
        b1 = adapter.prepare_inputs(proc, [[]], [qs[1]])
        stock = model.generate(**b1, **kw)[0, b1["input_ids"].shape[1]:]
    assert torch.equal(singles[1], stock), f"{method} changed a row without visual tokens"
