"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination in free captions against COCO ground truth.

Data layout
-----------
``coco``: a COCO val2014 image folder (``path`` itself or ``path/val2014``) and, for scoring, the annotation folder
(``annotations=``, default ``path/annotations``) or a prebuilt per-image GT file (``gt=``). A seeded subset of
``protocol.n_images`` images is drawn from the *sorted* file list (OPERA shuffles ``os.listdir``, which is not
reproducible across machines).

Protocol (defaults): ``"Please describe this image in detail."`` on 500 COCO val2014 images drawn with a seeded RNG;
greedy, ``max_new_tokens=512`` (OPERA's script; the short-caption setting uses 64); the ``wordnet`` (OPERA) tokenizer
profile. Where the original divides by zero (CHAIRi when no caption mentions an object) the benchmark is left *not
scored*, with the reason; ``--set chair.zero_division=zero`` reports 0. The captions are also written in the OPERA /
Maxlinn format into the run folder (``chair_captions.jsonl``: ``{"image_id", "caption"}``).
"""
from __future__ import annotations

import json
import random
import re
from enum import Enum
from pathlib import Path

import typer

from vtoolkit.config import ConfigError
from vtoolkit.eval.benchmark import Benchmark, register_benchmark
from vtoolkit.eval.cli_score import ZeroDivision, _err_text, _fail, _print, _print_json, _table, _zd
from vtoolkit.eval.datasets import IMAGE_EXTS, Dataset, DataSpec, write_jsonl_atomic


class ChairVariant(str, Enum):
    opera = "opera"
    original = "original"
    synthetic = "synthetic"


@register_benchmark("chair")
class CHAIR(Benchmark):
    title = "CHAIR"
    description = "object hallucination in detailed captions (COCO val2014); CHAIRs, CHAIRi, recall, length"
    layouts = ("coco",)
    rules = ("wordnet", "pattern", "opera", "original", "synthetic")   # synthetic: vtoolkit.data.synthetic
    defaults = {"fixed_question": "Please describe this image in detail.", "max_new_tokens": 512,
                "scorer_rule": "wordnet", "n_images": 500, "seed": 0,
                "source": "OPERA chair_eval.py: 500 random COCO val2014 images, 'Please describe this image in "
                          "detail.', greedy, 512 new tokens; OPERA (wordnet) CHAIR"}
    headline = "CHAIRs"
    higher_is_better = False
    unit = "fraction of captions"
    metrics = (("CHAIRi", ("overall", "CHAIRi")), ("recall", ("overall", "Recall")), ("len", ("overall", "avg_len")))
    artifacts = ("chair_captions.jsonl",)
    data_example = "/data/coco"

    def detect_layout(self, path: Path) -> str:
        if path.is_file():
            if not path.exists():
                raise FileNotFoundError(f"chair data not found: {path}")
            raise ConfigError(f"chair: expected a folder, got the file {path}")
        return super().detect_layout(path)

    def check_data(self, spec: DataSpec) -> None:
        if not (spec.gt or spec.annotations or (Path(spec.path) / "annotations").is_dir()):
            raise ConfigError(f"chair: no ground truth for scoring: give a COCO annotations folder "
                              f"(annotations=DIR, default {Path(spec.path) / 'annotations'}) or gt=FILE")

    def load(self, spec: DataSpec, layout: str, protocol) -> Dataset:
        return _chair_coco(spec, protocol.n_images, protocol.seed)

    def score(self, valid, protocol, dataset, out_dir) -> dict:
        return _score_chair(valid, protocol, dataset, out_dir)

    def add_score_command(self, app) -> None:
        app.command(self.name)(chair_cmd)


_COCO_ID = re.compile(r"(\d+)\.[A-Za-z]+$")


def _chair_coco(spec: DataSpec, n_images: int | None, seed: int) -> Dataset:
    root = Path(spec.path)
    if spec.images:
        img_dir = Path(spec.images)
    else:
        img_dir = next((c for c in (root / "val2014", root / "images" / "val2014", root / "images") if c.is_dir()),
                       root)
    files = sorted(p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"CHAIR: no images in {img_dir}")
    total = len(files)
    if n_images is not None and n_images < total:
        picked = sorted(random.Random(seed).sample(range(total), n_images))
        files = [files[i] for i in picked]
    records = []
    for name in files:
        m = _COCO_ID.search(name)
        rec = {"id": None, "bench": "chair", "split": None, "image": name, "image_id": int(m.group(1)) if m else None,
               "question": None, "label": None, "error": None, "_ref": ("path", str(img_dir / name))}
        if m is None:
            rec["error"] = f"cannot parse a COCO image id from {name!r}"
            rec["id"] = f"chair/{name}"
        else:
            rec["id"] = f"chair/{rec['image_id']}"
        records.append(rec)
    ann = spec.annotations or (str(root / "annotations") if (root / "annotations").is_dir() else None)
    info = {"images": str(img_dir), "n_available": total, "n_images": n_images, "seed": seed,
            "selection": "random.Random(seed).sample over the sorted file list",
            "image_ids": [r["image_id"] for r in records], "annotations": ann, "gt": spec.gt}
    return Dataset("chair", records, "coco", info)


def _score_chair(valid, protocol, dataset, out_dir) -> dict:
    from vtoolkit.eval.scorers import chair as chair_mod

    caps = [{"image_id": r["image_id"], "caption": r["prediction"]} for r in valid]
    if out_dir is not None:
        write_jsonl_atomic(Path(out_dir) / "chair_captions.jsonl", caps)
    info = dataset.info if dataset is not None else {}
    variant = {"wordnet": "opera", "pattern": "original"}.get(protocol.scorer_rule, protocol.scorer_rule)
    if info.get("gt"):
        gt = chair_mod.load_gt(info["gt"])
    elif info.get("annotations"):
        gt = chair_mod.build_gt_from_coco(info["annotations"], variant=variant)
    else:
        raise FileNotFoundError("CHAIR needs ground truth: a COCO annotations folder (--set data.chair.annotations=DIR)"
                                " or a prebuilt {image_id: [objects]} file (--set data.chair.gt=FILE)")
    res = chair_mod.score_chair(caps, gt, variant, zero_division=protocol.zero_division)
    ov = res.overall
    return {"variant": res.variant, "overall": ov, "headline": ov["CHAIRs"],
            "headline_name": "CHAIRs (lower is better)", "higher_is_better": False}


def chair_cmd(
    captions: Path = typer.Option(..., "--captions", "-c", help="generated captions: JSONL/JSON with image_id + "
                                  "caption (OPERA/HALC logs), or {'imgToEval': ...}"),
    gt: Path | None = typer.Option(None, "--gt", "-g", help="prebuilt ground truth {image_id: [objects]} "
                                      "(.json or .json.gz)"),
    gt_overlay: Path | None = typer.Option(None, "--gt-overlay", help="per-image GT replacements applied on top "
                                              "of --gt (e.g. the pattern-variant diff)"),
    coco_annotations: Path | None = typer.Option(None, "--coco-annotations", help="instead of --gt: COCO 2014 "
                                                    "annotations dir (instances_* + captions_*); slow"),
    variant: ChairVariant = typer.Option(ChairVariant.opera, "--variant", help="opera (NLTK WordNet; OPERA/HALC/"
                                         "lmms-eval), original (pattern singularize; Rohrbach et al.) or synthetic "
                                         "(the synthetic scenes of vtoolkit demo / ref:shapes; no NLTK data)"),
    image_id_key: str = typer.Option("image_id", "--image-id-key"),
    caption_key: str = typer.Option("caption", "--caption-key"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="custom synonym file (one line per object, "
                                            "'node, syn1, syn2')"),
    unknown_image: str = typer.Option("error", "--unknown-image", help="error | empty (original behaviour)"),
    zero_division: ZeroDivision = typer.Option(ZeroDivision.original, "--zero-division",
                                               help="original/raise: like the scripts; zero: report 0"),
    nltk_compat: str = typer.Option("3.9", "--nltk-compat", help="3.9 (tokens as NLTK 3.9.1-3.10.0, reproduces "
                                    "published Len) | installed"),
    save: Path | None = typer.Option(None, "--save", help="write overall + per-caption details to this JSON"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """CHAIRs, CHAIRi, Recall and Len of generated captions against COCO ground-truth objects."""
    from vtoolkit.eval.scorers.chair import CHAIR, ChairResourceError, build_gt_from_coco, load_captions, load_gt

    if (gt is None) == (coco_annotations is None):
        _fail("pass exactly one of --gt and --coco-annotations")
    if unknown_image not in ("error", "empty"):
        _fail("--unknown-image must be error or empty")
    if nltk_compat not in ("3.9", "installed"):
        _fail("--nltk-compat must be 3.9 or installed")
    try:
        caps = load_captions(captions, image_id_key, caption_key)
        ev = CHAIR(variant.value, synonyms=synonyms, nltk_compat=nltk_compat)
        gts = load_gt(gt, gt_overlay) if gt is not None else build_gt_from_coco(coco_annotations, ev)
        res = ev.compute(caps, gts, unknown_image=unknown_image, zero_division=_zd(zero_division))
    except ChairResourceError as e:
        _fail(str(e))
    except (ValueError, KeyError, FileNotFoundError, ZeroDivisionError, TypeError) as e:
        _fail(_err_text(e, {"zero_division": "--zero-division {}", "unknown_image": "--unknown-image {}"}))
    if save is not None:
        save.write_text(json.dumps(res.to_dict(with_captions=True), indent=1, ensure_ascii=False))
    if as_json:
        _print_json(res.to_dict())
        return
    o = res.overall
    t = _table(f"CHAIR (variant: {res.variant}; CHAIRs/CHAIRi/Recall in %, Len = mean tokens)",
               ["captions", "CHAIRs", "CHAIRi", "Recall", "Len", "mentions", "hallucinated"])
    t.add_row(str(o["n_captions"]), f"{o['CHAIRs'] * 100:.1f}", f"{o['CHAIRi'] * 100:.1f}",
              f"{o['Recall'] * 100:.1f}", f"{o['Len'] * 100:.2f}", str(o["n_mentions"]),
              str(o["n_hallucinated_mentions"]))
    _print(t)
