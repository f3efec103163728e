"""Tiny synthetic benchmark folders in every supported layout, for tests, examples and offline demos.

The images are generated with PIL (:func:`vtoolkit.models.tiny.demo_image`); questions and labels follow each
benchmark's real format, so the loaders, runner and scorers see the same files they would on real data.

- :func:`make_pope_json` -- official POPE question files (JSON Lines, one per split) + an image folder
- :func:`make_pope_parquet` -- the lmms-lab/POPE parquet layout (``data/test-00000-of-00001.parquet``)
- :func:`make_mme_folder` -- the official ``MME_Benchmark_release_version`` layout (split and plain subtasks)
- :func:`make_mme_parquet` -- the lmms-lab/MME parquet layout
- :func:`make_coco` -- a COCO val2014 image folder + ``annotations/{instances,captions}_val2014.json``
- :func:`make_hallusionbench` -- the official ``HallusionBench.json`` + ``hallusion_bench/<VD|VS>/<sub>/<set>_<fig>.png``
  (VD and VS sets, original and edited figures, VS questions without a figure)
- :func:`make_amber` -- the AMBER ``data/`` layout: ``query/query_discriminative.json``, ``annotations.json``
  (generative entries first, as the real file) and ``image/AMBER_<n>.jpg``

Parquet files carry the ``huggingface`` schema metadata (``image`` is an HF ``Image`` feature), so
``datasets.load_dataset("parquet", ...)`` -- and therefore lmms-eval -- decodes the images to PIL.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

OBJECTS = ["dog", "cat", "person", "car", "chair", "bottle", "apple", "umbrella"]


def _img(seed: int, size=(64, 48)):
    from vtoolkit.models.tiny import demo_image

    return demo_image(seed, size)


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    _img(seed).save(buf, format="PNG")
    return buf.getvalue()


def _coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def pope_rows(n_images: int = 2, splits=("random", "popular"), per_image: int = 2) -> list[dict]:
    """POPE-style questions: per split, ``per_image`` questions per image alternating yes/no."""
    rows = []
    for split in splits:
        qid = 0
        for i in range(n_images):
            for k in range(per_image):
                qid += 1
                obj = OBJECTS[(i + k + len(split)) % len(OBJECTS)]
                art = "an" if obj[0] in "aeiou" else "a"
                rows.append({"split": split, "question_id": qid, "image": _coco_name(100 + i),
                             "text": f"Is there {art} {obj} in the image?", "label": "yes" if k % 2 == 0 else "no"})
    return rows


def make_pope_json(root, n_images: int = 2, splits=("random", "popular"), per_image: int = 2) -> Path:
    """``root/coco_pope_<split>.json`` (JSON Lines, CRLF for 'popular' as the official file) + ``root/images``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        _img(100 + i).save(root / "images" / _coco_name(100 + i))
    rows = pope_rows(n_images, splits, per_image)
    for split in splits:
        nl = "\r\n" if split == "popular" else "\n"
        lines = [json.dumps({k: v for k, v in r.items() if k != "split"}) for r in rows if r["split"] == split]
        (root / f"coco_pope_{split}.json").write_text(nl.join(lines) + nl, encoding="utf-8")
    return root


