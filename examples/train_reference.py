"""Train vtoolkit's reference model (``ref:shapes``, shipped in ``vtoolkit/models/reference``) from a seed.

A LLaVA-1.5-architecture VLM (``LlavaForConditionalGeneration``: CLIP ViT with a [CLS] token, 2-layer MLP projector,
Llama) trained on procedural scenes (:mod:`vtoolkit.data.scenes`, training seed only):

0. tokenizer: byte-level BPE trained on the synthetic corpus plus the harness prompts (any text encodes; every word
   of the synthetic language is one token);
1. CLIP-style pretraining of the ViT: InfoNCE between the [CLS] embedding (last layer, post-layernorm, projection)
   and a small CLIP text encoder over the scene descriptions (plus NegCLIP-style hard negatives); identical
   descriptions in a batch count as positives; plus the auxiliary patch-class loss named below;
2. LLaVA-style training of projector + LLM (the ViT tuned at a lower rate; ``--no-tune-vit`` freezes it as
   LLaVA-1.5 does) on
   multi-turn conversations: POPE/MME-style yes/no questions (existence with random / popular / adversarial
   negatives, colour, count, position), open colour/count questions and captions, in the exact prompt format the
   harness produces (``USER: <image>\\n{question} ASSISTANT: {answer}</s>``); the loss is on the answers only;
3. export: weights rounded to float16 (stored as float16 safetensors; ``config.json`` says float32 so that
   ``from_pretrained`` gives the float32 model the evaluation ran), processor and tokenizer; reloading is checked to
   give identical logits.

Every stage runs under ``accelerate`` (CPU, one GPU, or ``accelerate launch`` for several), shows a tqdm bar,
checkpoints every ``--save-every`` steps into ``OUT/<stage>/ckpt-<step>`` (model, optimizer, scheduler, RNG) and
resumes from the newest checkpoint with ``--resume``. The data of step k is a pure function of (seed, k), so a
resumed run sees exactly the batches an uninterrupted one would.

    python examples/train_reference.py --out runs/reference --workers 4           # the shipped recipe (defaults)
    python examples/train_reference.py --out runs/reference --resume              # continue after an interruption
    python examples/train_reference.py --out runs/reference --export vtoolkit/models/reference   # replace the shipped one
    python examples/train_reference.py --out runs/quick --max-minutes 3           # fit each stage's schedule in 3 min

The defaults are the recipe of the shipped checkpoint. It was trained on one NVIDIA H200 (16 CPU cores rendering
scenes) in 5.6 minutes with ``--max-minutes 3.4``, which measured the step rate after 50 steps and shortened each
stage's cosine schedule to end in time: 1760 CLIP steps (batch 128) and 2903 LLaVA steps (batch 64), the defaults
now, so that the plain command replays the same schedule. The data of every step is a pure function of the seed; GPU
kernels are not bitwise deterministic, so a replay lands close to, not exactly on, the shipped weights. On the 2-core
CPU the same recipe takes about 2.7 hours (measured rates: 1.0 CLIP step/s at batch 128, 2.7 s per LLaVA step of 64;
extrapolated, not run to the end); ``--max-minutes`` trades quality for time.

Deviation from plain CLIP pretraining (named): stage 1 adds an auxiliary loss (``--patch-aux``, weight 1) -- a linear
head on the patch features LLaVA reads (layer -2) names the class under each patch. Without it, the tiny ViT's patch
features did not encode which shapes are present within the CPU budget (presence probe at chance) and the LLM stage
stayed at chance on yes/no questions; the contrastive loss on [CLS] is unchanged, so [CLS] attention is still learned
the CLIP way (it concentrates on objects: see ``tests/test_reference_model.py``).

Training data: ``make_scene(TRAIN_SEED + seed, i)``; monitoring: a dev stream (``DEV_SEED``); the benchmarks'
``BENCH_SEED`` is never read here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vtoolkit.data import scenes as S
from vtoolkit.models.reference import cls_attention_on_objects

DEV_SEED = 777            # monitoring scenes (neither training nor benchmark)
BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
PATCH = 8
GENERAL_TEXT = [          # so that ordinary prompts (lmms-eval, users) tokenize into sensible pieces too
    "USER: <image>\nWhat is shown in the picture? Please answer the question. ASSISTANT: A picture.",
    "The quick brown fox jumps over the lazy dog. 0123456789 How many objects are there? Describe the colors.",
    "Is there a dog in the image? Answer yes or no. Provide a one-sentence caption for the provided image.",
]


# ------------------------------------------------------------------------------------------------ building blocks
def corpus(n_scenes: int, seed: int) -> list[str]:
    """Every kind of text the model will see: conversations about training scenes, prompts, captions."""
    rng = np.random.default_rng([seed, 1])
    texts = list(GENERAL_TEXT) + list(S.CAPTION_PROMPTS)
    for i in range(n_scenes):
        scene = S.make_scene(S.TRAIN_SEED + seed, i)
        for q, a in S.training_turns(scene, rng, n=8):
            texts.append(f"USER: {IMAGE}\n{q} ASSISTANT: {a}{EOS}")
    return texts


def build_tokenizer(vocab_size: int, seed: int, n_scenes: int = 3000):
    """Byte-level BPE (encodes any text) trained on :func:`corpus`; ``<s>`` prepended like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, IMAGE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(n_scenes, seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.padding_side = "left"
    return hf


def build_processor(tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    # the class AutoProcessor.from_pretrained gives back (torchvision-backed), so training sees the eval pixels
    ip = CLIPImageProcessor(size={"shortest_edge": S.CANVAS}, crop_size={"height": S.CANVAS, "width": S.CANVAS})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def vision_config(args):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                            num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                            image_size=S.CANVAS, patch_size=PATCH, projection_dim=args.clip_dim)


def clip_model(tok, args):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=args.clip_text_hidden,
                          intermediate_size=4 * args.clip_text_hidden, num_hidden_layers=args.clip_text_layers,
                          num_attention_heads=4, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config(args).to_dict(),
                     projection_dim=args.clip_dim)
    return CLIPModel(cfg)


