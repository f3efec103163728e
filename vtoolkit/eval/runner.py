"""The evaluation runner: batched generation with a method applied, streamed predictions, resume, sharding, scoring.

Run folder (``RUN_DIR``)::

    config.json            the resolved config: model, method + every option (defaults included), protocols, data,
                           batch size, limit, world size
    env.json               python / torch / transformers / vtoolkit versions, git hash (+ dirty flag), host, device
    predictions/<bench>.jsonl   one JSON object per sample, in dataset order once the run is complete
    metrics.json           scores per benchmark + a summary (visual tokens kept, latency, errors)
    mme_results/<task>.txt      MME answers in the official eval-tool format (image, question, GT, response)
    chair_captions.jsonl        CHAIR captions in the OPERA / Maxlinn format ({"image_id", "caption"})

Nothing is lost:

- predictions are appended and flushed after every batch; ``resume=True`` reads what is there (a truncated last line
  from a crash is cut off), skips the sample ids already done and continues, so an interrupted + resumed run has
  exactly the rows of an uninterrupted one (no duplicate, no gap), rewritten in dataset order at the end;
- a bad row (missing field, unreadable image, a sample whose generation raises) gets a row with ``error`` set and
  ``prediction: null``; scores are computed over the valid rows and ``metrics.json`` says how many were left out;
- ``resume`` refuses to mix runs: the saved config must match (model, method options, protocols, data, limit).

Data parallel: with ``WORLD_SIZE`` > 1 (``accelerate launch``, ``torchrun``, or the env vars by hand) rank r takes the
samples ``i % world == r`` and streams to ``predictions/<bench>.rank<r>.jsonl``; rank 0 waits until every sample id
is present in some file, merges them into ``predictions/<bench>.jsonl`` in dataset order, and scores.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vtoolkit.eval.datasets import Dataset, load_dataset, open_image, public_record
from vtoolkit.eval.protocol import BENCHMARKS, Protocol, resolve_protocol

__all__ = [
    "EvalConfig",
    "RunInterrupted",
    "dist_info",
    "env_info",
    "evaluate",
    "load_model",
    "read_predictions",
    "run_benchmark",
    "score_benchmark",
]


class RunInterrupted(RuntimeError):
    """Raised by the test hook ``fail_after_batches`` to simulate a crash."""


# ------------------------------------------------------------------------------------------------------ model
def load_model(spec: str, *, dtype: str = "auto", device_map: str | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False, seed: int = 0):
    """``tiny:<arch>`` -> :func:`vtoolkit.models.tiny.build`; anything else -> ``AutoModelForImageTextToText`` +
    ``AutoProcessor`` from a local path or hub id, ``ref:shapes`` being the reference model shipped in the package
    (:mod:`vtoolkit.models.reference`) (``dtype``: auto|float16|bfloat16|float32; ``device_map``: e.g. ``auto``,
    ``cuda:0``, ``cpu``)."""
    import torch

    if spec.startswith("tiny:"):
        from vtoolkit.models import tiny

        td = torch.float32 if dtype in ("auto", None) else getattr(torch, dtype)
        model, proc = tiny.build(spec.split(":", 1)[1], seed=seed, dtype=td)
        return model, proc
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtoolkit.models.reference import resolve as resolve_reference

    spec = resolve_reference(spec)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype in ("auto", None) else getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs).eval()
    proc = AutoProcessor.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if getattr(proc, "tokenizer", None) is not None:
        proc.tokenizer.padding_side = "left"
    if not device_map:
        r = dist_info()
        if torch.cuda.is_available():
            model.to(f"cuda:{r['local_rank']}")
    return model, proc


def _model_device(model):
    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    return next(model.parameters()).device  # pragma: no cover


# ------------------------------------------------------------------------------------------------------ env
def _git_info() -> dict:
    root = Path(__file__).resolve().parents[2]
    out: dict[str, Any] = {"root": str(root)}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False,
                                       timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=False).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        out["commit"], out["dirty"] = None, None
    return out


def env_info() -> dict:
    import torch
    import transformers

    import vtoolkit

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "vtoolkit": vtoolkit.__version__, "platform": platform.platform(), "git": _git_info(),
            "cuda": torch.cuda.is_available(),
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
            "argv": sys.argv}
    for mod in ("accelerate", "lmms_eval"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 - optional packages
            info[mod] = None
    return info


def dist_info() -> dict:
    """Rank / world size from the launcher's environment (accelerate, torchrun, or set by hand)."""
    rank = int(os.environ.get("RANK", os.environ.get("ACCELERATE_PROCESS_INDEX", "0")) or 0)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", "1")) or 1)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return {"rank": rank, "world_size": world, "local_rank": local}


