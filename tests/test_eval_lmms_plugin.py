"""lmms-eval plugin: `lmms-eval --model vtoolkit ...` on a local parquet copy of a tiny POPE task, offline."""
import json
import os
import re
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


def _lmms_eval_exe() -> str:
    exe = shutil.which("lmms-eval") or str(Path(sys.executable).parent / "lmms-eval")
    if not Path(exe).exists():
        pytest.skip("lmms-eval console script not installed")
    return exe


def _local_task(tmp_path, utils: str = "from lmms_eval.tasks.pope.utils import *  # noqa\n") -> Path:
    root = dd.make_pope_parquet(tmp_path / "POPE", n_images=2, splits=("random",))
    task_dir = tmp_path / "tasks" / "pope_vtk_local"
    task_dir.mkdir(parents=True)
    (task_dir / "pope_vtk_local.yaml").write_text(
        TASK_YAML.format(parquet=root / "data" / "test-00000-of-00001.parquet"))
    (task_dir / "utils.py").write_text(utils)
    return tmp_path / "tasks"


def _env(tmp_path) -> dict:
    # PYTHONPATH makes the checkout importable; a sitecustomize registers the plugin when the package is not
    # installed (an installed vtoolkit is found through its `lmms_eval.models` entry point instead)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as md\n"
        "if not [e for e in md.entry_points(group='lmms_eval.models') if e.name == 'vtoolkit']:\n"
        "    import lmms_eval.models, vtoolkit.eval.lmms_plugin as p; p.register()\n")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(site), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}


def test_lmms_eval_cli_runs_offline(tmp_path):
    """A composition (method=a+b) with a list option (layers=0;1) through lmms-eval's own CLI."""
    exe = _lmms_eval_exe()
    tasks = _local_task(tmp_path)
    cmd = [exe, "--model", "vtoolkit", "--model_args",
           "pretrained=tiny:llava,method=fastervlm+vhr,keep_ratio=0.1,layers=0;1,max_new_tokens=3",
           "--tasks", "pope_vtk_local", "--include_path", str(tasks), "--batch_size", "2",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    p = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=400,
                       check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    assert ("vtoolkit lmms-eval plugin: tiny:llava: applied fastervlm(keep_ratio=0.1) + vhr(layers=[0, 1])"
            in p.stderr), p.stderr[-3000:]
    res = list((tmp_path / "out").rglob("*_results.json"))
    assert res, p.stderr[-2000:]
    data = json.loads(res[0].read_text())
    r = data["results"]["pope_vtk_local"]
    for key in ("pope_accuracy,none", "pope_f1_score,none"):
        assert isinstance(r[key], (int, float)) and 0.0 <= r[key] <= 1.0, r
    samples = list((tmp_path / "out").rglob("*_samples_pope_vtk_local.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 4


def test_a_plugin_setting_error_exits_2_through_lmms_eval_cli(tmp_path):
    """lmms-eval 0.7.3 catches every Exception of an evaluation, logs it and exits 0; the plugin's error exits 2
    with one `error:` line, before the model is loaded."""
    exe = _lmms_eval_exe()
    tasks = _local_task(tmp_path)
    cmd = [exe, "--model", "vtoolkit", "--model_args", "pretrained=tiny:llava,method=fastervlm+vhr,keep_ratio=abc",
           "--tasks", "pope_vtk_local", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=400,
                       check=False)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert ("error: vtoolkit lmms-eval plugin: ConfigTypeError: FasterVLMConfig option 'keep_ratio' must be a number "
            "or None, got str 'abc'") in p.stderr.splitlines(), p.stderr[-3000:]
    assert "applied" not in p.stderr and not list((tmp_path / "out").rglob("*_results.json"))


def test_a_request_error_exits_1_under_cli_evaluate(tmp_path, monkeypatch, capsys):
    """The function lmms-eval's console script runs (`cli_evaluate`), in this process: a request that fails (an
    image file that does not exist) exits 1 instead of lmms-eval's 0."""
    from lmms_eval.__main__ import cli_evaluate

    from vtoolkit.eval import lmms_plugin

    lmms_plugin.register()
    tasks = _local_task(tmp_path, "from lmms_eval.tasks.pope.utils import *  # noqa\n"
                                  "def pope_doc_to_visual(doc):\n    return ['/nonexistent/x.jpg']\n")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("VERBOSITY", "INFO")   # cli_evaluate sets it; restored after the test
    monkeypatch.setattr(sys, "argv", ["lmms-eval", "--model", "vtoolkit", "--model_args",
                                      "pretrained=tiny:llava,max_new_tokens=2", "--tasks", "pope_vtk_local",
                                      "--include_path", str(tasks), "--output_path", str(tmp_path / "out")])
    from lmms_eval.utils import eval_logger

    try:
        with pytest.raises(lmms_plugin.PluginExit) as info:
            cli_evaluate()
    finally:   # cli_evaluate pointed lmms-eval's logger at this test's captured stdout
        eval_logger.remove()
        eval_logger.add(sys.stderr)
    assert info.value.code == 1
    assert isinstance(info.value.__cause__, FileNotFoundError)
    err = capsys.readouterr().err
    assert "error: vtoolkit lmms-eval plugin: FileNotFoundError:" in err and "/nonexistent/x.jpg" in err


def test_model_args_values_compose_and_lists():
    from vtoolkit.config import ConfigError
    from vtoolkit.eval.lmms_plugin import resolve_methods

    assert resolve_methods("fastervlm", {"keep_ratio": 0.1}) == ("fastervlm", {"keep_ratio": 0.1})
    assert resolve_methods("var", {"sink_dims": "0;1;2"}) == ("var", {"sink_dims": [0, 1, 2]})
    assert resolve_methods("var", {"sink_dims": "[0,1,2]"}) == ("var", {"sink_dims": [0, 1, 2]})
    assert resolve_methods("var", {"sink_dims": "'5;'"}) == ("var", {"sink_dims": [5]})
    assert resolve_methods("fastervlm+vhr", {"keep_ratio": 0.1, "vhr.alpha": 3}) == [
        ("fastervlm", {"keep_ratio": 0.1}), ("vhr", {"alpha": 3})]
    assert resolve_methods(str(REPO / "configs" / "methods" / "fastervlm.yaml") + "+vhr", {})[1] == ("vhr", {})
    for method, opts, msg in [
        ("fastervlm+vhr", {"bogus": 1}, "option 'bogus' is not an option of any composed method (fastervlm, vhr)"),
        ("fastervlm+", {}, "write one method name, or several joined by '+'"),
        ("fastervlm+vhr", {"damro.alpha": 1}, "'damro' is not one of the composed methods (fastervlm, vhr)"),
        ("vhr+vhr", {}, "names the same method twice"),
        ("fastervlm+random", {}, "both prune visual tokens"),
        ("var", {"sink_dims": "[0,1"}, "is not valid JSON/YAML"),
    ]:
        with pytest.raises((ConfigError, ValueError), match=re.escape(msg)):
            resolve_methods(method, opts)


def test_outside_lmms_eval_cli_the_original_error_is_raised():
    """Called from Python (simple_evaluate), a bad option is the plain ConfigError, not an exit."""
    from vtoolkit.config import ConfigTypeError
    from vtoolkit.eval.lmms_plugin import VToolkitLMM

    with pytest.raises(ConfigTypeError, match="keep_ratio"):
        VToolkitLMM(pretrained="tiny:llava", method="fastervlm", keep_ratio="abc")
