"""DyVTE router training (``vtoolkit train dyvte``): the LLM frozen, only the per-layer routers learn.

Official recipe (``modeling_llama.py`` L631-693, L907-973, ``finetune_visual_gate.sh``; docs/methods.md 5.3), per batch:

1. draw one layer ``k ~ U{0, ..., L-1}`` (per batch and process);
2. run the frozen model on two copies of the batch: copy A as is, copy B with the image KEYS masked in the layers after
   ``k`` (masking, not removal, so both copies share layers ``0..k``);
3. router ``k`` on the detached output of layer ``k`` (the features inference uses, :func:`router_features`);
4. label per sample: exit (1) iff copy B's greedy (argmax) predictions agree with copy A's on > 99 % of the answer
   tokens AND copy B's answer NLL < 1.03 x copy A's; else keep (0);
5. cross-entropy on the router's two logits (class weights [1, 1]).

Defaults as official: router hidden 2048, lr 6e-5 (AdamW), cosine schedule with 3 % warmup, 1 epoch, batch 16 per
process, ``model_max_length`` 2048; data: LLaVA conversation JSON, single-turn, one image per sample (the official
1 % subset of LLaVA-mix665k is this format).

Deviations: layers ``0..k`` run once and the batch is duplicated at layer ``k + 1`` (the official code duplicates it
at the input and runs layers ``0..k`` twice on identical rows: same result, less compute); features are read from the
prompt positions (the last prompt token and the text between the image and it), exactly what inference sees (causal
attention: the answer after them does not change them); prompts are built with the adapter's ``format_prompt`` (the
chat format the model's inference uses), the answer follows with the tokenizer's EOS; batches are right-padded.

Data parallel: run under ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun --nproc_per_node N``; on
CPUs torchrun, with gloo); each process takes its share of every global batch and
draws its own ``k``; the routers' gradients are averaged (DDP, unused routers allowed). Checkpoints every
``save_every`` steps hold the routers, the optimizer and the schedule; ``resume`` continues from the last one and
reaches the same routers as an uninterrupted run (data order and ``k`` are functions of the seed and the step).

Outputs in ``out``: ``routers.safetensors`` (with the model's architecture fingerprint; load it with
``vt.apply_method(model, "dyvte", routers=out)``), ``train_log.jsonl`` (one line per step and process: k, loss,
labels), ``problems.jsonl`` (rows that could not be used, with the reason), ``checkpoints/step-N/``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtoolkit.config import ConfigError
from vtoolkit.hooks.masks import causal_mask
from vtoolkit.methods.dyvte import OFFICIAL_ROUTER_HIDDEN, DyVTERouters, router_features


@dataclass
class TrainConfig:
    model: str = ""                   # checkpoint path / hub id, or tiny:<arch>
    data: str = ""                    # LLaVA conversation JSON
    images: str = ""                  # folder the "image" fields are relative to
    out: str = ""
    router_hidden: int = OFFICIAL_ROUTER_HIDDEN
    batch_size: int = 16              # per process
    epochs: float = 1.0
    max_steps: int = 0                # > 0: stop after this many steps (overrides epochs)
    lr: float = 6e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    save_every: int = 500             # checkpoint every N steps (0: only at the end)
    resume: bool = False              # continue from the last checkpoint in out
    overwrite: bool = False           # delete the results of an earlier run in out first
    seed: int = 0
    dtype: str = "auto"
    max_length: int = 2048
    agree: float = 0.99               # exit iff greedy agreement > agree ...
    nll_ratio: float = 1.03           # ... and NLL(B) < nll_ratio * NLL(A)
    progress: bool = True

    def validate(self) -> None:
        for name in ("data", "images", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.batch_size < 1 or self.router_hidden < 1 or self.max_length < 2:
            raise ConfigError("batch_size, router_hidden must be >= 1 and max_length >= 2")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("give epochs > 0 or max_steps > 0")


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class Sample:
    id: str
    image: str
    question: str
    answer: str


def load_conversations(path: str | os.PathLike, images: str | os.PathLike | None = None):
    """Single-turn samples of a LLaVA conversation JSON, and the rows that cannot be used (never silently dropped):
    ``[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}]``."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a JSON list of conversations, got {type(rows).__name__}")
    samples, problems = [], []
    for i, r in enumerate(rows):
        rid = str(r.get("id", i)) if isinstance(r, dict) else str(i)
        why = _problem(r, images)
        if why:
            problems.append({"index": i, "id": rid, "reason": why})
            continue
        conv = r["conversations"]
        q = conv[0]["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
        samples.append(Sample(rid, r["image"], q, conv[1]["value"].strip()))
    return samples, problems


def _problem(r, images) -> str | None:
    if not isinstance(r, dict):
        return "not an object"
    if not r.get("image") or not isinstance(r["image"], str):
        return "no image (DyVTE routers learn from image prompts only)"
    conv = r.get("conversations")
    if not isinstance(conv, list) or len(conv) != 2:
        return (f"{len(conv)} turns: single-turn conversations only (human, gpt), as the official training"
                if isinstance(conv, list) else "no conversations list")
    if conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
        return "turns must be human then gpt"
    if not all(isinstance(c.get("value"), str) and c["value"].strip() for c in conv):
        return "empty turn"
    if conv[0]["value"].count("<image>") > 1:
        return "more than one <image>"
    if images is not None and not (Path(images) / r["image"]).is_file():
        return f"image file not found: {Path(images) / r['image']}"
    return None


def build_batch(adapter, processor, samples: list[Sample], images_dir, max_length: int = 2048):
    """A right-padded training batch: ``inputs`` for the model (prompt + answer + EOS), ``labels`` (-100 outside the
    answers), ``prompt_len`` and ``length`` per row, ``vis`` (visual positions). Rows that cannot be built are
    returned in ``problems`` (unreadable image, prompt longer than ``max_length``)."""
    from PIL import Image

    ok, imgs, problems = [], [], []
    for s in samples:
        try:
            with Image.open(Path(images_dir) / s.image) as im:
                imgs.append(im.convert("RGB"))
            ok.append(s)
        except Exception as e:  # noqa: BLE001 - a bad file is reported, not fatal
            problems.append({"id": s.id, "reason": f"unreadable image {s.image}: {e}"})
    if not ok:
        return None, problems
    enc = adapter.prepare_inputs(processor, imgs, [s.question for s in ok])
    tok = processor.tokenizer
    B, Lp = enc["input_ids"].shape
    rowwise = [k for k, v in enc.items() if torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == (B, Lp)
               and k not in ("input_ids", "attention_mask")]
    rows, keep_rows = [], []
    for b, s in enumerate(ok):
        m = enc["attention_mask"][b].bool()
        prompt = enc["input_ids"][b][m]
        sep = "" if adapter.format_prompt(processor, s.question)[-1:].isspace() else " "
        ans = tok(sep + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        room = max_length - prompt.numel()
        if room < 1:
            problems.append({"id": s.id, "reason": f"prompt of {prompt.numel()} tokens exceeds max_length "
                                                   f"{max_length}"})
            continue
        ans = torch.tensor(ans[:room], dtype=prompt.dtype)
        rows.append((prompt, ans, {k: enc[k][b][m] for k in rowwise}))
        keep_rows.append(b)
    if not rows:
        return None, problems
    T = max(p.numel() + a.numel() for p, a, _ in rows)
    n = len(rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    extra = {k: torch.zeros(n, T, dtype=enc[k].dtype) for k in rowwise}
    plen, length = [], []
    for r, (p, a, ex) in enumerate(rows):
        lp, la = p.numel(), a.numel()
        ids[r, :lp], ids[r, lp:lp + la] = p, a
        mask[r, :lp + la] = 1
        labels[r, lp:lp + la] = a
        for k, v in ex.items():
            extra[k][r, :lp] = v
        plen.append(lp)
        length.append(lp + la)
    inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and k not in rowwise}
    if len(keep_rows) != B:
        inputs = _select_images(adapter, enc, inputs, keep_rows)
    inputs.update(input_ids=ids, attention_mask=mask, **extra)
    return {"inputs": inputs, "labels": labels, "prompt_len": torch.tensor(plen), "length": torch.tensor(length),
            "vis": ids == adapter.image_token_id, "ids": [ok[b].id for b in keep_rows]}, problems


def _select_images(adapter, enc, inputs, keep_rows):
    """Keep the pixel inputs of the rows kept (one image per row)."""
    out = dict(inputs)
    if "image_grid_thw" in enc:                            # Qwen: patches flattened over the batch
        counts = enc["image_grid_thw"].prod(-1).tolist()
        starts = [sum(counts[:b]) for b in range(len(counts))]
        out["pixel_values"] = torch.cat([enc["pixel_values"][starts[b]:starts[b] + counts[b]] for b in keep_rows])
        out["image_grid_thw"] = enc["image_grid_thw"][keep_rows]
    else:
        for k in ("pixel_values", "image_sizes"):
            if k in enc:
                out[k] = enc[k][keep_rows]
    return out


# ----------------------------------------------------------------------------------------------------- labels
class RouterExamples:
    """Router examples from the frozen model: ``(features [B, 2d], labels [B], info)`` for a batch and a layer ``k``.

    Hooks (plain torch hooks, removed by :meth:`close` / ``with``): a forward hook keeps layer ``k``'s output; from
    layer ``k + 1`` on the pre-hooks run two copies of every row (A: the batch's own causal mask; B: image keys masked),
    with the rotary embeddings and position ids repeated.
    """

    def __init__(self, model, adapter, agree: float = 0.99, nll_ratio: float = 1.03):
        self.model, self.adapter = model, adapter
        self.agree, self.nll_ratio = agree, nll_ratio
        self.k = None
        self._state: dict[str, Any] = {}
        self._handles = []
        for i, layer in enumerate(adapter.decoder_layers):
            self._handles.append(layer.register_forward_hook(self._make_post(i)))
            self._handles.append(layer.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _make_post(self, i):
        def post(module, args, output):
            if self.k == i:
                h = output[0] if isinstance(output, tuple) else output
                self._state["hidden_k"] = h.detach()
        return post

    def _make_pre(self, i):
        def pre(module, args, kwargs):
            if self.k is None or i <= self.k:
                return None
            s = self._state
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = dict(kwargs)
            if i == self.k + 1:                                 # duplicate the rows: copy A, copy B
                hidden = torch.cat([hidden, hidden], 0)
                dev = hidden.device
                nonpad, vis = s["nonpad"].to(dev), s["vis"].to(dev)
                like = kwargs.get("attention_mask")
                s["mask"] = causal_mask(torch.cat([nonpad, nonpad & ~vis]), hidden.shape[1], like=like)
                pe = kwargs.get("position_embeddings")
                s["pe"] = tuple(_repeat_rows(t.to(dev), 0) for t in pe) if pe is not None else None
                pos = kwargs.get("position_ids")          # [B, T] or [R, B, T] (M-RoPE)
                s["pos"] = _repeat_rows(pos.to(dev), -2) if pos is not None else None
            kwargs["attention_mask"], kwargs["position_embeddings"] = s["mask"], s["pe"]
            if "position_ids" in kwargs:
                kwargs["position_ids"] = s["pos"]
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs
        return pre

    @torch.no_grad()
    def __call__(self, batch: dict, k: int):
        L = self.adapter.num_layers
        if not 0 <= k < L:
            raise ValueError(f"k must be in [0, {L - 1}], got {k}")
        dev = self.model.device
        inputs = {key: (v.to(dev) if torch.is_tensor(v) else v) for key, v in batch["inputs"].items()}
        B = inputs["input_ids"].shape[0]
        plen, length = batch["prompt_len"].to(dev), batch["length"].to(dev)
        s0 = int(plen.min()) - 1                                # logits for the answer positions only
        keep = torch.arange(s0, int(length.max()) - 1, device=dev)
        self._state = {"nonpad": inputs["attention_mask"].bool(), "vis": batch["vis"].to(dev)}
        self.k = k
        try:
            out = self.model(**inputs, use_cache=False, logits_to_keep=keep)
        finally:
            self.k = None
        hidden_k = self._state.pop("hidden_k")
        self._state = {}
        logits = out.logits.float()
        la, lb = (logits[:B], logits[B:]) if k < L - 1 else (logits, logits)
        labels = batch["labels"].to(dev)
        T = keep.numel()
        tgt = labels[:, s0 + 1: s0 + 1 + T]                     # the token each kept logit row predicts
        ans = tgt != -100
        agree = ((la.argmax(-1) == lb.argmax(-1)) & ans).sum(1) / ans.sum(1).clamp(min=1)
        ce = torch.nn.functional.cross_entropy
        nll_a = (ce(la.transpose(1, 2), tgt.clamp(min=0), reduction="none") * ans).sum(1) / ans.sum(1).clamp(min=1)
        nll_b = (ce(lb.transpose(1, 2), tgt.clamp(min=0), reduction="none") * ans).sum(1) / ans.sum(1).clamp(min=1)
        exit_ = (agree > self.agree) & (nll_b < self.nll_ratio * nll_a)
        feats = router_features(hidden_k, batch["vis"].to(dev), plen - 1)
        return feats, exit_.long(), {"agree": agree, "nll_a": nll_a, "nll_b": nll_b}


def _repeat_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Two copies of every row along the batch dimension ``dim``; a broadcast batch dimension of 1 stays."""
    return t if t.shape[dim] == 1 else torch.cat([t, t], dim)


# ----------------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    routers_path: str
    steps: int
    log: list = field(default_factory=list)      # this process's steps
    main_process: bool = True


def _layer_for_step(seed: int, step: int, rank: int, num_layers: int) -> int:
    """k ~ U{0..L-1}, a function of (seed, step, process): a resumed run draws what the uninterrupted one drew."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)
    return int(torch.randint(num_layers, (1,), generator=g))


def _order(n: int, epoch: int, seed: int, global_batch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 7_777_777 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    short = -len(perm) % global_batch
    return perm + perm[:short]                    # whole global batches (wrapping around, as DistributedSampler)


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []


_ARTIFACTS = ("routers.safetensors", "train_config.json", "train_log*.jsonl", "problems*.jsonl", "checkpoints")


def _earlier_results(out: Path) -> list[Path]:
    """What an earlier training run wrote in ``out`` (other files there are not ours and stay)."""
    return sorted(p for pat in _ARTIFACTS for p in out.glob(pat)) if out.is_dir() else []


def _prepare_out(out: Path, cfg: TrainConfig, acc) -> list[Path]:
    """The rule of ``vtoolkit eval``'s run folders: an ``out`` holding an earlier run's results is refused unless
    ``resume`` (continue from its last checkpoint) or ``overwrite`` (delete those results first); returns the
    checkpoints to resume from."""
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the earlier run, or delete it and "
                          "start over")
    earlier = _earlier_results(out)
    ckpts = _checkpoints(out)
    if not earlier:
        return ckpts
    if cfg.overwrite:
        if acc.is_main_process:
            for p in earlier:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        acc.wait_for_everyone()
        return []
    shown = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    if not cfg.resume:
        what = f"checkpoints ({ckpts[-1].name})" if ckpts else f"results of an earlier run ({shown})"
        raise ConfigError(f"--out {out} already holds {what}: pass --resume to continue it from its last checkpoint, "
                          f"--overwrite to delete them and start over, or choose another --out")
    if not ckpts:
        raise ConfigError(f"--resume: {out} holds results of an earlier run ({shown}) but no checkpoint to continue "
                          f"from (see --save-every); pass --overwrite to start over, or choose another --out")
    return ckpts


def train(cfg: TrainConfig, model=None, processor=None, routers: DyVTERouters | None = None) -> TrainResult:
    """Train DyVTE routers for ``cfg.model`` (or the given ``model``/``processor``); see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg.validate()
    out = Path(cfg.out)
    acc = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                      cpu=not torch.cuda.is_available())
    ckpts = _prepare_out(out, cfg, acc)
    restore = None
    if model is None:
        from vtoolkit.eval.runner import load_model

        model, processor = load_model(cfg.model, dtype=cfg.dtype)
    else:                               # the caller's model: give back its flags as they were
        flags = [p.requires_grad for p in model.parameters()]
        restore = (flags, model.training)
    try:
        return _train(cfg, acc, out, ckpts, model, processor, routers)
    finally:
        if restore is not None:
            for p, f in zip(model.parameters(), restore[0]):
                p.requires_grad_(f)
            model.train(restore[1])


def _train(cfg, acc, out, ckpts, model, processor, routers) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from vtoolkit.models import get_adapter

    model.requires_grad_(False)
    model.eval()
    if getattr(model, "hf_device_map", None) is None:
        model.to(acc.device)
    adapter = get_adapter(model)
    samples, problems = load_conversations(cfg.data, cfg.images)
    if not samples:
        raise ConfigError(f"{cfg.data}: no usable sample ({len(problems)} problem rows, e.g. "
                         f"{problems[:1]})")
    L = adapter.num_layers
    if routers is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            routers = DyVTERouters.for_model(adapter, cfg.router_hidden)
    else:
        routers.check(adapter)
    routers.float().train()
    world, rank = acc.num_processes, acc.process_index
    G = cfg.batch_size * world
    per_epoch = math.ceil(len(samples) / G)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    opt = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total), total)
    routers, opt = acc.prepare(routers, opt)
    acc.register_for_checkpointing(sched)
    start = 0
    if cfg.resume and ckpts:
        acc.load_state(str(ckpts[-1]))
        start = json.loads((ckpts[-1] / "state.json").read_text())["step"]
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "world_size": world}, indent=2))
        if problems:
            _append(out / "problems.jsonl", problems)
    acc.wait_for_everyone()
    log_path = out / ("train_log.jsonl" if world == 1 else f"train_log.rank{rank}.jsonl")
    bar = tqdm(total=total, initial=start, desc="dyvte routers", disable=not (cfg.progress and acc.is_main_process))
    log = []
    checked = False
    with RouterExamples(model, adapter, cfg.agree, cfg.nll_ratio) as examples:
        for step in range(start, total):
            epoch, pos = divmod(step, per_epoch)
            order = _order(len(samples), epoch, cfg.seed, G)
            mine = order[pos * G + rank * cfg.batch_size: pos * G + (rank + 1) * cfg.batch_size]
            batch, bad = build_batch(adapter, processor, [samples[i] for i in mine], cfg.images, cfg.max_length)
            if bad and epoch == 0:
                _append(out / f"problems.rank{rank}.jsonl" if world > 1 else out / "problems.jsonl", bad)
            k = _layer_for_step(cfg.seed, step, rank, L)
            t0 = time.perf_counter()
            if batch is None:            # nothing usable in this share: take part in the gradient exchange anyway
                loss = sum(p.sum() * 0 for p in routers.parameters())
                row = {"step": step + 1, "k": k, "loss": None, "n": 0}
            else:
                feats, labels, info = examples(batch, k)
                logits = routers(k, feats)
                loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device))
                row = {"step": step + 1, "k": k, "loss": float(loss.detach()), "n": int(labels.numel()),
                       "exit_rate": float(labels.float().mean()), "agree": [round(float(a), 4) for a in info["agree"]],
                       "ids": batch["ids"]}
            row["lr"] = sched.get_last_lr()[0]
            acc.backward(loss)
            if not checked:              # the LLM is frozen: no gradient may reach it
                assert all(p.grad is None and not p.requires_grad for p in model.parameters()), \
                    "a gradient reached the frozen LLM"
                checked = True
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            row["seconds"] = round(time.perf_counter() - t0, 4)
            log.append(row)
            _append(log_path, [row])
            bar.update(1)
            if row["loss"] is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", k=k, exit=f"{row['exit_rate']:.2f}")
            if cfg.save_every > 0 and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                _save_checkpoint(acc, out, step + 1)
    bar.close()
    acc.wait_for_everyone()
    path = out / "routers.safetensors"
    if acc.is_main_process:
        acc.unwrap_model(routers).save(path, extra={"trained_steps": str(total), "data": Path(cfg.data).name})
    acc.wait_for_everyone()
    return TrainResult(str(path), total, log, acc.is_main_process)


def _save_checkpoint(acc, out: Path, step: int) -> None:
    d = out / "checkpoints" / f"step-{step:08d}"
    acc.save_state(str(d))
    if acc.is_main_process:
        (d / "state.json").write_text(json.dumps({"step": step}))
        for old in _checkpoints(out)[:-2]:          # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