def _write_parquet(path: Path, columns: dict, features: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, values in columns.items():
        if features[name] == "image":
            arrays[name] = pa.array(values, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        else:
            arrays[name] = pa.array(values, type=pa.string())
    table = pa.table(arrays)
    hf = {"info": {"features": {n: ({"_type": "Image"} if t == "image" else {"dtype": "string", "_type": "Value"})
                                for n, t in features.items()}}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()})
    pq.write_table(table, path, row_group_size=4)


def make_pope_parquet(root, n_images: int = 2, splits=("adversarial", "random"), per_image: int = 2) -> Path:
    """lmms-lab/POPE layout: ``root/data/test-00000-of-00001.parquet`` with id, question_id, question, answer,
    image_source, image, category."""
    root = Path(root)
    rows = pope_rows(n_images, splits, per_image)
    cols = {"id": [], "question_id": [], "question": [], "answer": [], "image_source": [], "image": [],
            "category": []}
    for n, r in enumerate(rows):
        cols["id"].append(str(n))
        cols["question_id"].append(str(n + 1))
        cols["question"].append(r["text"])
        cols["answer"].append(r["label"])
        cols["image_source"].append(r["image"].rsplit(".", 1)[0])
        cols["image"].append({"bytes": _png_bytes(100 + int(r["image"][-8:-4]) - 100), "path": None})
        cols["category"].append(r["split"])
    feats = {k: ("image" if k == "image" else "string") for k in cols}
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", cols, feats)
    return root


MME_DEMO_TASKS = {"existence": "plain", "OCR": "plain", "artwork": "split", "code_reasoning": "plain"}


def make_mme_folder(root, n_images: int = 2, tasks=None) -> Path:
    """Official layout: ``root/<task>/<id>.png`` + ``<id>.txt`` (plain) or ``<task>/images`` +
    ``<task>/questions_answers_YN`` (split subtasks); two ``question<TAB>Yes|No`` lines per image."""
    root = Path(root)
    for t_i, (task, kind) in enumerate((tasks or MME_DEMO_TASKS).items()):
        tdir = root / task
        idir, qdir = (tdir / "images", tdir / "questions_answers_YN") if kind == "split" else (tdir, tdir)
        idir.mkdir(parents=True, exist_ok=True)
        qdir.mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            stem = f"{i:04d}"
            _img(200 + 10 * t_i + i).save(idir / (stem + (".jpg" if kind == "split" else ".png")))
            obj = OBJECTS[(i + t_i) % len(OBJECTS)]
            (qdir / f"{stem}.txt").write_text(
                f"Is there a {obj} in this image? Please answer yes or no.\tYes\n"
                f"Is there a {OBJECTS[(i + t_i + 3) % len(OBJECTS)]} in this image? Please answer yes or no.\tNo\n",
                encoding="utf-8")
    return root


def make_mme_parquet(root, n_images: int = 2, tasks=None) -> Path:
    """lmms-lab/MME layout: ``root/data/test-00000-of-00001.parquet`` with question_id (image path), question,
    answer, category, image."""
    root = Path(root)
    cols = {"question_id": [], "question": [], "answer": [], "category": [], "image": []}
    for t_i, task in enumerate(tasks or MME_DEMO_TASKS):
        for i in range(n_images):
            img = _png_bytes(200 + 10 * t_i + i)
            for k, ans in enumerate(("Yes", "No")):
                obj = OBJECTS[(i + t_i + 3 * k) % len(OBJECTS)]
                cols["question_id"].append(f"{task}/{i:04d}.png")
                cols["question"].append(f"Is there a {obj} in this image? Please answer yes or no.")
                cols["answer"].append(ans)
                cols["category"].append(task)
                cols["image"].append({"bytes": img, "path": None})
    feats = {k: ("image" if k == "image" else "string") for k in cols}
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", cols, feats)
    return root


COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 18, "name": "dog", "supercategory": "animal"},
                   {"id": 62, "name": "chair", "supercategory": "furniture"}]


