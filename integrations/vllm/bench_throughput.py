"""Throughput of pre-LLM pruning served by vLLM, against the HF path and the analytic FLOPs bound, in one run.

    VTOOLKIT_PYTHON=/work/venv/bin/python .venv-vllm/bin/python integrations/vllm/bench_throughput.py \\
        --requests 8 --max-tokens 1 --rounds 2

Runs with the vLLM venv's python; the HF side runs in vtoolkit's environment (``VTOOLKIT_PYTHON``, a subprocess of
this same file with ``--hf-side``), which also writes the model once:

1. HF side: the mid-size random model of ``vtoolkit bench --shape midsize`` (CLIP-L/336 tower + a 16 x 2048 Llama,
   ``vtoolkit.bench.midsize.build``; ``--shape tiny`` for smoke runs) saved with ``save_pretrained`` (CLIP keys
   renamed to vLLM's ``vision_tower.vision_model.*``, as the plugin tests do), N images of 336 x 336 and one
   question; then ``model.generate`` on the batch of N requests, unpruned and under
   ``vt.apply_method(model, "fastervlm", keep_ratio=r)``, interleaved per round; and the analytic prefill FLOPs
   (``vtoolkit.bench.flops``) of both prompts.
2. vLLM side: two engines on the saved model, one stock and one with ``hf_overrides={"vtoolkit": {"method":
   "fastervlm", "keep_ratio": r}}``, both alive at once (each engine core in its own process), one warm-up
   ``LLM.generate`` each, then ``--rounds`` interleaved rounds of ``LLM.generate`` over the N requests, each round
   on N images neither engine has seen (vLLM's encoder cache keeps encoder outputs by image hash, so a repeated
   image would skip the ViT; ``--same-images`` measures that case).

Throughput = N / wall time of one ``generate`` over the N requests (requests/s) and prompt tokens / that time
(prompt tokens/s: the pruned engine's prompts are shorter). Ratio = pruned / unpruned requests/s (median of the
per-round ratios). Bounds (unpruned / pruned FLOPs = the largest speed-up pruning can give when time follows FLOPs):
``llm`` counts the LLM prefill only (+ one lm_head row); ``vit+llm`` adds the vision tower, which pruning does not
shrink (it runs on all 576 patches; vLLM truncates CLIP at the feature layer -2, HF runs all its layers) and the
projector (vLLM projects the kept tokens only, HF all). Target: vLLM ratio >= 0.8 x bound.

vLLM engine settings: ``enforce_eager=True`` (no torch.compile: its compile time on 2 cores exceeds the run),
``enable_prefix_caching=False`` (rounds repeat the same requests; a cache hit would skip their prefill),
``max_num_seqs=N``, ``max_num_batched_tokens`` >= N x the unpruned prompt (every round is one prefill step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUESTION = "Describe this image in detail, please."
TARGET = 0.8


# -- table (pure: the smoke test checks it) -------------------------------------------------------------------------
def summarize(times: dict[str, list[float]], prompt_tokens: dict[str, int], n: int) -> dict:
    """Per engine: median seconds, requests/s and prompt tokens/s over the rounds; ratio = median of the per-round
    pruned / unpruned throughput ratios (= unpruned time / pruned time of the same round)."""
    out = {}
    for k in ("unpruned", "pruned"):
        t = statistics.median(times[k])
        out[k] = {"seconds": t, "req_s": n / t, "tok_s": prompt_tokens[k] / t, "prompt_tokens": prompt_tokens[k]}
    per_round = [u / p for u, p in zip(times["unpruned"], times["pruned"])]
    out["ratio"] = statistics.median(per_round)
    out["ratios"] = per_round
    return out


def format_table(results: dict[str, dict], bounds: dict[str, float], target: float = TARGET) -> str:
    """``results``: engine name -> ``summarize(...)``; ``bounds``: name -> unpruned / pruned FLOPs."""
    lines = ["| engine | unpruned req/s | pruned req/s | unpruned prompt tok/s | pruned prompt tok/s | "
             "ratio pruned/unpruned (rounds) |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {name} | {r['unpruned']['req_s']:.3f} | {r['pruned']['req_s']:.3f} | "
                     f"{r['unpruned']['tok_s']:.1f} | {r['pruned']['tok_s']:.1f} | {r['ratio']:.2f} ({rounds}) |")
    lines += ["", "| bound (unpruned/pruned FLOPs) | value | target 0.8 x bound | vLLM ratio / bound | met |",
              "| --- | ---: | ---: | ---: | --- |"]
    v = results.get("vLLM", {}).get("ratio")
    for name, b in bounds.items():
        frac = "" if v is None else f"{v / b:.2f}"
        met = "" if v is None else ("yes" if v >= target * b else "no")
        lines.append(f"| {name} | {b:.2f} | {target * b:.2f} | {frac} | {met} |")
    return "\n".join(lines)


# -- HF side (vtoolkit's environment) -------------------------------------------------------------------------------
def _save_for_vllm(model, proc, d: Path) -> None:
    """``save_pretrained`` with the CLIP keys where vLLM's LLaVA loads them (``hf_reference.clip_key``)."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(HERE / "tests"))
    from hf_reference import clip_key

    model.save_pretrained(d)
    for f in d.glob("*.safetensors"):
        sd = load_file(f)
        save_file({clip_key(k): v for k, v in sd.items()}, f, metadata={"format": "pt"})
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        j = json.loads(idx.read_text())
        j["weight_map"] = {clip_key(k): v for k, v in j["weight_map"].items()}
        idx.write_text(json.dumps(j))
    proc.save_pretrained(d)


