"""Train DyVTE exit routers for a model, then run DyVTE with them: the LLM stays frozen, one small router per layer
learns when the visual tokens may leave (official labelling rule: vtoolkit/train/dyvte.py).

Offline, on the tiny random model, with generated data (the model's own greedy answers to questions on synthetic
images; real data is better):
    python examples/train_dyvte_routers.py --model tiny:llava --out runs/dyvte_tiny
The reference model (``ref:shapes``), on procedural scenes with true answers (``vtoolkit.data.scenes``), shipped:
    python examples/train_dyvte_routers.py --model ref:shapes --scenes 4000 --out runs/dyvte_ref --ship reference
Your checkpoint and LLaVA conversation data (official: the 1 % single-turn subset of LLaVA-mix665k):
    python examples/train_dyvte_routers.py --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 \\
        --data mix665k_single_turn_1pct.json --images DIR --out runs/dyvte_llava7b --router-hidden 2048 --batch-size 16
Data parallel: accelerate launch --multi_gpu --num_processes 8 examples/train_dyvte_routers.py ...
``--ship NAME`` also copies the routers to vtoolkit/methods/dyvte_routers/NAME.safetensors, where
``vt.apply_method(model, "dyvte")`` finds them for this architecture without ``routers=`` (keep them small: a few MB).
The same training is ``vtoolkit train dyvte --model ... --data ... --images ... --out ...``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import vtoolkit as vt
from vtoolkit.eval.runner import load_model
from vtoolkit.methods.dyvte import SHIPPED_DIR
from vtoolkit.train.dyvte import TrainConfig, train

QUESTIONS = ["Is there a dog in the image?", "What color is the largest object?", "Describe this image briefly.",
             "How many objects are there?", "Is there a person in the image?", "What is in the center?",
             "Is the image bright or dark?", "Is there a car?"]


@torch.no_grad()
def make_demo_data(model, processor, root: Path, n: int, answer_tokens: int = 12) -> tuple[Path, Path]:
    """``n`` single-turn conversations on synthetic images, answered by the model itself (greedy)."""
    adapter = vt.models.get_adapter(model)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, n, 8):
        idx = list(range(start, min(n, start + 8)))
        images = [vt.models.tiny.demo_image(i, (120 + 17 * (i % 7), 100 + 23 * (i % 5))) for i in idx]
        qs = [QUESTIONS[i % len(QUESTIONS)] for i in idx]
        batch = adapter.prepare_inputs(processor, images, qs, device=model.device)
        out = model.generate(**batch, max_new_tokens=answer_tokens, do_sample=False)
        answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, im, q, a in zip(idx, images, qs, answers):
            im.save(img_dir / f"{i}.png")
            rows.append({"id": f"demo{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a.strip() or "yes"}]})
    path = root / "conversations.json"
    path.write_text(json.dumps(rows, indent=1))
    return path, img_dir


def make_scene_data(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` single-turn conversations on the procedural training scenes (``vtoolkit.data.scenes``: the data the
    reference model was trained on), one question per scene with its true answer."""
    import numpy as np

    try:
        from vtoolkit.data import scenes as S
    except ImportError:
        raise SystemExit("--scenes needs vtoolkit.data.scenes (shipped with the reference model)") from None
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = S.make_scene(S.TRAIN_SEED, i)
        (q, a), = S.training_turns(scene, rng, n=1)
        S.render(scene).save(img_dir / f"{i}.png")
        rows.append({"id": f"scene{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    path = root / "conversations.json"
    path.write_text(json.dumps(rows, indent=1))
    return path, img_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:llava", help="checkpoint path / hub id, or tiny:<arch>")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data", help="LLaVA conversation JSON; omitted: generated demo data")
    ap.add_argument("--images", help="folder of the data's images")
    ap.add_argument("--demo-samples", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=0, help="train on N procedural scenes (vtoolkit.data.scenes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--router-hidden", type=int, default=64, help="official 2048; small routers for small models")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="official 6e-5 (2048-wide routers, 1 epoch of 6.6k rows)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", metavar="NAME", help="copy the routers into vtoolkit/methods/dyvte_routers/NAME.safetensors")
    args = ap.parse_args(argv)

    out = Path(args.out)
    model, processor = load_model(args.model, dtype=args.dtype)
    if args.scenes:
        data, images = make_scene_data(out / "scene_data", args.scenes, args.seed)
    elif args.data is None:
        data, images = make_demo_data(model, processor, out / "demo_data", args.demo_samples)
    else:
        if args.images is None:
            ap.error("--data needs --images")
        data, images = Path(args.data), Path(args.images)
    cfg = TrainConfig(model=args.model, data=str(data), images=str(images), out=str(out),
                      router_hidden=args.router_hidden, batch_size=args.batch_size, epochs=args.epochs,
                      max_steps=args.max_steps, lr=args.lr, save_every=args.save_every, resume=args.resume,
                      seed=args.seed)
    t0 = time.perf_counter()
    res = train(cfg, model, processor)
    wall = time.perf_counter() - t0
    if not res.main_process:
        return
    losses = [r["loss"] for r in res.log if r["loss"] is not None]
    q = max(1, len(losses) // 4)
    print(f"trained {res.steps} steps in {wall:.1f} s; loss first quarter {sum(losses[:q]) / q:.4f} -> last quarter "
          f"{sum(losses[-q:]) / q:.4f}; exit labels {sum(r.get('exit_rate', 0) * r['n'] for r in res.log):.0f} of "
          f"{sum(r['n'] for r in res.log)}")
    print(f"routers: {res.routers_path} ({Path(res.routers_path).stat().st_size / 1e6:.2f} MB)")

    adapter = vt.models.get_adapter(model)
    imgs = [vt.models.tiny.demo_image(100 + i, (150, 110)) for i in range(4)]
    batch = adapter.prepare_inputs(processor, imgs, QUESTIONS[:4], device=model.device)
    gen = dict(max_new_tokens=12, do_sample=False)
    with torch.inference_mode():
        base = model.generate(**batch, **gen)
        with vt.apply_method(model, "dyvte", routers=res.routers_path) as h:
            out_ids = model.generate(**batch, **gen)
            stats = h.stats
    n = batch["input_ids"].shape[1]
    agree = (base[:, n:] == out_ids[:, n:]).float().mean().item()
    print(f"dyvte on 4 held-out prompts: exit layers {stats['exit_layer']}, visual tokens removed "
          f"{stats['visual_tokens_removed']}, LLM prefill FLOPs saved {[f'{f:.3g}' for f in stats['flops_saved']]}; "
          f"token agreement with the baseline {agree:.0%}")
    if args.ship:
        SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
        dest = SHIPPED_DIR / f"{args.ship}.safetensors"
        shutil.copyfile(res.routers_path, dest)
        print(f"shipped: {dest} (apply_method(model, 'dyvte') now finds it for this architecture)")


if __name__ == "__main__":
    main()