def llava_model(tok, args):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=len(tok), hidden_size=args.text_hidden, intermediate_size=args.text_intermediate,
                       num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
                       num_key_value_heads=args.text_heads, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision_config(args), text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(S.CANVAS // PATCH) ** 2)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def n_image_tokens() -> int:
    return (S.CANVAS // PATCH) ** 2


# ------------------------------------------------------------------------------------------------ data
class ClipBatches(torch.utils.data.Dataset):
    """Item k = the k-th CLIP batch: pixel values; the scene descriptions followed by two hard negatives per scene
    (:func:`vtoolkit.data.scenes.hard_negatives`) as token ids + attention mask; ``same[i, j]``: text j is a true
    description of image i. Half of the scenes (and their negatives) are described without colours: colours are
    the easiest thing to see, and a batch whose texts differ in colour only would not teach shapes."""

    def __init__(self, tok, processor, batch: int, stream: int):
        self.tok, self.ip, self.batch, self.stream = tok, processor.image_processor, batch, stream

    def __len__(self):
        return 10**9

    def scenes(self, k: int) -> list[S.Scene]:
        return [S.make_scene(self.stream, k * self.batch + j) for j in range(self.batch)]

    def __getitem__(self, k):
        scenes = self.scenes(k)
        rng = np.random.default_rng([self.stream, 4, k])
        px = self.ip([S.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        plain = rng.random(len(scenes)) < 0.5
        caps = [S.description(s, colors=not p) for s, p in zip(scenes, plain)]
        texts = caps + [t for s, p in zip(scenes, plain) for t in S.hard_negatives(s, rng, colors=not p)]
        enc = self.tok([c + EOS for c in texts], add_special_tokens=False, padding=True, return_tensors="pt")
        same = torch.tensor([[a == b for b in texts] for a in caps], dtype=torch.float32)
        return {"pixel_values": px, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "same": same, "patch_labels": torch.stack([patch_labels(s) for s in scenes])}


def patch_labels(scene: S.Scene, grid: int = S.CANVAS // PATCH, min_cover: float = 0.25) -> torch.Tensor:
    """Per patch (raster order): the index in ``S.CLASSES`` of the class covering most of it, or ``len(CLASSES)``
    (background) when no object covers ``min_cover`` of it -- the targets of the auxiliary patch loss."""
    p = S.CANVAS // grid
    cover = np.zeros((len(S.CLASSES), grid * grid), np.float32)
    for o in scene.objects:
        m = S.object_mask(scene, o, supersample=2).reshape(grid, p, grid, p).mean((1, 3)).reshape(-1)
        k = S.CLASSES.index(o.cls)
        cover[k] = np.maximum(cover[k], m)
    best = cover.argmax(0)
    return torch.from_numpy(np.where(cover.max(0) >= min_cover, best, len(S.CLASSES)).astype(np.int64))


class ClipWithPatchHead(torch.nn.Module):
    """The CLIP model plus a linear head on the patch features of the layer LLaVA reads (``vision_feature_layer=-2``)
    that names the class under each patch: the auxiliary loss of stage 1 (not exported)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.patch_head = torch.nn.Linear(clip.config.vision_config.hidden_size, len(S.CLASSES) + 1)

    def forward(self, **kw):
        return self.clip(**kw)


def encode_conversation(tok, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation in the harness's LLaVA format; loss on the answers (+ ``</s>``)."""
    ids, labels = [tok.bos_token_id], [-100]
    for k, (q, a) in enumerate(turns):
        user = ("USER: " + IMAGE * n_image_tokens() + "\n" if k == 0 else "USER: ") + q + " ASSISTANT:"
        u = tok(user, add_special_tokens=False)["input_ids"]
        ans = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += u + ans
        labels += [-100] * len(u) + ans
    return ids, labels


class ChatBatches(torch.utils.data.Dataset):
    """Item k = the k-th LLaVA batch, one conversation per scene, right-padded: a caption (probability
    ``p_caption``) or ``turns`` question/answer turns."""

    def __init__(self, tok, processor, seed: int, batch: int, stream: int, turns: int, p_caption: float):
        self.tok, self.ip = tok, processor.image_processor
        self.seed, self.batch, self.stream, self.turns, self.p_caption = seed, batch, stream, turns, p_caption

    def __len__(self):
        return 10**9

    def __getitem__(self, k):
        rng = np.random.default_rng([self.seed, 2, k])
        scenes = [S.make_scene(self.stream, k * self.batch + j) for j in range(self.batch)]
        px = self.ip([S.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        seqs = [encode_conversation(self.tok, S.training_turns(s, rng, self.turns, rng.random() < self.p_caption))
                for s in scenes]
        n = max(len(i) for i, _ in seqs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in seqs])
        labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in seqs])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in seqs])
        return {"pixel_values": px, "input_ids": ids, "attention_mask": mask, "labels": labels}


def clip_loss(model, out, same):
    """Symmetric InfoNCE (temperature capped at 1/100 as CLIP's) where identical descriptions are all positives;
    image-to-text also ranks the hard negatives (NegCLIP), text-to-image runs over the true descriptions only."""
    n = same.shape[0]
    scale = model.logit_scale.exp().clamp(max=100.0)
    logits = scale * out.image_embeds @ out.text_embeds.t()            # [images, descriptions + negatives]
    ti = same / same.sum(1, keepdim=True)
    li = -(ti * torch.log_softmax(logits, 1)).sum(1).mean()
    tt = same[:, :n].t() / same[:, :n].t().sum(1, keepdim=True)
    lt = -(tt * torch.log_softmax(logits[:, :n].t(), 1)).sum(1).mean()
    return (li + lt) / 2


def presence_probe(train_x, train_y, test_x, test_y, per_patch: bool = False, steps: int = 200) -> float:
    """Held-out accuracy of a linear probe for "class c is in the image" (10 binary decisions per image) on frozen
    features: one vector per image, or (``per_patch``) a linear score per patch max-pooled over the patches -- how
    readily a class can be read from the patch features the LLM receives."""
    dims = tuple(range(train_x.dim() - 1))
    mu, sd = train_x.mean(dims), train_x.std(dims) + 1e-5
    lin = torch.nn.Linear(train_x.shape[-1], train_y.shape[1])
    opt = torch.optim.Adam(lin.parameters(), 1e-2)

    def scores(x):
        z = lin((x - mu) / sd)
        return z.max(1).values if per_patch else z

    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores(train_x), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((scores(test_x) > 0).float() == test_y).float().mean())


# ------------------------------------------------------------------------------------------------ monitoring
@torch.no_grad()
def dev_yes_no(model, tok, processor, n: int = 96) -> float:
    """Accuracy of the Yes/No logit at the answer position on POPE-style dev questions (balanced)."""
    rng = np.random.default_rng([DEV_SEED, 3])
    scenes = [S.make_scene(DEV_SEED, 10_000 + i, min_classes=2) for i in range(n)]
    qs, golds = [], []
    for i, s in enumerate(scenes):
        if i % 2 == 0:
            c, gold = s.classes[int(rng.integers(len(s.classes)))], "Yes"
        else:
            c, gold = S.negative_class(s, rng, ("random", "popular", "adversarial")[i % 3]), "No"
        qs.append(f"Is there {S.with_article(c)} in the image?" + S.SHORT_ANSWER)
        golds.append(gold)
    prompts = [f"USER: {IMAGE}\n{q} ASSISTANT:" for q in qs]
    batch = processor(images=[S.render(s) for s in scenes], text=prompts, padding=True, return_tensors="pt")
    batch = batch.to(next(model.parameters()).device)
    logits = model(**batch).logits[:, -1]
    yes, no = tok(" Yes", add_special_tokens=False)["input_ids"][0], tok(" No", add_special_tokens=False)["input_ids"][0]
    pred = np.where((logits[:, yes] > logits[:, no]).cpu().numpy(), "Yes", "No")
    return float(np.mean(pred == np.array(golds)))


# ------------------------------------------------------------------------------------------------ loops
def latest_checkpoint(stage_dir: Path) -> Path | None:
    ckpts = sorted(stage_dir.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def train_stage(name, accelerator, model, groups, data, steps, lr, warmup, out: Path, args, step_fn, monitor):
    """One training stage with checkpoints, resume and a progress bar; ``groups``: optimizer parameter groups;
    ``step_fn(model, batch) -> loss``."""
    import math

    stage_dir = out / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    plan = {"steps": steps}   # with --max-minutes, shortened after 50 steps so the cosine decay ends in time

    def cosine(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, plan["steps"] - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    start = 0
    ckpt = latest_checkpoint(stage_dir) if args.resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        start = json.loads((ckpt / "progress.json").read_text())["step"]
        accelerator.print(f"{name}: resumed from {ckpt} (step {start})")
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, steps),
                                         num_workers=args.workers, persistent_workers=False,
                                         prefetch_factor=4 if args.workers else None)
    log = open(stage_dir / "log.jsonl", "a", encoding="utf-8")
    bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True, disable=not accelerator.is_main_process)
    model.train()
    t0, ema = time.time(), None
    for step, batch in zip(range(start, steps), loader):
        if step >= plan["steps"]:
            break
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            bar.write(f"{name}: stopped at step {step} after --max-minutes {args.max_minutes}")
            rec = {"step": step, "stopped": "max_minutes"}
            rec.update(monitor(accelerator.unwrap_model(model).eval()))
            bar.write(f"{name} step {step}: " + json.dumps(rec))
            log.write(json.dumps(rec) + "\n")
            break
        if args.max_minutes and step == start + 50:
            rate = 50 / (time.time() - t0)
            plan["steps"] = min(steps, step + int(0.9 * rate * (60 * args.max_minutes - (time.time() - t0))))
            bar.write(f"{name}: {rate:.1f} steps/s; the schedule ends at step {plan['steps']}")
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = step_fn(model, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        done = step + 1
        rec = {"step": done, "loss": round(loss.item(), 5), "elapsed_s": round(time.time() - t0, 1)}
        if done % args.eval_every == 0 or done in (steps, plan["steps"]):
            model.eval()
            rec.update(monitor(accelerator.unwrap_model(model)))
            model.train()
            bar.write(f"{name} step {done}: " + json.dumps({k: v for k, v in rec.items() if k != 'step'}))
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if done % args.save_every == 0 or done in (steps, plan["steps"]):
            save_checkpoint(accelerator, stage_dir, done)
    bar.close()
    log.close()
    model.eval()
    return accelerator.unwrap_model(model)


def save_checkpoint(accelerator, stage_dir: Path, step: int, keep: int = 2) -> None:
    path = stage_dir / f"ckpt-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "progress.json").write_text(json.dumps({"step": step}))
        old = sorted(stage_dir.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)


def export(model, processor, dest: Path) -> None:
    """Round the parameters to float16 and save them as float16 safetensors with a float32 config (so
    ``from_pretrained`` upcasts: users get the float32 model evaluated here), plus the processor and tokenizer; check
    that the folder reloads offline to identical logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = model.to("cpu").eval()
    with torch.no_grad():   # parameters only: buffers such as RoPE's inv_freq are recomputed in float32 at load
        for p in model.parameters():
            p.copy_(p.half().float())
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.json", "*.safetensors", "*.jinja"):   # a previous export (the package's .py files stay)
        for p in dest.glob(pattern):
            p.unlink()
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(dest, state_dict=half, safe_serialization=True)   # config.json keeps dtype float32
    processor.save_pretrained(dest)
    again = AutoModelForImageTextToText.from_pretrained(dest).eval()
    proc2 = AutoProcessor.from_pretrained(dest)
    scenes = [S.make_scene(DEV_SEED, i) for i in range(4)]
    prompts = [f"USER: {IMAGE}\nPlease describe this image in detail. ASSISTANT:"] * 4
    with torch.no_grad():
        a = model(**processor(images=[S.render(s) for s in scenes], text=prompts, return_tensors="pt")).logits
        b = again(**proc2(images=[S.render(s) for s in scenes], text=prompts, return_tensors="pt")).logits
    if again.dtype != torch.float32 or not torch.equal(a, b):
        raise RuntimeError(f"reloaded model differs: dtype {again.dtype}, max |diff| {(a - b).abs().max():.3g}")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/reference"), help="checkpoints, logs, export")
    ap.add_argument("--export", type=Path, default=None, help="where to write the final model (default OUT/model); "
                                                             "vtoolkit/models/reference replaces the shipped one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of each stage")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers rendering scenes (0: in-process)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    ap.add_argument("--vocab-size", type=int, default=640)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-heads", type=int, default=4)
    ap.add_argument("--clip-dim", type=int, default=128)
    ap.add_argument("--clip-text-layers", type=int, default=2)
    ap.add_argument("--clip-text-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=256)
    ap.add_argument("--text-heads", type=int, default=4)
    ap.add_argument("--text-intermediate", type=int, default=704)
    ap.add_argument("--clip-steps", type=int, default=1760)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--lm-steps", type=int, default=2903)
    ap.add_argument("--lm-batch", type=int, default=64)
    ap.add_argument("--lm-lr", type=float, default=5e-4)
    ap.add_argument("--turns", type=int, default=5, help="question/answer turns per training conversation")
    ap.add_argument("--p-caption", type=float, default=0.25, help="share of conversations that are one caption")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--tune-vit", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the ViT in stage 2 at --vit-lr (LLaVA-1.5 freezes it; the shipped model tunes it)")
    ap.add_argument("--vit-lr", type=float, default=2e-4, help="the ViT's learning rate with --tune-vit")
    ap.add_argument("--patch-aux", type=float, default=1.0,
                    help="weight of stage 1's auxiliary loss naming the class under each patch (0: CLIP loss only)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop each stage after this many minutes")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))

    set_seed(args.seed)
    tok = build_tokenizer(args.vocab_size, args.seed)
    processor = build_processor(tok)
    probe = f"USER: {IMAGE}\nIs there a star in the image?{S.SHORT_ANSWER} ASSISTANT:"
    ids = processor(images=[S.render(S.make_scene(DEV_SEED, 0))], text=[probe], return_tensors="pt")["input_ids"][0]
    assert ids.tolist() == encode_conversation(tok, [("Is there a star in the image?" + S.SHORT_ANSWER, "")])[0][
        :len(ids)], "training tokenization differs from the processor's"
    stream = S.TRAIN_SEED + args.seed
    if stream == DEV_SEED or 0 <= stream - S.BENCH_SEED < 100:
        raise SystemExit(f"--seed {args.seed} would train on the dev ({DEV_SEED}) or benchmark ({S.BENCH_SEED}+) scenes")

    # stage 1: CLIP-style pretraining of the ViT
    set_seed(args.seed)
    clip = clip_model(tok, args)
    grid_layer = args.vision_layers - 2   # LLaVA's feature layer (-2) = the layer FasterVLM reads [CLS] attention in
    dev_clip = ClipBatches(tok, processor, 256, DEV_SEED)

    def clip_step(model, batch):
        out_ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], output_hidden_states=args.patch_aux > 0)
        wrapper = accelerator.unwrap_model(model)
        loss = clip_loss(wrapper.clip, out_, batch["same"])
        if args.patch_aux > 0:
            feats = out_.vision_model_output.hidden_states[-2][:, 1:]
            logits = wrapper.patch_head(feats)
            loss = loss + args.patch_aux * torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["patch_labels"].reshape(-1))
        return loss

    def clip_monitor(model):
        model = model.clip
        b = dev_clip[0]
        dev = next(model.parameters()).device
        o = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                  pixel_values=b["pixel_values"].to(dev), output_hidden_states=True)
        n = len(b["same"])
        hit = b["same"].to(dev)[torch.arange(n), o.logits_per_image.argmax(1)]
        pos = o.logits_per_image[torch.arange(n), torch.arange(n)]
        shape_neg = o.logits_per_image[torch.arange(n), n + 2 * torch.arange(n)]
        scenes = dev_clip.scenes(0)
        stats = cls_attention_on_objects(model.vision_model, b["pixel_values"][:64].to(dev), scenes[:64], grid_layer)
        y = torch.tensor([[c in s.classes for c in S.CLASSES] for s in scenes], dtype=torch.float32)
        cls = o.vision_model_output.pooler_output.detach().cpu()
        patches = o.vision_model_output.hidden_states[-2][:, 1:].detach().cpu()
        return {"dev_i2t_acc": round(float(hit.mean()), 4),
                "dev_true_over_shape_swap": round(float((pos > shape_neg).float().mean()), 4),
                "dev_probe_cls": round(presence_probe(cls[:192], y[:192], cls[192:], y[192:]), 4),
                "dev_probe_patches": round(presence_probe(patches[:192], y[:192], patches[192:], y[192:], True), 4),
                **{k: round(v, 4) for k, v in stats.items()}}

    clip = ClipWithPatchHead(clip)
    clip = train_stage("clip", accelerator, clip, [{"params": list(clip.parameters())}],
                       ClipBatches(tok, processor, args.clip_batch, stream), args.clip_steps, args.clip_lr,
                       min(200, args.clip_steps // 5), out, args, clip_step, clip_monitor).clip

    # stage 2: projector + LLM (LLaVA)
    set_seed(args.seed + 1)
    model = llava_model(tok, args)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    del clip
    vit = list(model.model.vision_tower.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    model.model.vision_tower.requires_grad_(args.tune_vit)
    groups = [{"params": rest}] + ([{"params": vit, "lr": args.vit_lr}] if args.tune_vit else [])

    def lm_step(m, batch):
        return m(**batch).loss

    def lm_monitor(m):
        return {"dev_yes_no_acc": round(dev_yes_no(m, tok, processor), 4)}

    model = train_stage("llava", accelerator, model, groups,
                        ChatBatches(tok, processor, args.seed, args.lm_batch, stream, args.turns, args.p_caption),
                        args.lm_steps, args.lm_lr, min(200, args.lm_steps // 5), out, args, lm_step, lm_monitor)

    if accelerator.is_main_process:
        dest = args.export or out / "model"
        export(model, processor, dest)
        minutes = (time.time() - t_start) / 60
        summary = {"export": str(dest), "minutes": round(minutes, 1),
                   "cpu_minutes": round(time.process_time() / 60, 1),
                   "params": sum(p.numel() for p in model.parameters()), "device": str(accelerator.device),
                   "threads": torch.get_num_threads()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
