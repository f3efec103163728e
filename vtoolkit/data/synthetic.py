"""Synthetic POPE / MME / CHAIR benchmarks from held-out procedural scenes, in the official file formats.

The files are those the harness (:mod:`vtoolkit.eval.datasets`) reads for the real benchmarks, so ``vtoolkit eval``,
sweeps, reports and the lmms-eval plugin see nothing special; only CHAIR needs ``scorer_rule="synthetic"`` (the
synthetic vocabulary, :data:`PROTOCOL`). Scenes come from :data:`vtoolkit.data.scenes.BENCH_SEED` (offset per
benchmark), never from the training seed. Images are 64 x 64 PNG (lossless: the pixels the generator drew).

POPE (``<root>/pope``) -- RUCAIBox/POPE ``main.py`` + ``utils.py`` rules, ported: the ground-truth object list of an
    image is its scene's ``classes``; images with >= ``sample_num`` (3) objects are kept, ``img_num`` of them drawn
    with ``random.sample``; per image, for each of its **first 3 objects in list order**: a "yes" question, then one
    "no" question whose object is, by strategy,
    ``random``: ``random.choice`` over all objects of the selected images, re-drawn while it is in the image or was
    already asked about for this image;
    ``popular``: the first object of the frequency ranking over the selected images (ties in first-seen order) that
    is neither in the image nor already asked;
    ``adversarial``: the first eligible object of the current positive object's co-occurrence ranking (counts over
    the selected images, ties in first-seen order); if none is eligible, a random one as in ``random``.
    One ``random.Random(seed)`` drives the image sample and then the three strategies in that order (the official
    script shares the module RNG the same way). Deviation: where the original would loop forever (no object left
    that is neither in the image nor asked), we raise. Template "Is there a {} in the image?", with "an" before a vowel
    (the current official files' wording; the 2023 builder's "imange" typo is not reproduced). Files:
    ``shapes_pope_{random,popular,adversarial}.json`` (JSON Lines: question_id, image, text, label),
    ``images/``, and the builder's input ``annotations/shapes_ground_truth_segmentation.json``.
MME (``<root>/mme``) -- the ``MME_Benchmark_release_version`` layout for the subtasks ``existence``, ``count``,
    ``position``, ``color``: ``<task>/<id>.png`` next to ``<task>/<id>.txt`` holding two ``question<TAB>Yes|No``
    lines (the "Yes" question first), every question ending in " Please answer yes or no.". Per image one true and
    one false statement about the same scene: existence (a present class / an absent one), count (the true count /
    another of 1-4 for the same class), position (the side of a class's single, clearly off-centre instance / the
    opposite side), colour (the true colour of a class / another colour).
CHAIR (``<root>/chair``) -- a COCO-style folder: ``val2014/shapes_<id>.png`` and ``annotations/instances_val2014.json``
    (one instance per object, the 10 classes as categories) + ``captions_val2014.json`` (the reference caption);
    ground truth = instance classes + classes named by the reference caption, as for COCO. Score with
    ``scorer_rule="synthetic"`` (:mod:`vtoolkit.eval.scorers.chair`: regex tokens + :data:`SYNONYMS`, no NLTK).
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from vtoolkit.data import scenes as S

__all__ = ["BENCH_OFFSETS", "DATASET", "PROTOCOL", "amber_questions", "compute_co_occurrence", "ground_truth_objects",
           "make_amber", "make_chair", "make_hallusionbench", "make_mme", "make_pope", "mme_pairs", "pope_questions",
           "select_pope_images", "write_benchmarks"]

DATASET = "shapes"
POPE_TEMPLATE = "Is there a {} in the image?"
BENCH_OFFSETS = {"pope": 0, "existence": 1, "count": 2, "position": 3, "color": 4, "chair": 5, "amber": 6,
                 "hallusionbench": 7}
MME_TASKS = ("existence", "count", "position", "color")
# protocol overrides for the synthetic benchmarks: answers are a word, captions a sentence (the harness defaults,
# 128 / 16 / 512 new tokens, only cost time when a model does not stop); CHAIR scored with the synthetic vocabulary
PROTOCOL = {"pope": {"max_new_tokens": 8}, "mme": {"max_new_tokens": 8},
            "chair": {"max_new_tokens": 64, "scorer_rule": "synthetic", "n_images": None},
            "amber": {"max_new_tokens": 8, "scorer_rule": "vlmevalkit"}, "hallusionbench": {"max_new_tokens": 8}}


def _save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------ POPE
def _question(qid: int, image: str, obj: str, label: str, template: str = POPE_TEMPLATE) -> dict:
    text = template.format(obj) if obj[0] not in "aeiou" else template.replace(" a {}", " an {}").format(obj)
    return {"question_id": qid, "image": image, "text": text, "label": label}


def ground_truth_objects(images: Sequence[Mapping]) -> dict[str, int]:
    """``{object: number of images holding it}`` in first-seen order (POPE ``generate_ground_truth_objects``)."""
    counts: dict[str, int] = {}
    for im in images:
        for o in im["objects"]:
            counts[o] = counts.get(o, 0) + 1
    return counts


def compute_co_occurrence(images: Sequence[Mapping]) -> dict[str, list[str]]:
    """Per object, the other objects sorted by how many images they share with it, most first, ties in first-seen
    order (POPE ``compute_co_occurrence``)."""
    co: dict[str, dict[str, int]] = {}
    for im in images:
        objs = im["objects"]
        for o in objs:
            row = co.setdefault(o, {})
            for other in objs:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    return {o: [k for k, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)] for o, row in co.items()}


def select_pope_images(images: Sequence[Mapping], img_num: int, rng: random.Random, sample_num: int = 3) -> list:
    """POPE ``main.py``: keep images with >= ``sample_num`` objects, then ``rng.sample`` ``img_num`` of them."""
    kept = [im for im in images if len(im["objects"]) >= sample_num]
    if len(kept) < img_num:
        raise ValueError(f"only {len(kept)} images hold >= {sample_num} objects; {img_num} requested")
    return rng.sample(kept, img_num)


def pope_questions(images: Sequence[Mapping], strategy: str, rng: random.Random, sample_num: int = 3,
                   template: str = POPE_TEMPLATE) -> list[dict]:
    """POPE questions for ``images`` (``[{"image", "objects"}]``) with negative ``strategy`` random | popular |
    adversarial, exactly as POPE ``utils.pope`` (random draws from ``rng``)."""
    if strategy not in ("random", "popular", "adversarial"):
        raise ValueError(f"unknown POPE strategy {strategy!r}; choose random, popular or adversarial")
    gt = ground_truth_objects(images)
    gt_list = list(gt)
    popular = [k for k, _ in sorted(gt.items(), key=lambda kv: kv[1], reverse=True)]
    co = compute_co_occurrence(images)
    out: list[dict] = []

    def draw_random(history, objects):
        if all(o in history or o in objects for o in gt_list):   # the original would loop forever here
            raise ValueError(f"POPE {strategy}: no object left to ask about for an image holding {objects} "
                             f"(objects of the selected images: {gt_list}); select more images")
        obj = rng.choice(gt_list)
        while obj in history or obj in objects:
            obj = rng.choice(gt_list)
        return obj

    for im in images:
        objects, history = im["objects"], []
        for i in range(sample_num):
            pos = objects[i]
            history.append(pos)
            out.append(_question(len(out) + 1, im["image"], pos, "yes", template))
            if strategy == "random":
                neg = draw_random(history, objects)
            else:
                ranking = popular if strategy == "popular" else co[pos]
                neg = next((o for o in ranking if o not in history and o not in objects), None)
                if neg is None:
                    neg = draw_random(history, objects)
            history.append(neg)
            out.append(_question(len(out) + 1, im["image"], neg, "no", template))
    return out


def make_pope(root: str | Path, img_num: int = 50, seed: int = S.BENCH_SEED, pool: int | None = None) -> Path:
    """Write the three POPE splits over ``img_num`` held-out scenes into ``root`` (see the module docstring)."""
    root = Path(root)
    stream = seed + BENCH_OFFSETS["pope"]
    pool = pool or max(4 * img_num, 40)
    all_scenes = {f"{DATASET}_{i:06d}.png": S.make_scene(stream, i) for i in range(pool)}
    images = [{"image": name, "objects": list(sc.classes)} for name, sc in all_scenes.items()]
    rng = random.Random(seed)
    chosen = select_pope_images(images, img_num, rng)
    for im in chosen:
        _save(S.render(all_scenes[im["image"]]), root / "images" / im["image"])
    ann = root / "annotations" / f"{DATASET}_ground_truth_segmentation.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text("".join(json.dumps(im) + "\n" for im in chosen), encoding="utf-8")
    for strategy in ("random", "popular", "adversarial"):
        rows = pope_questions(chosen, strategy, rng)
        (root / f"{DATASET}_pope_{strategy}.json").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                                               encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------ MME
def mme_pairs(task: str, scene: S.Scene, rng: random.Random) -> tuple[str, str] | None:
    """(Yes question, No question) of MME subtask ``task`` about ``scene``, or None if the scene cannot support it."""
    classes = list(scene.classes)
    if task == "existence":
        absent = [c for c in S.CLASSES if c not in classes]
        yes, no = rng.choice(classes), rng.choice(absent)
        q = [f"Is there {S.with_article(c)} in this image?" for c in (yes, no)]
    elif task == "count":
        c = rng.choice(classes)
        n = scene.count(c)
        q = [S.count_question(c, n), S.count_question(c, rng.choice([k for k in (1, 2, 3, 4) if k != n]))]
    elif task == "position":
        options = [(c, scene.side(c, axis)) for c in classes for axis in ("x", "y")]
        options = [o for o in options if o[1] is not None]
        if not options:
            return None
        c, side = rng.choice(options)
        q = [S.position_question(c, side), S.position_question(c, S.OPPOSITE[side])]
    elif task == "color":
        c = rng.choice(classes)
        true = scene.color_of(c)
        other = rng.choice([k for k in S.COLORS if k != true])
        q = [f"Is there {S.with_article(col + ' ' + c)} in this image?" for col in (true, other)]
    else:
        raise ValueError(f"unknown synthetic MME task {task!r}; choose from {', '.join(MME_TASKS)}")
    return q[0] + S.MME_SUFFIX, q[1] + S.MME_SUFFIX


def make_mme(root: str | Path, n_images: int = 30, seed: int = S.BENCH_SEED, tasks: Sequence[str] = MME_TASKS) -> Path:
    """Write ``n_images`` images x 2 questions per subtask in the official MME folder layout into ``root``."""
    root = Path(root)
    for task in tasks:
        rng = random.Random(seed * 100 + BENCH_OFFSETS[task])
        written, i = 0, 0
        while written < n_images:
            scene = S.make_scene(seed + BENCH_OFFSETS[task], i)
            i += 1
            pair = mme_pairs(task, scene, rng)
            if pair is None:
                continue
            stem = f"{written:04d}"
            _save(S.render(scene), root / task / f"{stem}.png")
            (root / task / f"{stem}.txt").write_text(f"{pair[0]}\tYes\n{pair[1]}\tNo\n", encoding="utf-8")
            written += 1
    return root


# ------------------------------------------------------------------------------------------------ CHAIR
def make_chair(root: str | Path, n_images: int = 100, seed: int = S.BENCH_SEED) -> Path:
    """Write ``n_images`` scenes as a COCO-style CHAIR folder (images + instances/captions annotations) into ``root``."""
    root = Path(root)
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(S.CLASSES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, instances, captions = [], [], []
    for i in range(n_images):
        scene = S.make_scene(seed + BENCH_OFFSETS["chair"], i)
        image_id = i + 1
        name = f"{DATASET}_{image_id:012d}.png"
        _save(S.render(scene), root / "val2014" / name)
        images.append({"id": image_id, "file_name": name, "height": S.CANVAS, "width": S.CANVAS})
        for o in scene.objects:
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": cat_id[o.cls],
                              "bbox": [round(v, 2) for v in o.bbox], "area": round(math.pi * o.r ** 2, 2),
                              "iscrowd": 0, "segmentation": [], "color": o.color})
        captions.append({"id": image_id, "image_id": image_id, "caption": S.caption(scene)})
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "instances_val2014.json").write_text(json.dumps({"images": images, "annotations": instances,
                                                            "categories": categories}), encoding="utf-8")
    (ann / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}),
                                               encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------ AMBER
def _left_of(scene: S.Scene, a: str, b: str, margin: float = 0.12) -> bool | None:
    """Whether ``a``'s single instance is left of ``b``'s (None: several instances, or too close to tell)."""
    ia, ib = scene.instances(a), scene.instances(b)
    if len(ia) != 1 or len(ib) != 1 or abs(ia[0].x - ib[0].x) < margin * S.CANVAS:
        return None
    return ia[0].x < ib[0].x


def amber_questions(scene: S.Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """``(type, query, truth)`` AMBER discriminative questions about ``scene`` for the types the scenes have:
    existence (``discriminative-hallucination``: a present class / an absent one), attribute state (colour: the true
    colour / another), attribute number (the true count / another of 1-4) and relation (left of, between two classes
    with one clearly placed instance each; true and reversed). Actions do not exist in the scenes: no
    ``-attribute-action`` question."""
    classes = list(scene.classes)
    out = []
    absent = [c for c in S.CLASSES if c not in classes]
    for c, truth in ((rng.choice(classes), "yes"), (rng.choice(absent), "no")):
        out.append(("discriminative-hallucination", f"Is there {S.with_article(c)} in this image?", truth))
    c = rng.choice(classes)
    true = scene.color_of(c)
    col = true if rng.random() < 0.5 else rng.choice([k for k in S.COLORS if k != true])
    out.append(("discriminative-attribute-state", f"Is the {c} {col}?", "yes" if col == true else "no"))
    c = rng.choice(classes)
    n = scene.count(c)
    k = n if rng.random() < 0.5 else rng.choice([m for m in (1, 2, 3, 4) if m != n])
    out.append(("discriminative-attribute-number", S.count_question(c, k), "yes" if k == n else "no"))
    pairs = [(a, b) for a in classes for b in classes if a != b and _left_of(scene, a, b) is not None]
    if pairs:
        a, b = rng.choice(pairs)
        left = _left_of(scene, a, b)
        flip = rng.random() < 0.5
        x, y = (b, a) if flip else (a, b)
        out.append(("discriminative-relation", f"Is the {x} to the left of the {y}?", "yes" if left != flip else "no"))
    return out


def make_amber(root: str | Path, n_images: int = 30, seed: int = S.BENCH_SEED) -> Path:
    """The AMBER ``data/`` layout (``annotations.json``, ``query/query_discriminative.json``, ``image/``) with
    :func:`amber_questions` about ``n_images`` held-out scenes, read by ``--data amber=ROOT``."""
    root = Path(root)
    rng = random.Random(seed * 100 + BENCH_OFFSETS["amber"])
    annotations, queries = [], []
    for i in range(n_images):
        scene = S.make_scene(seed + BENCH_OFFSETS["amber"], i)
        name = f"AMBER_{i + 1}.png"
        _save(S.render(scene), root / "image" / name)
        for kind, query, truth in amber_questions(scene, rng):
            qid = len(annotations) + 1
            annotations.append({"id": qid, "type": kind, "truth": truth})
            queries.append({"id": qid, "image": name, "query": query})
    (root / "query").mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(annotations), encoding="utf-8")
    (root / "query" / "query_discriminative.json").write_text(json.dumps(queries), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------ HallusionBench
def make_hallusionbench(root: str | Path, n_sets: int = 30, seed: int = S.BENCH_SEED) -> Path:
    """``HallusionBench.json`` + ``hallusion_bench/VD/shapes/<set>_<figure>.png``: per set a held-out scene (figure 0)
    and its edit (figure 1: every instance of one class removed), two questions asked on both figures ("Is there a
    <removed class> in the figure?": yes, then no; "Is there a <kept class> ...?": yes on both), so fAcc and qAcc
    need the edit to be seen. Only visual-dependent (VD) sets: the scenes carry no knowledge a question could be
    answered from without the figure, so there are no VS sets."""
    import dataclasses

    root = Path(root)
    rng = random.Random(seed * 100 + BENCH_OFFSETS["hallusionbench"])
    rows, s_id, i = [], 0, 0
    while s_id < n_sets:
        scene = S.make_scene(seed + BENCH_OFFSETS["hallusionbench"], i, min_classes=2)
        i += 1
        if len(scene.classes) < 2:
            continue
        gone = rng.choice(list(scene.classes))
        kept = rng.choice([c for c in scene.classes if c != gone])
        edited = dataclasses.replace(scene, classes=tuple(c for c in scene.classes if c != gone),
                                     objects=tuple(o for o in scene.objects if o.cls != gone))
        for fig, sc in ((0, scene), (1, edited)):
            rel = Path("hallusion_bench") / "VD" / DATASET / f"{s_id}_{fig}.png"
            _save(S.render(sc), root / rel)
            for q, (c, yes) in enumerate(((gone, fig == 0), (kept, True))):
                rows.append({"category": "VD", "subcategory": DATASET, "visual_input": "1" if fig == 0 else "2",
                             "set_id": str(s_id), "figure_id": str(fig), "sample_note": "synthetic shapes",
                             "question_id": str(q), "question": f"Is there {S.with_article(c)} in the figure?",
                             "gt_answer_details": f"There is {'a' if yes else 'no'} {c}.",
                             "gt_answer": "1" if yes else "0", "filename": f"./{rel.as_posix()}"})
        s_id += 1
    (root / "HallusionBench.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------ all
def write_benchmarks(root: str | Path, *, pope_images: int = 50, mme_images: int = 30, chair_images: int = 100,
                     seed: int = S.BENCH_SEED) -> dict[str, Path]:
    """Write the three benchmarks under ``root`` (``pope/``, ``mme/``, ``chair/``); returns ``{bench: folder}``, ready
    for ``vtoolkit eval --data pope=... --data mme=... --data chair=...`` with :data:`PROTOCOL`."""
    root = Path(root)
    return {"pope": make_pope(root / "pope", pope_images, seed), "mme": make_mme(root / "mme", mme_images, seed),
            "chair": make_chair(root / "chair", chair_images, seed)}
