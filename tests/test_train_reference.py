"""examples/train_reference.py (the recipe of the shipped reference model) runs end to end on the CPU at toy size:
both stages, checkpoints, resume, and an export that reloads to identical logits (checked by the script itself)."""
import json

import torch

from conftest import load_example


def _script():
    return load_example("train_reference")


def test_train_reference_runs_checkpoints_resumes_and_exports(tmp_path, capsys):
    mod = _script()
    out = tmp_path / "run"
    small = ["--out", str(out), "--vision-layers", "2", "--text-layers", "1", "--clip-batch", "8", "--lm-batch", "2",
             "--eval-every", "1000", "--save-every", "1", "--threads", "1"]
    torch.manual_seed(0)
    mod.main(small + ["--clip-steps", "2", "--lm-steps", "2"])
    assert (out / "clip" / "ckpt-2").is_dir() and (out / "llava" / "ckpt-2").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and (out / "model" / "model.safetensors").is_file()
    clip_log = [json.loads(x) for x in (out / "clip" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in clip_log if "loss" in r] == [1, 2] and all(r["loss"] > 0 for r in clip_log if "loss" in r)

    capsys.readouterr()
    mod.main(small + ["--clip-steps", "3", "--lm-steps", "3", "--resume"])
    printed = capsys.readouterr().out
    assert "clip: resumed from" in printed and "(step 2)" in printed
    assert (out / "clip" / "ckpt-3").is_dir() and (out / "llava" / "ckpt-3").is_dir()

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.dtype == torch.float32


def test_patch_labels_name_the_class_under_each_patch():
    mod = _script()
    from vtoolkit.data import scenes as S

    scene = S.make_scene(S.TRAIN_SEED, 3)
    labels = mod.patch_labels(scene)
    assert labels.shape == ((S.CANVAS // mod.PATCH) ** 2,)
    covered = S.patch_coverage(scene, S.CANVAS // mod.PATCH) >= 0.5
    assert (labels[torch.from_numpy(covered)] < len(S.CLASSES)).all()            # covered patches name a class
    assert set(labels[labels < len(S.CLASSES)].tolist()) <= {S.CLASSES.index(c) for c in scene.classes}
    assert (labels[torch.from_numpy(S.patch_coverage(scene, S.CANVAS // mod.PATCH) == 0)] == len(S.CLASSES)).all()