def make_coco(root, n_images: int = 6) -> Path:
    """``root/val2014/COCO_val2014_<id>.jpg`` + ``root/annotations/{instances,captions}_val2014.json``."""
    root = Path(root)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, inst, caps = [], [], []
    for i in range(n_images):
        iid = 1000 + 7 * i
        name = _coco_name(iid)
        _img(300 + i).save(root / "val2014" / name)
        images.append({"id": iid, "file_name": name, "height": 48, "width": 64})
        cat = COCO_CATEGORIES[i % len(COCO_CATEGORIES)]
        inst.append({"id": 10 * i + 1, "image_id": iid, "category_id": cat["id"], "bbox": [0, 0, 10, 10],
                     "area": 100.0, "iscrowd": 0, "segmentation": []})
        caps.append({"id": 10 * i + 2, "image_id": iid, "caption": f"A {cat['name']} next to a man."})
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": inst, "categories": COCO_CATEGORIES}), encoding="utf-8")
    (root / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": images, "annotations": caps}), encoding="utf-8")
    return root


def make_hallusionbench(root, n_sets: int = 2) -> Path:
    """``root/HallusionBench.json`` (the official keys) + ``root/hallusion_bench/...`` figures. Per set: a VD set
    (figures 0 and 1, two questions each) and a VS set (the same two questions without a figure, then on figures 1
    and 2), so fAcc / qAcc groups and image-free questions all occur."""
    root = Path(root)
    rows = []
    for s_id in range(n_sets):
        for cat, sub, figs in (("VD", "illusion", (0, 1)), ("VS", "chart", (0, 1, 2))):
            for fig in figs:
                visual = "0" if (cat == "VS" and fig == 0) else ("1" if fig <= 1 else "2")
                name = None
                if visual != "0":
                    rel = Path("hallusion_bench") / cat / sub / f"{s_id}_{fig}.png"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    _img(500 + 10 * s_id + fig + (5 if cat == "VS" else 0)).save(root / rel)
                    name = f"./{rel.as_posix()}"
                for q in range(2):
                    obj = OBJECTS[(s_id + q) % len(OBJECTS)]
                    art = "an" if obj[0] in "aeiou" else "a"
                    yes = (s_id + fig + q) % 2 == 0
                    rows.append({"category": cat, "subcategory": sub, "visual_input": visual, "set_id": str(s_id),
                                 "figure_id": str(fig), "sample_note": "demo", "question_id": str(q),
                                 "question": f"Is there {art} {obj} in the figure?",
                                 "gt_answer_details": f"There is {'' if yes else 'no '}{obj}.",
                                 "gt_answer": "1" if yes else "0", "filename": name})
    (root).mkdir(parents=True, exist_ok=True)
    (root / "HallusionBench.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return root


AMBER_TYPES = ("discriminative-hallucination", "discriminative-attribute-state", "discriminative-attribute-number",
               "discriminative-attribute-action", "discriminative-relation")


def make_amber(root, n_images: int = 3, n_generative: int = 2) -> Path:
    """The AMBER ``data/`` layout under ``root``: ``annotations.json`` (``n_generative`` generative entries, then one
    discriminative question per type and image, truth alternating yes/no), ``query/query_discriminative.json`` and
    ``image/AMBER_<n>.jpg``. Returns ``root``."""
    root = Path(root)
    (root / "query").mkdir(parents=True, exist_ok=True)
    (root / "image").mkdir(parents=True, exist_ok=True)
    annotations, queries = [], []
    for g in range(n_generative):
        annotations.append({"id": g + 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]})
    for i in range(n_images):
        _img(700 + i).save(root / "image" / f"AMBER_{i + 1}.jpg")
    k = 0
    for i in range(n_images):
        for t, kind in enumerate(AMBER_TYPES):
            k += 1
            qid = n_generative + k
            obj = OBJECTS[(i + t) % len(OBJECTS)]
            art = "an" if obj[0] in "aeiou" else "a"
            text = {"discriminative-hallucination": f"Is there {art} {obj} in this image?",
                    "discriminative-attribute-state": f"Is the {obj} red?",
                    "discriminative-attribute-number": f"Are there two {obj}s in this image?",
                    "discriminative-attribute-action": f"Is the {obj} running?",
                    "discriminative-relation": f"Is the {obj} next to the table?"}[kind]
            annotations.append({"id": qid, "type": kind, "truth": "yes" if k % 2 else "no"})
            queries.append({"id": qid, "image": f"AMBER_{i + 1}.jpg", "query": text})
    (root / "annotations.json").write_text(json.dumps(annotations, indent=1), encoding="utf-8")
    (root / "query" / "query_discriminative.json").write_text(json.dumps(queries, indent=1), encoding="utf-8")
    return root