# ------------------------------------------------------------------------------------------------------ files
def read_predictions(path: str | Path, repair: bool = False) -> list[dict]:
    """Rows of a predictions JSONL file. A line that does not parse (a write cut off by a crash) is skipped; with
    ``repair=True`` the file is rewritten without it so that appending continues on a clean line boundary."""
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    rows, good_bytes, bad = [], [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(obj, dict) and "id" in obj:
            rows.append(obj)
            good_bytes.append(line)
        else:
            bad += 1
    needs_fix = bad or (raw and not raw.endswith(b"\n"))
    if repair and needs_fix:
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(b"".join(b + b"\n" for b in good_bytes))
        os.replace(tmp, p)
    return rows


def _write_jsonl_atomic(path: Path, rows: Iterable[Mapping]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ generation
def _per_sample_stat(stats: Any, key: str, n: int):
    """``stats[key]`` as a per-sample list of length ``n`` (searching compositions' nested dicts), else None."""
    if not isinstance(stats, Mapping):
        return None
    if key in stats:
        v = stats[key]
        if isinstance(v, (list, tuple)) and len(v) == n:
            return [int(x) if not isinstance(x, (list, tuple)) else x for x in v]
        return None
    for sub in stats.values():
        if isinstance(sub, Mapping):
            v = _per_sample_stat(sub, key, n)
            if v is not None:
                return v
    return None


def _count_new_tokens(new_ids, eos_ids: set, pad_id) -> list[int]:
    out = []
    for row in new_ids.tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos_ids:
                break
        # trailing pads after an early stop are already cut by the eos break; a row without eos is all real tokens
        out.append(n)
    return out


def _eos_ids(model, processor) -> set:
    ids = set()
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if e is None:
        e = getattr(getattr(processor, "tokenizer", None), "eos_token_id", None)
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    return ids


def _generate(model, processor, adapter, handle, images, questions, gen_kwargs) -> tuple[list[str], list[dict], float]:
    import torch

    batch = adapter.prepare_inputs(processor, images, questions)
    dev = _model_device(model)
    dtype = getattr(model, "dtype", None)
    batch = batch.to(dev)
    if dtype is not None and dtype.is_floating_point:
        batch = batch.to(dtype=dtype)  # casts floating tensors only (pixel values)
    tok = getattr(processor, "tokenizer", processor)
    kw = dict(gen_kwargs)
    if getattr(tok, "pad_token_id", None) is not None:
        kw.setdefault("pad_token_id", tok.pad_token_id)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    new = out[:, batch["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    n = len(questions)
    stats = handle.stats if handle is not None else {}
    before = _per_sample_stat(stats, "visual_tokens_before", n)
    after = _per_sample_stat(stats, "visual_tokens_after", n)
    counts = _count_new_tokens(new, _eos_ids(model, processor), getattr(tok, "pad_token_id", None))
    extra = []
    for i in range(n):
        extra.append({"visual_tokens_before": before[i] if before else None,
                      "visual_tokens_after": after[i] if after else None,
                      "new_tokens": counts[i], "prompt_tokens": int(batch["attention_mask"][i].sum())})
    return [t.strip() for t in texts], extra, dt


def run_benchmark(model, processor, handle, dataset: Dataset, protocol: Protocol, out_dir: str | Path, *,
                  batch_size: int = 1, resume: bool = False, rank: int = 0, world_size: int = 1,
                  progress: bool = True, fail_after_batches: int | None = None,
                  merge_timeout: float = 6 * 3600, on_batch: Callable | None = None,
                  warmup: bool = True) -> list[dict] | None:
    """Generate predictions for ``dataset`` (this rank's shard) into ``out_dir/predictions``; on rank 0 return the
    merged rows in dataset order once every rank is done (other ranks return None)."""
    from vtoolkit.models import get_adapter

    pred_dir = Path(out_dir) / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    bench = dataset.bench
    main_file = pred_dir / f"{bench}.jsonl"
    my_file = main_file if world_size == 1 else pred_dir / f"{bench}.rank{rank}.jsonl"

    existing = _all_rows(pred_dir, bench, repair_file=my_file if resume else None)
    if not resume and (read_predictions(main_file) or read_predictions(my_file)):
        raise FileExistsError(f"{pred_dir} already holds {bench} predictions; pass resume=True (--resume) to continue "
                              f"that run, or choose a new output folder")
    done = {r["id"] for r in existing}
    mine = [r for r in dataset.records if r["index"] % world_size == rank and r["id"] not in done]

    adapter = get_adapter(model)
    gen_kwargs = protocol.generate_kwargs()
    if warmup and mine:  # one untimed call so the first batch's latency does not include lazy init / allocator warm-up
        first = next((r for r in mine if r.get("error") is None), None)
        if first is not None:
            try:
                _generate(model, processor, adapter, handle, [open_image(first)],
                          [protocol.build_question(first.get("question"))], {**gen_kwargs, "max_new_tokens": 2})
            except Exception:  # noqa: BLE001 - the real pass records the error on the row
                pass
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"{bench}" + (f" [rank {rank}/{world_size}]" if world_size > 1 else ""),
                   unit="sample", dynamic_ncols=True)
    try:
        with open(my_file, "a", encoding="utf-8") as fh:
            for b_i, start in enumerate(range(0, len(mine), batch_size)):
                if fail_after_batches is not None and b_i >= fail_after_batches:
                    raise RunInterrupted(f"simulated crash after {b_i} batches")
                chunk = mine[start:start + batch_size]
                rows = _run_batch(model, processor, adapter, handle, chunk, protocol, gen_kwargs)
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                fh.flush()
                os.fsync(fh.fileno())
                if bar is not None:
                    bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(b_i, rows)
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return None
    return _merge(pred_dir, bench, dataset, world_size, merge_timeout)


def _base_row(rec: Mapping, protocol: Protocol) -> dict:
    row = public_record(rec)
    row["prompt"] = protocol.build_question(rec.get("question")) if rec.get("error") is None else None
    return row


def _run_batch(model, processor, adapter, handle, chunk, protocol, gen_kwargs) -> list[dict]:
    rows: dict[str, dict] = {}
    ok, images = [], []
    for rec in chunk:
        row = _base_row(rec, protocol)
        row.update({"prediction": None, "latency_s": None, "batch_size": None, "visual_tokens_before": None,
                    "visual_tokens_after": None, "new_tokens": None, "prompt_tokens": None})
        rows[rec["id"]] = row
        if rec.get("error") is not None:
            continue
        try:
            images.append(open_image(rec))
            ok.append(rec)
        except Exception as e:  # noqa: BLE001 - any unreadable image is a bad row, never fatal
            row["error"] = f"unreadable image: {type(e).__name__}: {e}"

    def attempt(recs, ims):
        qs = [protocol.build_question(r.get("question")) for r in recs]
        texts, extra, dt = _generate(model, processor, adapter, handle, ims, qs, gen_kwargs)
        for r, t, e in zip(recs, texts, extra):
            rows[r["id"]].update({"prediction": t, "latency_s": dt / len(recs), "batch_size": len(recs), **e})

    if ok:
        try:
            attempt(ok, images)
        except Exception as e:  # noqa: BLE001 - fall back to one sample at a time to isolate the bad one
            if len(ok) == 1:
                rows[ok[0]["id"]]["error"] = f"generation failed: {type(e).__name__}: {e}"
            else:
                for r, im in zip(ok, images):
                    try:
                        attempt([r], [im])
                    except Exception as e1:  # noqa: BLE001
                        rows[r["id"]]["error"] = f"generation failed: {type(e1).__name__}: {e1}"
    return [rows[r["id"]] for r in chunk]


def _shard_files(pred_dir: Path, bench: str) -> list[Path]:
    return sorted(pred_dir.glob(f"{bench}.rank*.jsonl"))


def _all_rows(pred_dir: Path, bench: str, repair_file: Path | None = None) -> list[dict]:
    rows = []
    for f in [pred_dir / f"{bench}.jsonl"] + _shard_files(pred_dir, bench):
        rows.extend(read_predictions(f, repair=(repair_file is not None and f == repair_file)))
    return rows


def _merge(pred_dir: Path, bench: str, dataset: Dataset, world_size: int, timeout: float) -> list[dict]:
    want = {r["id"]: r["index"] for r in dataset.records}
    t0 = time.monotonic()
    while True:
        rows = _all_rows(pred_dir, bench)
        by_id: dict[str, dict] = {}
        for r in rows:
            if r["id"] in want and r["id"] not in by_id:
                by_id[r["id"]] = r
        if len(by_id) == len(want):
            break
        if world_size == 1 or time.monotonic() - t0 > timeout:
            missing = [i for i in want if i not in by_id]
            raise RuntimeError(f"{bench}: {len(missing)} samples have no prediction (e.g. {missing[:3]}); "
                               f"a rank stopped early? rerun with --resume")
        time.sleep(0.5)
    merged = sorted(by_id.values(), key=lambda r: want[r["id"]])
    _write_jsonl_atomic(pred_dir / f"{bench}.jsonl", merged)
    for f in _shard_files(pred_dir, bench):
        f.unlink()
    return merged


# ------------------------------------------------------------------------------------------------------ scoring
def _valid(rows):
    return [r for r in rows if r.get("error") is None and r.get("prediction") is not None]


def _summary(rows) -> dict:
    valid = _valid(rows)

    def mean(key):
        vals = [r[key] for r in valid if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    errs = [r for r in rows if r.get("error") is not None]
    return {"n": len(rows), "n_scored": len(valid), "n_errors": len(errs),
            "errors": [{"id": r["id"], "error": r["error"]} for r in errs[:50]],
            "visual_tokens_before": mean("visual_tokens_before"), "visual_tokens_after": mean("visual_tokens_after"),
            "latency_s": mean("latency_s"), "new_tokens": mean("new_tokens")}


def score_benchmark(bench: str, rows: Sequence[dict], protocol: Protocol, dataset: Dataset | None = None,
                    out_dir: str | Path | None = None) -> dict:
    """Scores of one benchmark from its prediction rows (errors left out and counted)."""
    res: dict[str, Any] = {"bench": bench, "rule": protocol.scorer_rule, **_summary(rows)}
    valid = _valid(rows)
    try:
        if not valid:
            raise ValueError("no valid predictions to score")
        if bench == "pope":
            res.update(_score_pope(valid, protocol))
        elif bench == "mme":
            res.update(_score_mme(valid, protocol, out_dir))
        elif bench == "chair":
            res.update(_score_chair(valid, protocol, dataset, out_dir))
    except Exception as e:  # noqa: BLE001 - a scoring problem must not lose the predictions
        res["score_error"] = f"{type(e).__name__}: {e}"
        res["headline"] = None
    return res


def _score_pope(valid, protocol) -> dict:
    from vtoolkit.eval.scorers.pope import score_pope_splits

    splits: dict[str, tuple] = {}
    for r in valid:
        s = splits.setdefault(str(r.get("split")), ([], [], [], []))
        s[0].append(r["prediction"])
        s[1].append(r["label"])
        s[2].append(r["id"])
        s[3].append(r["id"])
    zd = protocol.zero_division
    rep = score_pope_splits(splits, protocol.scorer_rule, zero_division=zd)
    d = rep.to_dict()
    return {"splits": d["splits"], "average": d["average"], "headline": d["average"]["f1"],
            "headline_name": "POPE F1 (mean over splits)", "higher_is_better": True}


def _one_line(s: str) -> str:
    return " ".join((s or "").replace("\t", " ").split())


def _score_mme(valid, protocol, out_dir) -> dict:
    from vtoolkit.eval.scorers.mme import MMEItem, score_mme

    by_img: dict[tuple, list] = {}
    for r in valid:
        by_img.setdefault((r["split"], r["image"]), []).append(r)
    tasks: dict[str, list] = {}
    dropped = []
    for (task, img), rs in by_img.items():
        if len(rs) != 2:  # the partner question had an error: the image cannot be scored (acc+ needs both)
            dropped.append(f"{task}/{img}")
            continue
        for r in rs:
            tasks.setdefault(task, []).append(MMEItem(image=str(img).split("/")[-1], question=r["question"],
                                                      gt=r["label"], response=_one_line(r["prediction"])))
    if out_dir is not None:
        d = Path(out_dir) / "mme_results"
        d.mkdir(parents=True, exist_ok=True)
        for task, items in tasks.items():
            (d / f"{task}.txt").write_text("".join(f"{it.image}\t{it.question}\t{it.gt.capitalize()}\t{it.response}\n"
                                                   for it in items), encoding="utf-8")
    res = score_mme(tasks, protocol.scorer_rule).to_dict()
    return {**res, "dropped_images": dropped, "headline": res["perception"] + res["cognition"],
            "headline_name": "MME total (perception + cognition)", "higher_is_better": True}


def _score_chair(valid, protocol, dataset, out_dir) -> dict:
    from vtoolkit.eval.scorers import chair as chair_mod

    caps = [{"image_id": r["image_id"], "caption": r["prediction"]} for r in valid]
    if out_dir is not None:
        _write_jsonl_atomic(Path(out_dir) / "chair_captions.jsonl", caps)
    info = dataset.info if dataset is not None else {}
    variant = {"wordnet": "opera", "pattern": "original"}.get(protocol.scorer_rule, protocol.scorer_rule)
    if info.get("gt"):
        gt = chair_mod.load_gt(info["gt"])
    elif info.get("annotations"):
        gt = chair_mod.build_gt_from_coco(info["annotations"], variant=variant)
    else:
        raise FileNotFoundError("CHAIR needs ground truth: give data.chair.annotations (COCO annotations folder) or "
                                "data.chair.gt (a prebuilt {image_id: [objects]} json)")
    res = chair_mod.score_chair(caps, gt, variant, zero_division=protocol.zero_division)
    ov = res.overall
    return {"variant": res.variant, "overall": ov, "headline": ov["CHAIRs"],
            "headline_name": "CHAIRs (lower is better)", "higher_is_better": False}


# ------------------------------------------------------------------------------------------------------ orchestration
class EvalConfig(dict):
    """The resolved run config (a dict, JSON-serialised to ``config.json``)."""


_COMPARE_KEYS = ("model", "method", "method_options", "protocols", "data", "limit", "benchmarks")


def resolve_config(*, model: str, method: str = "none", method_options: Mapping | None = None,
                   benchmarks: Sequence[str], data: Mapping[str, Any], protocol_overrides: Mapping | None = None,
                   limit: int | None = None, batch_size: int = 1, dtype: str = "auto", device_map: str | None = None,
                   attn_implementation: str | None = None, seed: int = 0) -> EvalConfig:
    from vtoolkit.eval.datasets import DataSpec

    benches = [b.strip() for b in benchmarks if b.strip()]
    for b in benches:
        if b not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {b!r}; choose from {', '.join(BENCHMARKS)}")
        if b not in data:
            raise ValueError(f"no data given for {b!r}: pass --data {b}=PATH")
    po = dict(protocol_overrides or {})
    protocols = {b: resolve_protocol(b, po.get(b)).to_dict() for b in benches}
    return EvalConfig(model=model, method=method, method_options=dict(method_options or {}), benchmarks=benches,
                      data={b: DataSpec.from_any(b, data[b]).to_dict() for b in benches}, protocols=protocols,
                      limit=limit, batch_size=batch_size, dtype=dtype, device_map=device_map,
                      attn_implementation=attn_implementation, seed=seed)


def _check_resume(out: Path, cfg: Mapping) -> None:
    old_path = out / "config.json"
    if not old_path.exists():
        return
    old = json.loads(old_path.read_text())
    diffs = [k for k in _COMPARE_KEYS if json.dumps(old.get(k), sort_keys=True, default=str)
             != json.dumps(cfg.get(k), sort_keys=True, default=str)]
    if diffs:
        raise ValueError(f"--resume: {out} was started with a different {', '.join(diffs)}; resuming would mix "
                         f"results. Use a new output folder (or the same settings).")


def evaluate(cfg: Mapping, out: str | Path, *, resume: bool = False, model_and_processor=None, progress: bool = True,
             fail_after_batches: int | None = None, merge_timeout: float = 6 * 3600) -> dict | None:
    """Run ``cfg`` (see :func:`resolve_config`) into the run folder ``out``; returns metrics (rank 0) or None."""
    import vtoolkit as vt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist = dist_info()
    rank, world = dist["rank"], dist["world_size"]
    cfg = dict(cfg)
    cfg["world_size"] = world

    protocols = {b: resolve_protocol(b, {k: v for k, v in p.items() if k != "bench"})
                 for b, p in cfg["protocols"].items()}
    datasets = {b: load_dataset(b, cfg["data"][b], protocols[b]).limit(cfg.get("limit")) for b in cfg["benchmarks"]}

    if model_and_processor is None:
        model, processor = load_model(cfg["model"], dtype=cfg.get("dtype", "auto"), device_map=cfg.get("device_map"),
                                      attn_implementation=cfg.get("attn_implementation"), seed=cfg.get("seed", 0))
    else:
        model, processor = model_and_processor

    handle = vt.apply_method(model, cfg.get("method") or "none", **cfg.get("method_options", {}))
    try:
        cfg["method_config"] = _config_dict(handle)
        cfg["data_info"] = {b: _short_info(d.info) for b, d in datasets.items()}
        if rank == 0:
            if resume:
                _check_resume(out, cfg)
            elif any(read_predictions(out / "predictions" / f"{b}.jsonl") for b in cfg["benchmarks"]):
                raise FileExistsError(f"{out} already holds predictions; pass --resume to continue it or choose "
                                      f"a new --out")
            _write_json(out / "config.json", cfg)
            _write_json(out / "env.json", env_info())
        results = {}
        for b in cfg["benchmarks"]:
            rows = run_benchmark(model, processor, handle, datasets[b], protocols[b], out,
                                 batch_size=int(cfg.get("batch_size", 1)), resume=resume, rank=rank,
                                 world_size=world, progress=progress, fail_after_batches=fail_after_batches,
                                 merge_timeout=merge_timeout, warmup=(b == cfg["benchmarks"][0]))
            if rows is not None:
                results[b] = rows
    finally:
        handle.remove()
    if rank != 0:
        return None
    metrics = {"run": str(out), "model": cfg["model"], "method": cfg.get("method") or "none",
               "method_options": cfg.get("method_options", {}), "benchmarks": {}}
    for b, rows in results.items():
        metrics["benchmarks"][b] = score_benchmark(b, rows, protocols[b], datasets[b], out)
    _write_json(out / "metrics.json", metrics)
    return metrics


def _config_dict(handle) -> Any:
    c = handle.config
    if isinstance(c, list):
        return [x.to_dict() for x in c]
    return c.to_dict() if hasattr(c, "to_dict") else str(c)


def _short_info(info: Mapping) -> dict:
    d = dict(info)
    ids = d.get("image_ids")
    if isinstance(ids, list) and len(ids) > 2000:  # pragma: no cover - keep config.json readable
        d["image_ids"] = ids[:2000] + ["..."]
    return d


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
