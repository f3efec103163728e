"""The evaluation runner: batched generation with a method applied, streamed predictions, resume, sharding, scoring.

Run folder (``RUN_DIR``)::

    config.json            the resolved config: model, method + every option (defaults included), protocols, data
                           (+ a fingerprint of the samples), batch size, limit, dtype, seed, versions, world size
    env.json               python / torch / transformers / vtoolkit versions, git hash (+ dirty flag), host, device
    predictions/<bench>.jsonl   one JSON object per sample, in dataset order once the run is complete
    metrics.json           scores per benchmark (``status`` scored / not_scored, ``score_error`` says why) + a
                           summary (visual tokens kept, latency, errors) and the settings a report compares
    ...                    what the benchmark's scorer writes for the original scripts (its ``artifacts``, e.g.
                           answers in an official eval-tool format)

Nothing is lost:

- predictions are appended and flushed after every batch; ``resume=True`` reads what is there (a truncated last line
  from a crash is cut off), skips the sample ids already done and continues, so an interrupted + resumed run has
  exactly the rows of an uninterrupted one (no duplicate, no gap), rewritten in dataset order at the end;
- a bad row (missing field, unreadable image, a sample whose generation raises) gets a row with ``error`` set and
  ``prediction: null``; scores are computed over the valid rows and ``metrics.json`` says how many were left out;
  ``retry_errors=True`` (``--retry-errors``) runs them again on resume;
- a run folder holding results is never written over by accident: a new run refuses it (``--resume`` continues
  it, ``--overwrite`` deletes its results first), and ``resume`` refuses to mix runs: every setting that changes
  predictions must match (model, method config, data and their fingerprint, limit, generation settings, batch
  size, dtype, seed, attention implementation, torch / transformers / vtoolkit versions), the differing ones are
  listed. Scoring settings (rule, zero division) may change: a finished run is then re-scored.

Data parallel: with ``WORLD_SIZE`` > 1 (``accelerate launch``, ``torchrun``, or the env vars by hand) rank r takes the
samples ``i % world == r`` and streams to ``predictions/<bench>.rank<r>.jsonl``; rank 0 waits until every sample id
is present in some file, merges them into ``predictions/<bench>.jsonl`` in dataset order, and scores. Ranks are
launched together: a shard file another rank wrote after this process started belongs to this run, older ones to an
earlier run.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vtoolkit.config import ConfigError
from vtoolkit.eval.benchmark import all_artifacts, get_benchmark, list_benchmarks
from vtoolkit.eval.datasets import Dataset, DataSpec, is_text_only, load_dataset, open_image, public_record
from vtoolkit.eval.datasets import write_jsonl_atomic as _write_jsonl_atomic
from vtoolkit.eval.protocol import SCORING_FIELDS, Protocol, resolve_protocol

__all__ = [
    "EvalConfig",
    "RunInterrupted",
    "check_method_on_model",
    "dist_info",
    "env_info",
    "evaluate",
    "load_model",
    "read_predictions",
    "resolve_config",
    "run_benchmark",
    "run_problems",
    "score_benchmark",
    "setting_diffs",
    "versions",
]


class RunInterrupted(RuntimeError):
    """Raised by the test hook ``fail_after_batches`` to simulate a crash."""


# ------------------------------------------------------------------------------------------------------ model
def load_model(spec: str, *, dtype: str = "auto", device_map: str | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False, seed: int = 0):
    """``tiny:<arch>`` -> :func:`vtoolkit.models.tiny.build`; anything else -> ``AutoModelForImageTextToText`` +
    ``AutoProcessor`` from a local path or hub id, ``ref:shapes`` being the reference model shipped in the package
    (:mod:`vtoolkit.models.reference`) (``dtype``: auto|float16|bfloat16|float32; ``device_map``: e.g. ``auto``,
    ``cuda:0``, ``cpu``).

    Every setting is applied to every model, tiny ones included, or refused with a ConfigError before the model is
    built: ``attn_implementation`` must be a name transformers knows and is set with ``model.set_attn_implementation``
    (its error, e.g. a flash-attention package that is not installed, is a ConfigError too); ``device_map`` must name
    a device this machine has (a tiny model is moved there; ``auto``: the first GPU, else the CPU)."""
    import torch

    from vtoolkit.eval.validate import check_attn_implementation, check_device_map

    check_attn_implementation(attn_implementation)
    check_device_map(device_map, tiny=spec.startswith("tiny:"))
    if spec.startswith("tiny:"):
        from vtoolkit.models import tiny

        td = torch.float32 if dtype in ("auto", None) else getattr(torch, dtype)
        model, proc = tiny.build(spec.split(":", 1)[1], seed=seed, dtype=td)
        if device_map is not None:
            from vtoolkit.eval.validate import PLACEMENTS

            model.to(("cuda" if torch.cuda.is_available() else "cpu") if device_map in PLACEMENTS else device_map)
        _set_attn_implementation(model, attn_implementation)
        return model, proc
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtoolkit.models.reference import resolve as resolve_reference

    spec = resolve_reference(spec)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype in ("auto", None) else getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs).eval()
    _set_attn_implementation(model, attn_implementation)
    proc = AutoProcessor.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if getattr(proc, "tokenizer", None) is not None:
        proc.tokenizer.padding_side = "left"
    if not device_map:
        r = dist_info()
        if torch.cuda.is_available():
            model.to(f"cuda:{r['local_rank']}")
    return model, proc


def _set_attn_implementation(model, impl: str | None) -> None:
    """``model.set_attn_implementation(impl)`` (every sub-model); what transformers refuses (a kernel package that is
    not installed, an implementation this model does not support) is a ConfigError naming the setting."""
    if impl is None:
        return
    try:
        model.set_attn_implementation(impl)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"attn_implementation {impl!r}: {e}") from None


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
def read_predictions(path: str | Path, repair: bool = False, dropped: list | None = None) -> list[dict]:
    """Rows of a predictions JSONL file. A line that does not parse (a write cut off by a crash) is skipped; with
    ``repair=True`` the file is rewritten without it so that appending continues on a clean line boundary.
    ``dropped``: a list that gets ``(line number, why)`` of each skipped line."""
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    rows, good_bytes, bad = [], [], 0
    lines = raw.split(b"\n")
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        why = None
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            cut = no == len(lines) and not raw.endswith(b"\n")
            why = "cut off (the last write did not finish)" if cut else f"not valid JSON ({getattr(e, 'msg', e)})"
        else:
            if isinstance(obj, dict) and "id" in obj:
                rows.append(obj)
                good_bytes.append(line)
            else:
                why = "not a prediction row (a JSON object with an id)"
        if why is not None:
            bad += 1
            if dropped is not None:
                dropped.append((no, why))
    needs_fix = bad or (raw and not raw.endswith(b"\n"))
    if repair and needs_fix:
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(b"".join(b + b"\n" for b in good_bytes))
        os.replace(tmp, p)
    return rows


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
                  batch_size: int = 1, resume: bool = False, retry_errors: bool = False, rank: int = 0,
                  world_size: int = 1,
                  progress: bool = True, fail_after_batches: int | None = None,
                  merge_timeout: float = 6 * 3600, on_batch: Callable | None = None,
                  warmup: bool = True) -> list[dict] | None:
    """Generate predictions for ``dataset`` (this rank's shard) into ``out_dir/predictions``; on rank 0 return the
    merged rows in dataset order once every rank is done (other ranks return None). With ``resume`` the samples
    already there are skipped, except failed ones when ``retry_errors`` (their error rows are dropped first)."""
    from vtoolkit.models import get_adapter

    pred_dir = Path(out_dir) / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    bench = dataset.bench
    main_file = pred_dir / f"{bench}.jsonl"
    my_file = main_file if world_size == 1 else pred_dir / f"{bench}.rank{rank}.jsonl"

    if resume and retry_errors:
        _drop_error_rows(pred_dir, bench, rank, world_size)
    existing = _all_rows(pred_dir, bench, repair_file=my_file if resume else None, report=resume and rank == 0)
    if not resume and (read_predictions(main_file) or read_predictions(my_file)):
        raise FileExistsError(f"{pred_dir} already holds {bench} predictions; pass resume=True (--resume) to continue "
                              f"that run, or choose a new output folder")
    done = {r["id"] for r in existing if not (retry_errors and r.get("error") is not None)}
    mine = [r for r in dataset.records if r["index"] % world_size == rank and r["id"] not in done]

    adapter = get_adapter(model)
    gen_kwargs = protocol.generate_kwargs()
    if warmup and mine:  # one untimed call so the first batch's latency does not include lazy init / allocator warm-up
        first = next((r for r in mine if r.get("error") is None), None)
        if first is not None:
            try:
                _generate(model, processor, adapter, handle, [_image_of(first)],
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


def _image_of(rec: Mapping):
    """What ``adapter.prepare_inputs`` takes for ``rec``: its image, or no image (``[]``) for a text-only record,
    which is then prompted without image placeholders in the same batch as the others."""
    im = open_image(rec)
    return [] if im is None else im


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
            images.append(_image_of(rec))
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


def _all_rows(pred_dir: Path, bench: str, repair_file: Path | None = None, report: bool = False) -> list[dict]:
    """Rows of every prediction file of ``bench``; ``report``: say on stderr which lines were dropped and why."""
    rows = []
    for f in [pred_dir / f"{bench}.jsonl"] + _shard_files(pred_dir, bench):
        dropped: list = []
        rows.extend(read_predictions(f, repair=(repair_file is not None and f == repair_file), dropped=dropped))
        if report and dropped:
            shown = "; ".join(f"line {no}: {why}" for no, why in dropped[:5]) + ("; ..." if len(dropped) > 5 else "")
            _warn(f"--resume: dropped {len(dropped)} unreadable line(s) of {f} ({shown}); their samples run again")
    return rows


def _warn(message: str) -> None:
    """One ``warning:`` line on stderr (the command line's format), at once: a run may take hours."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _drop_error_rows(pred_dir: Path, bench: str, rank: int, world_size: int) -> None:
    """Rewrite the prediction files this rank owns without their error rows (rank 0: the merged file and shards of
    ranks not in this run; rank r > 0: its own shard)."""
    files = [pred_dir / f"{bench}.jsonl"] if rank == 0 else []
    for f in _shard_files(pred_dir, bench):
        r = int(_SHARD.search(f.name).group(1))
        if (r == rank) if rank else (r == 0 or r >= world_size):
            files.append(f)
    for f in files:
        rows = read_predictions(f)
        kept = [r for r in rows if r.get("error") is None]
        if len(kept) < len(rows):
            _write_jsonl_atomic(f, kept)


def _merge(pred_dir: Path, bench: str, dataset: Dataset, world_size: int, timeout: float) -> list[dict]:
    want = {r["id"]: r["index"] for r in dataset.records}
    t0 = time.monotonic()
    while True:
        rows = _all_rows(pred_dir, bench)
        by_id: dict[str, dict] = {}
        for r in rows:   # one row per sample; a successful row wins over an error row of the same sample
            if r["id"] in want and (r["id"] not in by_id or (by_id[r["id"]].get("error") is not None
                                                             and r.get("error") is None)):
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


def _check_against_dataset(valid: Sequence[dict], dataset: Dataset) -> None:
    """Every prediction row must be a sample of ``dataset`` asking the same question with the same label (a
    predictions file written for other data, or data edited since, would otherwise be scored silently)."""
    records = {r["id"]: r for r in dataset.records}
    for row in valid:
        rec = records.get(row["id"])
        if rec is None:
            raise ValueError(f"prediction {row['id']!r} is not a sample of the {dataset.bench} data: the predictions "
                             f"were written for other data (rerun with --overwrite)")
        for key in ("question", "label", "image_id"):
            if row.get(key) != rec.get(key):
                raise ValueError(f"prediction {row['id']!r} was made with {key} {row.get(key)!r} but the data now has "
                                 f"{rec.get(key)!r}: the data changed since the predictions were written (rerun with "
                                 f"--overwrite)")


def score_benchmark(bench: str, rows: Sequence[dict], protocol: Protocol, dataset: Dataset | None = None,
                    out_dir: str | Path | None = None) -> dict:
    """Scores of one benchmark from its prediction rows (errors left out and counted).

    With ``dataset`` every row is first checked against the sample it claims to answer (the benchmark's scorer may
    take its labels from the dataset, aligned with the answers by sample id). A benchmark that cannot be scored gets ``headline:
    None``, ``status: "not_scored"`` and ``score_error`` (the reason, naming the ``--set`` option that changes it)."""
    from vtoolkit.eval.scorers._io import with_flags

    res: dict[str, Any] = {"bench": bench, "rule": protocol.scorer_rule, **_summary(rows)}
    valid = _valid(rows)
    try:
        if not valid:
            raise ValueError(f"no valid predictions to score: all {len(rows)} rows failed" if rows else
                             "no predictions to score")
        if dataset is not None:
            _check_against_dataset(valid, dataset)
        res.update(get_benchmark(bench).score(valid, protocol, dataset, out_dir))
        res["status"] = "scored"
    except Exception as e:  # noqa: BLE001 - a scoring problem must not lose the predictions
        res["score_error"] = with_flags(f"{type(e).__name__}: {e}",
                                        {"zero_division": f"--set {bench}.zero_division={{}}"})
        res["headline"] = None
        res["status"] = "not_scored"
    return res


def run_problems(metrics: Mapping) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of a run's metrics: a benchmark that could not be scored (every row failed, or the
    scorer refused) is an error, failed rows of a scored benchmark a warning; each line names the count and the first
    row error."""
    errors, warnings = [], []
    for b, m in metrics.get("benchmarks", {}).items():
        first = m["errors"][0] if m.get("errors") else None
        rows = (f"{m['n_errors']} of {m['n']} rows failed (first: {first['id']}: {first['error']})"
                if first else "")
        if m.get("headline") is None and not m.get("headline_note"):
            errors.append(f"{b}: not scored: {m.get('score_error')}" + (f"; {rows}" if rows else ""))
        elif rows:
            warnings.append(f"{b}: {rows}; scored over the other {m['n_scored']}")
        if m.get("headline_note"):   # scored, but the headline metric is undefined (e.g. an F1 with no "yes" answer)
            warnings.append(f"{b}: {m.get('headline_name')} {m['headline_note']}")
    return errors, warnings


# ------------------------------------------------------------------------------------------------------ orchestration
class EvalConfig(dict):
    """The resolved run config (a dict, JSON-serialised to ``config.json``)."""


# settings that change predictions: a resumed run must have the same (protocols without SCORING_FIELDS)
_PREDICTION_KEYS = ("model", "method", "method_config", "benchmarks", "data", "data_fingerprint", "limit",
                    "batch_size", "dtype", "seed", "attn_implementation", "protocols", "versions")
# how resolve_config / evaluate name each setting in their errors; the CLI passes its option names instead
_NAMES = {"model": "model", "method": "method", "method_options": "method_options", "benchmarks": "benchmarks",
          "data": "data", "protocol": "protocol_overrides", "limit": "limit", "batch_size": "batch_size",
          "dtype": "dtype", "seed": "seed", "attn_implementation": "attn_implementation", "device_map": "device_map",
          "out": "out", "resume": "resume=True", "overwrite": "overwrite=True"}
_STARTED = time.time()   # ranks of one data-parallel run start together; see _earlier_results
_RUN_FILES = ("config.json", "env.json", "metrics.json", "predictions")   # + each benchmark's artifacts
_SHARD = re.compile(r"\.rank(\d+)\.jsonl$")


def versions() -> dict:
    """torch / transformers / vtoolkit versions: a resumed run must match them (they change predictions)."""
    from importlib.metadata import version

    import vtoolkit

    return {"torch": version("torch"), "transformers": version("transformers"), "vtoolkit": vtoolkit.__version__}


def resolve_config(*, model: str, method: str = "none", method_options: Mapping | None = None,
                   benchmarks: Sequence[str], data: Mapping[str, Any], protocol_overrides: Mapping | None = None,
                   limit: int | None = None, batch_size: int = 1, dtype: str = "auto", device_map: str | None = None,
                   attn_implementation: str | None = None, seed: int = 0,
                   names: Mapping[str, str] | None = None) -> EvalConfig:
    """The run config, with everything checked that can be checked before a model is built: the model name, the
    method and its options (names, types, ranges, supported model type), benchmarks, data paths, protocol overrides,
    limit, batch size, dtype. All problems are raised together as one :class:`~vtoolkit.config.ConfigError`, each
    naming the setting as ``names`` spells it (default: these keyword names; the CLI passes its option names)."""
    from vtoolkit.eval.validate import (
        Collector,
        check_attn_implementation,
        check_device_map,
        check_dtype,
        check_method_model,
        check_model,
        method_config,
        method_name,
        positive_int,
    )

    n = {**_NAMES, **(names or {})}
    c = Collector()
    model_type = name = mconf = None
    with c.check():
        model_type = check_model(model, n["model"])
    with c.check(f"{n['method']}: "):
        name = method_name(method)
    if name is not None:
        with c.check(f"{n['method_options']}: "):
            mconf = method_config(name, method_options)
        with c.check(f"{n['method']}: "):
            check_method_model(name, model_type)
    benches = [str(b).strip() for b in ([benchmarks] if isinstance(benchmarks, str) else benchmarks or [])]
    benches = [b for part in benches for b in part.split(",") if b.strip()]
    if not benches:
        c.problems.append(f"{n['benchmarks']}: no benchmark given; choose from {', '.join(list_benchmarks())}")
    for b in dict.fromkeys(benches):
        if b not in list_benchmarks():
            with c.check(f"{n['benchmarks']}: "):
                get_benchmark(b)   # the error names the registered ones and the closest
        elif benches.count(b) > 1:
            c.problems.append(f"{n['benchmarks']}: {b!r} is listed twice")
    data = data if isinstance(data, Mapping) else {}
    specs = {}
    for b in dict.fromkeys(x for x in benches if x in list_benchmarks()):
        if b not in data:
            c.problems.append(f"{n['data']}: no data given for {b!r} (its folder or file, e.g. {b}=/data/{b})")
            continue
        with c.check(f"{n['data']}: "):
            specs[b] = DataSpec.from_any(b, data[b])
            missing = specs[b].missing_paths()
            if missing:
                raise ConfigError([f"{b} {m}: no such file or folder" for m in missing])
            get_benchmark(b).check_data(specs[b])
    po = protocol_overrides if isinstance(protocol_overrides, Mapping) else {}
    protocols = {}
    for b in dict.fromkeys([*po, *(x for x in benches if x in list_benchmarks())]):
        with c.check(f"{n['protocol']}: "):
            p = resolve_protocol(b, po.get(b))
            if b in benches:
                protocols[b] = p.to_dict()
    with c.check():
        positive_int(limit, n["limit"], allow_none=True)
    with c.check():
        positive_int(batch_size, n["batch_size"])
    with c.check():
        check_dtype(dtype, n["dtype"])
    if isinstance(seed, bool) or not isinstance(seed, int):
        c.problems.append(f"{n['seed']} must be an integer, got {seed!r}")
    with c.check():
        check_attn_implementation(attn_implementation, n["attn_implementation"])
    with c.check():
        check_device_map(device_map, n["device_map"], tiny=isinstance(model, str) and model.startswith("tiny:"))
    c.raise_if_any()
    return EvalConfig(model=model, method=name, method_options=dict(method_options or {}), method_config=mconf,
                      benchmarks=benches, data={b: s.to_dict() for b, s in specs.items()}, protocols=protocols,
                      limit=limit, batch_size=batch_size, dtype=dtype, device_map=device_map,
                      attn_implementation=attn_implementation, seed=seed, versions=versions())


def _prediction_settings(cfg: Mapping) -> dict:
    d = {k: cfg.get(k) for k in _PREDICTION_KEYS}
    d["protocols"] = {b: {k: v for k, v in (p or {}).items() if k not in SCORING_FIELDS}
                      for b, p in (cfg.get("protocols") or {}).items()}
    return d


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping) or not d:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def setting_diffs(old: Mapping, new: Mapping) -> list[str]:
    """``key: old -> new`` for each setting that changes predictions and differs between two run configs."""
    a, b = _flat(_prediction_settings(old)), _flat(_prediction_settings(new))

    def show(v):
        t = json.dumps(v, default=str)
        return t if len(t) <= 60 else t[:57] + "..."

    return [f"{k}: {show(a.get(k))} -> {show(b.get(k))}" for k in dict.fromkeys([*a, *b])
            if json.dumps(a.get(k), sort_keys=True, default=str) != json.dumps(b.get(k), sort_keys=True, default=str)]


def _earlier_results(out: Path, rank: int, world: int) -> list[Path]:
    """Files of an earlier run in the run folder ``out``. With several ranks, files another rank of this run wrote
    after this process started are this run's (ranks are launched together); a rank's own shard is always earlier."""
    files: list[Path] = []
    for name in _RUN_FILES + all_artifacts():
        p = out / name
        files += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if world == 1:
        return files

    def earlier(f: Path) -> bool:
        m = _SHARD.search(f.name)
        try:
            return (m is not None and int(m.group(1)) == rank) or f.stat().st_mtime < _STARTED
        except FileNotFoundError:   # removed meanwhile by rank 0 (--overwrite)
            return False

    return [f for f in files if earlier(f)]


def _clear(files: Sequence[Path], rank: int, world: int) -> None:
    """Delete earlier results: each rank > 0 its own shard, rank 0 everything else (stale shards of ranks that are
    not in this run included)."""
    for f in files:
        m = _SHARD.search(f.name)
        shard_rank = int(m.group(1)) if m else None
        if (shard_rank == rank) if rank else (shard_rank is None or shard_rank == 0 or shard_rank >= world):
            f.unlink(missing_ok=True)


def _prepare_run_folder(out: Path, cfg: Mapping, rank: int, world: int, resume: bool, overwrite: bool,
                        n: Mapping[str, str]) -> None:
    """Refuse, clear or check the run folder before the model is built (see :func:`evaluate`)."""
    earlier = _earlier_results(out, rank, world)
    out.mkdir(parents=True, exist_ok=True)
    if not earlier:
        return
    if overwrite:
        _clear(earlier, rank, world)
        return
    if not resume:
        shown = ", ".join(str(f.relative_to(out)) for f in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise ConfigError(f"{n['out']} {out} already holds results of an earlier run ({shown}): pass {n['resume']} "
                          f"to continue it, {n['overwrite']} to delete them and start over, or choose another "
                          f"{n['out']}")
    old_path = out / "config.json"
    try:
        old = json.loads(old_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{n['resume']}: {old_path} is missing or unreadable, so the earlier run's settings are "
                          f"unknown; pass {n['overwrite']} to start over") from None
    diffs = setting_diffs(old, cfg)
    if diffs:
        raise ConfigError([f"{n['resume']}: {out} was run with other settings that change predictions, resuming "
                           f"would mix them; use the same settings, {n['overwrite']} to start over, or another "
                           f"{n['out']}. Differing:"] + [f"  {d}" for d in diffs])


def evaluate(cfg: Mapping, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             retry_errors: bool = False, model_and_processor=None, progress: bool = True,
             fail_after_batches: int | None = None, merge_timeout: float = 6 * 3600,
             names: Mapping[str, str] | None = None) -> dict | None:
    """Run ``cfg`` (see :func:`resolve_config`) into the run folder ``out``; returns metrics (rank 0) or None.

    Before the model is built: the method and data are checked and loaded, and the run folder is checked. A folder
    holding results of an earlier run is refused unless ``resume`` (continue it: every setting that changes
    predictions must match, see :func:`setting_diffs`) or ``overwrite`` (delete those results first).
    ``retry_errors`` (with ``resume``) runs the rows that failed again. Errors name settings as ``names`` spells
    them (see :func:`resolve_config`)."""
    import vtoolkit as vt
    from vtoolkit.eval.validate import method_config, method_name

    n = {**_NAMES, **(names or {})}
    if resume and overwrite:
        raise ConfigError(f"{n['resume']} and {n['overwrite']} exclude each other: continue the earlier run, or "
                          f"delete it and start over")
    out = Path(out)
    dist = dist_info()
    rank, world = dist["rank"], dist["world_size"]
    cfg = dict(cfg)
    cfg["world_size"] = world
    cfg["method"] = method_name(cfg.get("method") or "none")
    cfg["method_config"] = method_config(cfg["method"], cfg.get("method_options"))
    cfg["versions"] = versions()

    protocols = {b: resolve_protocol(b, {k: v for k, v in p.items() if k != "bench"})
                 for b, p in cfg["protocols"].items()}
    datasets = {b: load_dataset(b, cfg["data"][b], protocols[b]).limit(cfg.get("limit")) for b in cfg["benchmarks"]}
    empty = [f"{n['data']}: the {b} data {DataSpec.from_any(b, cfg['data'][b]).path} holds no samples" for b, d in datasets.items()
             if not len(d)]
    if empty:
        raise ConfigError(empty)
    cfg["data_info"] = {b: _short_info(d.info) for b, d in datasets.items()}
    cfg["data_fingerprint"] = {b: d.fingerprint() for b, d in datasets.items()}
    _prepare_run_folder(out, cfg, rank, world, resume, overwrite, n)

    if model_and_processor is None:
        model, processor = load_model(cfg["model"], dtype=cfg.get("dtype", "auto"), device_map=cfg.get("device_map"),
                                      attn_implementation=cfg.get("attn_implementation"), seed=cfg.get("seed", 0))
    else:
        model, processor = model_and_processor

    with _setting_error(f"{n['method_options']}: {cfg['method']}: "):
        check_method_on_model(model, processor, cfg["method"], cfg.get("method_options", {}),
                              [(datasets[b], protocols[b]) for b in cfg["benchmarks"]])
    handle = vt.apply_method(model, cfg["method"], **cfg.get("method_options", {}))
    try:
        if rank == 0:
            _write_json(out / "config.json", cfg)
            _write_json(out / "env.json", env_info())
        results = {}
        for b in cfg["benchmarks"]:
            rows = run_benchmark(model, processor, handle, datasets[b], protocols[b], out,
                                 batch_size=int(cfg.get("batch_size", 1)), resume=resume,
                                 retry_errors=retry_errors, rank=rank, world_size=world, progress=progress,
                                 fail_after_batches=fail_after_batches, merge_timeout=merge_timeout,
                                 warmup=(b == cfg["benchmarks"][0]))
            if rows is not None:
                results[b] = rows
    finally:
        handle.remove()
    if rank != 0:
        return None
    metrics = {"run": str(out), "model": cfg["model"], "method": cfg["method"],
               "method_options": cfg.get("method_options", {}), "batch_size": cfg.get("batch_size"),
               "dtype": cfg.get("dtype"), "limit": cfg.get("limit"), "benchmarks": {}}
    for b, rows in results.items():
        metrics["benchmarks"][b] = {**score_benchmark(b, rows, protocols[b], datasets[b], out),
                                    "protocol": protocols[b].to_dict(),
                                    "data_fingerprint": cfg["data_fingerprint"][b]}
    _write_json(out / "metrics.json", metrics)
    return metrics


@contextlib.contextmanager
def _setting_error(prefix: str):
    """A ValueError / NotImplementedError raised inside is a wrong setting: a ConfigError (exit 2) with ``prefix``."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError([prefix + p for p in e.problems]) from None
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(prefix + str(e)) from None


def check_method_on_model(model, processor, method: str, options: Mapping | None = None,
                          data: Sequence[tuple[Dataset, Protocol]] = ()) -> None:
    """What only the loaded model knows about ``method`` with ``options``, checked before the first batch: the
    config's bounds (:meth:`~vtoolkit.config.MethodConfig.check_model`: layer indices, token budgets against the
    visual tokens of each benchmark's first sample in ``data``) and the method's own :meth:`check` (attention
    implementation, routers...). Raises what they raise (ValueError, NotImplementedError); nothing is installed."""
    from vtoolkit.models import get_adapter
    from vtoolkit.registry import get_method

    spec = get_method(method)
    adapter = get_adapter(model)
    config = spec.config_cls(**dict(options or {}))
    spans = []
    for dataset, protocol in data:
        first = next((r for r in dataset.records if r.get("error") is None and not is_text_only(r)), None)
        if first is None:
            continue
        try:
            batch = adapter.prepare_inputs(processor, [open_image(first)], [protocol.build_question(first.get("question"))])
            spans += adapter.image_spans(batch)
        except Exception:  # noqa: BLE001 - an unreadable first sample: its row records the error when it runs
            continue
    config.check_model(adapter, spans or None)
    spec.cls(config, adapter).check()


def _short_info(info: Mapping) -> dict:
    d = dict(info)
    ids = d.get("image_ids")
    if isinstance(ids, list) and len(ids) > 2000:  # pragma: no cover - keep config.json readable
        d["image_ids"] = ids[:2000] + ["..."]
    return d