def _bounds(model, full_len: int, n_vis: int, kept: int) -> dict[str, float]:
    from dataclasses import replace

    from vtoolkit.bench import flops

    s = flops.Shape.from_model(model)
    kept_len = full_len - n_vis + kept

    def llm(n):
        return s.llm_layers * flops.llm_layer_flops(n, n, s.hidden, s.kv_hidden, s.mlp) + 2 * s.hidden * s.vocab

    def proj(n):
        return 2 * n * (s.vision_hidden * s.hidden + s.hidden * s.hidden)

    vit_hf = flops.vision_flops(s)
    vit_vllm = flops.vision_flops(replace(s, vision_layers=s.vision_layers - 1))   # truncated at layer -2
    return {
        "llm prefill only": llm(full_len) / llm(kept_len),
        "vit+llm (vLLM: ViT to layer -2, projector on kept)":
            (vit_vllm + proj(n_vis) + llm(full_len)) / (vit_vllm + proj(kept) + llm(kept_len)),
        "vit+llm (HF: all ViT layers, projector on all)":
            flops.prefill_flops(s, full_len) / flops.prefill_flops(s, full_len, kept_len),
        "_flops": {"vit_hf": vit_hf, "vit_vllm": vit_vllm, "llm_full": llm(full_len), "llm_kept": llm(kept_len),
                   "proj_full": proj(n_vis), "proj_kept": proj(kept)},
    }


