"""Evaluation demo, fully offline: build tiny POPE / MME / CHAIR folders, evaluate FasterVLM on a tiny LLaVA, run a
small sweep (baseline always included) and write a report.

Run: python examples/eval_sweep_demo.py [--out runs/demo]
The same with the command line (real checkpoints: --model llava-hf/llava-1.5-7b-hf --dtype float16 --device-map auto):
    vtoolkit eval --model tiny:llava --method fastervlm --set keep_ratio=0.25 --bench pope,mme,chair \\
        --data pope=runs/demo/data/pope --data mme=runs/demo/data/MME --data chair=runs/demo/data/coco \\
        --set pope.max_new_tokens=4 --set mme.max_new_tokens=4 --set chair.max_new_tokens=16 \\
        --set chair.n_images=4 --set chair.zero_division=zero --out runs/demo/fastervlm --batch-size 4
    vtoolkit report runs/demo/sweep
Random weights: the answers are noise; the pipeline (files, resume, token counts, latency, report) is the point.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from vtoolkit.eval import demo_data as dd
from vtoolkit.eval.runner import evaluate, load_model, resolve_config
from vtoolkit.eval.sweep import run_sweep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = {"pope": dd.make_pope_json(out / "data" / "pope"), "mme": dd.make_mme_parquet(out / "data" / "MME"),
            "chair": dd.make_coco(out / "data" / "coco")}
    model_and_processor = load_model("tiny:llava")
    # random weights: captions rarely name a COCO object, so CHAIRi is 0 / 0 (undefined); report it as 0
    fast = {"pope": {"max_new_tokens": 4}, "mme": {"max_new_tokens": 4},
            "chair": {"max_new_tokens": 16, "n_images": 4, "zero_division": "zero"}}

    cfg = resolve_config(model="tiny:llava", method="fastervlm", method_options={"keep_ratio": 0.25},
                         benchmarks=["pope", "mme", "chair"], data={k: str(v) for k, v in data.items()},
                         protocol_overrides=fast, batch_size=4)
    run = out / "fastervlm"
    metrics = evaluate(cfg, run, resume=(run / "config.json").exists(), model_and_processor=model_and_processor)
    for bench, m in metrics["benchmarks"].items():
        tokens = (f"visual tokens {m['visual_tokens_before']:.0f} -> {m['visual_tokens_after']:.0f}  "
                  f"latency {m['latency_s'] * 1e3:.1f} ms/sample")
        if m.get("score_error"):   # e.g. CHAIR without NLTK data: predictions are kept, the score says why not
            print(f"{bench}: not scored ({m['score_error'].split(':')[0]}; see {run / 'metrics.json'})  {tokens}")
        else:
            print(f"{bench}: {m['headline_name']} = {m['headline']:.4g}  {tokens}")

    sweep = {"model": "tiny:llava", "benchmarks": ["pope"], "data": {"pope": str(data["pope"])},
             "protocol": {"pope": {"max_new_tokens": 4}}, "batch_size": 4,
             "methods": [{"method": "fastervlm", "grid": {"keep_ratio": [0.25, 0.1, 0.05]}},
                         {"method": "random", "grid": {"keep_ratio": [0.1]}}]}
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    res = run_sweep(path, out=out / "sweep", resume=True, model_and_processor=model_and_processor)
    print(res["report"]["markdown"].read_text())


if __name__ == "__main__":
    main()
