"""lmms-eval plugin: `lmms-eval --model vtoolkit ...` on a local parquet copy of a tiny POPE task, offline."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from vtoolkit.eval import demo_data as dd

REPO = Path(__file__).resolve().parents[1]

TASK_YAML = """dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
task: "pope_vtk_local"
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false}}
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "\\nAnswer the question using a single word or phrase."}}
metadata:
  - version: 0.0
"""


def test_entry_point_payload_registers_the_model():
    from importlib.metadata import entry_points

    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from vtoolkit.eval.lmms_plugin import VToolkitLMM

    (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "vtoolkit"]
    assert ep.value == "vtoolkit.eval.lmms_plugin:manifests"
    reg = ModelRegistryV2()
    for m in reg._coerce_payload_to_manifests(ep.load()):  # what load_entrypoint_manifests does with our payload
        reg.register_manifest(m)
    assert reg.get_model_class("vtoolkit") is VToolkitLMM
    assert reg.get_model_class("vtk") is VToolkitLMM


def test_lmms_eval_cli_runs_offline(tmp_path):
    exe = shutil.which("lmms-eval") or str(Path(sys.executable).parent / "lmms-eval")
    if not Path(exe).exists():
        pytest.skip("lmms-eval console script not installed")
    root = dd.make_pope_parquet(tmp_path / "POPE", n_images=2, splits=("random",))
    task_dir = tmp_path / "tasks" / "pope_vtk_local"
    task_dir.mkdir(parents=True)
    (task_dir / "pope_vtk_local.yaml").write_text(
        TASK_YAML.format(parquet=root / "data" / "test-00000-of-00001.parquet"))
    (task_dir / "utils.py").write_text("from lmms_eval.tasks.pope.utils import *  # noqa\n")
    # PYTHONPATH makes the checkout importable; a sitecustomize registers the plugin when the package is not
    # installed (an installed vtoolkit is found through its `lmms_eval.models` entry point instead)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as md\n"
        "if not [e for e in md.entry_points(group='lmms_eval.models') if e.name == 'vtoolkit']:\n"
        "    import lmms_eval.models, vtoolkit.eval.lmms_plugin as p; p.register()\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    cmd = [exe, "--model", "vtoolkit", "--model_args",
           "pretrained=tiny:llava,method=fastervlm,keep_ratio=0.1,max_new_tokens=3",
           "--tasks", "pope_vtk_local", "--include_path", str(tmp_path / "tasks"), "--batch_size", "2",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400, check=False)
    # lmms-eval 0.7.3 logs a failed evaluation and still exits 0: judge by what it wrote, and by its log
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    res = list((tmp_path / "out").rglob("*_results.json"))
    assert res, p.stderr[-2000:]
    data = json.loads(res[0].read_text())
    r = data["results"]["pope_vtk_local"]
    for key in ("pope_accuracy,none", "pope_f1_score,none"):
        assert isinstance(r[key], (int, float)) and 0.0 <= r[key] <= 1.0, r
    samples = list((tmp_path / "out").rglob("*_samples_pope_vtk_local.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 4