def hf_side(args) -> None:
    import torch

    import vtoolkit as vt
    import vtoolkit_core
    from vtoolkit.bench import midsize
    from vtoolkit.models import get_adapter, tiny

    work = Path(args.hf_side)
    d = work / "model"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, proc = midsize.tiny_shape() if args.shape == "tiny" else midsize.build()
    size = model.config.vision_config.image_size
    if not (d / "config.json").exists():
        _save_for_vllm(model, proc, d)
    print(f"[hf] model built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
    images = []     # one set of N per vLLM generate call (warm-up + rounds): see vllm_side
    for i in range(args.requests * args.image_sets):
        p = work / f"image{i}.png"
        if not p.exists():
            tiny.demo_image(i, (size, size)).save(p)
        images.append(str(p))
    a = get_adapter(model)
    from PIL import Image

    pil = [Image.open(p).convert("RGB") for p in images[:args.requests]]
    inputs = a.prepare_inputs(proc, pil, [QUESTION] * args.requests)
    full_len = int(inputs["input_ids"].shape[1])
    n_vis = int((inputs["input_ids"][0] == a.image_token_id).sum())
    kept = vtoolkit_core.budget(n_vis, args.keep_ratio, None, "an image")
    gen = {"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens, "do_sample": False}
    times = {"unpruned": [], "pruned": []}

    def run(pruned: bool) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            if pruned:
                with vt.apply_method(model, "fastervlm", keep_ratio=args.keep_ratio):
                    model.generate(**inputs, **gen)
            else:
                model.generate(**inputs, **gen)
        return time.perf_counter() - t

    if args.hf_rounds:
        one = {k: v[:1] for k, v in inputs.items()}
        with torch.no_grad():   # warm-up on one request each way
            model.generate(**one, **gen)
            with vt.apply_method(model, "fastervlm", keep_ratio=args.keep_ratio):
                model.generate(**one, **gen)
    for r in range(args.hf_rounds):
        order = ("unpruned", "pruned") if r % 2 == 0 else ("pruned", "unpruned")
        for k in order:
            times[k].append(run(k == "pruned"))
        print(f"[hf] round {r}: unpruned {times['unpruned'][-1]:.2f} s, pruned {times['pruned'][-1]:.2f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    bounds = _bounds(model, full_len, n_vis, kept)
    (work / "hf.json").write_text(json.dumps({
        "images": images, "prompt": a.format_prompt(proc, QUESTION), "full_len": full_len, "n_vis": n_vis,
        "kept": kept, "times": times, "bounds": bounds, "dtype": str(next(model.parameters()).dtype),
        "loadavg": os.getloadavg()}))


# -- vLLM side ------------------------------------------------------------------------------------------------------
def _engine(d: Path, vtoolkit, args, max_len: int):
    from vllm import LLM

    return LLM(model=str(d), dtype=args.dtype, max_model_len=max_len, enforce_eager=True, seed=0,
               limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False,
               max_num_seqs=args.requests, max_num_batched_tokens=max(2048, args.requests * max_len),
               hf_overrides={} if vtoolkit is None else {"vtoolkit": vtoolkit})


def vllm_side(args, work: Path, hf: dict) -> dict:
    from PIL import Image
    from vllm import SamplingParams

    n = args.requests
    sets = 1 if args.same_images else 1 + args.rounds

    def reqs(i: int) -> list[dict]:
        """Set ``i`` of N requests: a fresh set per call unless ``--same-images`` (each engine's encoder cache keeps
        the encoder outputs of images it has seen, keyed by their hash, so a repeated image skips the ViT)."""
        ps = hf["images"][(i % sets) * n:(i % sets + 1) * n]
        return [{"prompt": hf["prompt"], "multi_modal_data": {"image": Image.open(p).convert("RGB")}} for p in ps]

    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    max_len = hf["full_len"] + args.max_tokens + 16
    t0 = time.perf_counter()
    llms = {"unpruned": _engine(work / "model", None, args, max_len),
            "pruned": _engine(work / "model", {"method": "fastervlm", "keep_ratio": args.keep_ratio}, args, max_len)}
    print(f"[vllm] two engines up in {time.perf_counter() - t0:.0f} s", flush=True)
    prompt_tokens = {}
    for k, llm in llms.items():    # warm-up: the whole batch once (first-call allocations, oneDNN primitives)
        outs = llm.generate(reqs(0), sp, use_tqdm=False)
        prompt_tokens[k] = sum(len(o.prompt_token_ids) for o in outs)
    times = {"unpruned": [], "pruned": []}
    for r in range(args.rounds):
        order = ("unpruned", "pruned") if r % 2 == 0 else ("pruned", "unpruned")
        batch = reqs(1 + r)       # loaded before the clock starts; the same set for both engines
        for k in order:
            t = time.perf_counter()
            llms[k].generate(batch, sp, use_tqdm=False)
            times[k].append(time.perf_counter() - t)
        print(f"[vllm] round {r}: unpruned {times['unpruned'][-1]:.2f} s, pruned {times['pruned'][-1]:.2f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    for llm in llms.values():
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    return {"times": times, "prompt_tokens": prompt_tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="N requests per generate call (default 8)")
    ap.add_argument("--max-tokens", type=int, default=1, help="new tokens per request (default 1: prefill-bound)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved vLLM rounds (default 3)")
    ap.add_argument("--hf-rounds", type=int, default=2, help="interleaved HF rounds (default 2; 0 skips the HF timing)")
    ap.add_argument("--keep-ratio", type=float, default=0.1, help="fastervlm keep ratio (default 0.1: 58 of 576)")
    ap.add_argument("--shape", choices=("midsize", "tiny"), default="midsize")
    ap.add_argument("--dtype", default="bfloat16", help="vLLM dtype (default bfloat16, the midsize model's)")
    ap.add_argument("--workdir", help="keep the saved model and images here (reused when present); default a temp dir")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--same-images", action="store_true",
                    help="reuse the warm-up's images in every round: vLLM's encoder cache then skips the ViT")
    ap.add_argument("--hf-side", help=argparse.SUPPRESS)
    ap.add_argument("--image-sets", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.max_tokens < 1:
        ap.error("--requests, --rounds and --max-tokens must be >= 1")
    if args.hf_side:
        hf_side(args)
        return 0
    for k, v in {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="vtk_vllm_bench_")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    py = os.environ.get("VTOOLKIT_PYTHON") or next(
        (p for p in (str(ROOT / ".venv-ci/bin/python"), "/work/venv/bin/python") if Path(p).exists()), None)
    if py is None:
        ap.error("set VTOOLKIT_PYTHON to a python with vtoolkit installed (the HF side)")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    subprocess.run([py, __file__, "--hf-side", str(work), "--requests", str(args.requests), "--max-tokens",
                    str(args.max_tokens), "--hf-rounds", str(args.hf_rounds), "--keep-ratio", str(args.keep_ratio),
                    "--shape", args.shape, "--image-sets", str(1 if args.same_images else 1 + args.rounds)],
                   check=True, env=env)
    hf = json.loads((work / "hf.json").read_text())
    v = vllm_side(args, work, hf)
    results = {"vLLM": summarize(v["times"], v["prompt_tokens"], args.requests)}
    if args.hf_rounds:
        hf_tokens = {"unpruned": args.requests * hf["full_len"],
                     "pruned": args.requests * (hf["full_len"] - hf["n_vis"] + hf["kept"])}
        results["HF generate"] = summarize(hf["times"], hf_tokens, args.requests)
    bounds = {k: b for k, b in hf["bounds"].items() if not k.startswith("_")}
    load1 = os.getloadavg()
    print(f"\n{args.shape} model ({hf['dtype']} HF, vLLM {args.dtype}), fastervlm keep {hf['kept']} of {hf['n_vis']}, "
          f"N={args.requests} requests ({'the same' if args.same_images else 'fresh'} images each round), "
          f"max_tokens={args.max_tokens}, prompt {hf['full_len']} -> "
          f"{hf['full_len'] - hf['n_vis'] + hf['kept']} tokens (vLLM: {v['prompt_tokens']['unpruned'] // args.requests}"
          f" -> {v['prompt_tokens']['pruned'] // args.requests}); {os.cpu_count()} CPUs, load average "
          f"{load0[0]:.1f} at start, {load1[0]:.1f} at end; {time.perf_counter() - t0:.0f} s in all\n")
    print(format_table(results, bounds))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "bounds": hf["bounds"], "load": [load0, load1],
                                               "hf_load_end": hf["loadavg"], "args": vars(args)}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
