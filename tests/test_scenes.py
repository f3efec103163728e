"""The procedural scene generator and the synthetic benchmarks built from it (no model involved)."""
import json
import math
import random
import sys
from collections import Counter

import numpy as np
import pytest

from vtoolkit.data import scenes as S
from vtoolkit.data import synthetic as syn


# ------------------------------------------------------------------------------------------------ generator
def test_scene_is_a_pure_function_of_seed_and_index():
    a, b = S.make_scene(3, 17), S.make_scene(3, 17)
    assert a == b
    assert np.array_equal(np.asarray(S.render(a)), np.asarray(S.render(b)))
    assert S.make_scene(3, 18) != a and S.make_scene(4, 17) != a
    # the stream does not depend on what was generated before (no global RNG)
    random.seed(123)
    np.random.seed(123)
    assert S.make_scene(3, 17) == a


def test_scene_annotation_is_stable_across_machines():
    """Seed 0, index 0 of the training stream, written down once: a change here changes every dataset."""
    sc = S.make_scene(0, 0)
    assert sc.classes == ("circle", "triangle", "square")
    assert [(c, sc.count(c), sc.color_of(c)) for c in sc.classes] == [
        ("circle", 2, "purple"), ("triangle", 2, "green"), ("square", 1, "purple")]
    assert sc.background == "dotted"
    assert S.caption(sc) == "Two purple circles, a purple square and two green triangles on a dotted background."


def test_scene_invariants_and_statistics():
    scenes = [S.make_scene(5, i) for i in range(1500)]
    for sc in scenes[:300]:
        assert 1 <= len(sc.classes) <= S.MAX_CLASSES and 1 <= len(sc.objects) <= S.MAX_INSTANCES
        assert set(sc.classes) == {o.cls for o in sc.objects}
        for c in sc.classes:
            assert len({o.color for o in sc.instances(c)}) == 1
        for i, o in enumerate(sc.objects):
            assert o.r <= o.x <= S.CANVAS - o.r and o.r <= o.y <= S.CANVAS - o.r
            for p in sc.objects[i + 1:]:
                assert math.hypot(o.x - p.x, o.y - p.y) >= o.r + p.r + 2 - 1e-9
    present = Counter(c for sc in scenes for c in sc.classes)
    # the language prior: partners co-occur, frequent classes are frequent
    with_moon = [sc for sc in scenes if "moon" in sc.classes]
    assert sum("star" in sc.classes for sc in with_moon) / len(with_moon) > 0.7
    without_partner = [sc for sc in scenes if "circle" in sc.classes]
    assert sum("star" in sc.classes for sc in without_partner) / len(without_partner) < 0.5
    assert present["circle"] > present["arrow"] * 2
    assert sum(len(sc.classes) >= 3 for sc in scenes) / len(scenes) > 0.3   # enough POPE images


def test_render_shapes_where_annotated():
    sc = S.make_scene(1, 2)
    img = np.asarray(S.render(sc), dtype=np.float32)
    assert img.shape == (S.CANVAS, S.CANVAS, 3)
    for o in sc.objects:
        m = S.object_mask(sc, o) > 0.99
        assert m.sum() > 10
        assert np.abs(img[m].mean(0) - np.array(o.rgb)).max() < 2.0   # solid colour where fully covered


def test_training_turns_use_the_harness_prompt_formats():
    from vtoolkit.eval.protocol import LLAVA_SHORT_ANSWER, MME_SUFFIX

    assert (S.SHORT_ANSWER, S.MME_SUFFIX) == (LLAVA_SHORT_ANSWER, MME_SUFFIX)
    rng = np.random.default_rng(0)
    turns = [t for i in range(200) for t in S.training_turns(S.make_scene(0, i), rng)]
    answers = Counter(a for _, a in turns)
    assert 0.4 < answers["Yes"] / (answers["Yes"] + answers["No"]) < 0.6
    assert all(q.endswith((LLAVA_SHORT_ANSWER, MME_SUFFIX)) for q, _ in turns)
    caps = [S.training_turns(S.make_scene(0, i), rng, caption=True) for i in range(50)]
    assert all(len(c) == 1 and c[0][0] in S.CAPTION_PROMPTS for c in caps)   # a caption is a conversation of its own
    assert any(c[0][0] == "Please describe this image in detail." for c in caps)
    assert caps[0][0][1] == S.caption(S.make_scene(0, 0))


# ------------------------------------------------------------------------------------------------ POPE rules
HAND = [{"image": "1.png", "objects": ["cat", "dog", "bird"]},
        {"image": "2.png", "objects": ["dog", "fish", "cat", "cow"]},
        {"image": "3.png", "objects": ["bird", "fish", "horse"]},
        {"image": "4.png", "objects": ["sheep", "goat", "cat"]}]


def _pairs(rows):
    return [(r["image"], r["text"].split(" ")[3], r["label"]) for r in rows]


def test_pope_popular_matches_hand_computation():
    # frequencies over the 4 images, ties in first-seen order: cat 3; dog, bird, fish 2; cow, horse, sheep, goat 1
    rows = syn.pope_questions(HAND, "popular", random.Random(0))
    neg = [obj for _, obj, lab in _pairs(rows) if lab == "no"]
    assert neg == ["fish", "cow", "horse",   # 1.png: cat, dog, bird are in the image
                   "bird", "horse", "sheep",  # 2.png: cat in the image; cow in the image; fish asked
                   "cat", "dog", "cow",       # 3.png
                   "dog", "bird", "fish"]     # 4.png: cat in the image
    assert [r["label"] for r in rows] == ["yes", "no"] * 12
    assert [r["question_id"] for r in rows] == list(range(1, 25))
    assert rows[0] == {"question_id": 1, "image": "1.png", "text": "Is there a cat in the image?", "label": "yes"}


def test_pope_adversarial_matches_hand_computation_with_random_fallback():
    # co-occurrence rankings: cat: dog(2), bird, fish, cow, sheep, goat; dog: cat(2), bird, fish, cow;
    # bird: cat, dog, fish, horse; fish: dog, cat, cow, bird, horse; horse: bird, fish; sheep: goat, cat
    rows = syn.pope_questions(HAND, "adversarial", random.Random(7))
    neg = [obj for _, obj, lab in _pairs(rows) if lab == "no"]
    assert neg[:8] == ["fish", "cow", "horse", "bird", "horse", "sheep", "cat", "dog"]
    # 3.png's horse and 4.png's sheep and goat have no eligible co-occurring object: random fallback, replayed here
    gt = ["cat", "dog", "bird", "fish", "cow", "horse", "sheep", "goat"]
    replay = random.Random(7)

    def fallback(history, objects):
        o = replay.choice(gt)
        while o in history or o in objects:
            o = replay.choice(gt)
        return o

    h3 = ["bird", "cat", "fish", "dog", "horse"]
    n3 = fallback(h3, HAND[2]["objects"])
    h4 = ["sheep"]
    n4a = fallback(h4, HAND[3]["objects"])
    n4b = fallback(h4 + [n4a, "goat"], HAND[3]["objects"])
    assert neg[8:11] == [n3, n4a, n4b]
    cat_neg = next(o for o in ["dog", "bird", "fish", "cow", "sheep", "goat"] if o not in [n4a, n4b, "sheep", "goat"])
    assert neg[11] == cat_neg


def test_pope_random_rules():
    rows = syn.pope_questions(HAND, "random", random.Random(1))
    gt = set(syn.ground_truth_objects(HAND))
    for im in HAND:
        mine = [r for r in rows if r["image"] == im["image"]]
        asked = [r["text"].split(" ")[3] for r in mine]
        assert len(asked) == len(set(asked)) == 6
        assert [o for o, r in zip(asked, mine) if r["label"] == "yes"] == im["objects"][:3]
        assert all(o in gt and o not in im["objects"] for o, r in zip(asked, mine) if r["label"] == "no")
    assert rows == syn.pope_questions(HAND, "random", random.Random(1))
    assert rows != syn.pope_questions(HAND, "random", random.Random(2))


def test_pope_article_and_exhaustion():
    assert syn._question(1, "x.png", "arrow", "yes")["text"] == "Is there an arrow in the image?"
    with pytest.raises(ValueError, match="no object left"):
        syn.pope_questions([{"image": "a", "objects": ["x", "y", "z"]}], "random", random.Random(0))
    kept = syn.select_pope_images(HAND + [{"image": "5.png", "objects": ["a", "b"]}], 4, random.Random(0))
    assert sorted(k["image"] for k in kept) == ["1.png", "2.png", "3.png", "4.png"]


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return syn.write_benchmarks(tmp_path_factory.mktemp("synthetic"), pope_images=8, mme_images=3, chair_images=5)


def test_benchmarks_load_in_the_harness_and_are_held_out(bench):
    from vtoolkit.eval.datasets import load_dataset
    from vtoolkit.eval.protocol import resolve_protocol

    pope = load_dataset("pope", str(bench["pope"]))
    assert len(pope) == 3 * 8 * 6 and pope.n_errors() == 0
    assert {r["split"] for r in pope} == {f"shapes_pope_{s}" for s in ("random", "popular", "adversarial")}
    mme = load_dataset("mme", str(bench["mme"]))
    assert Counter(r["split"] for r in mme) == {t: 6 for t in syn.MME_TASKS} and mme.n_errors() == 0
    assert [r["label"] for r in mme][:2] == ["yes", "no"]
    chair = load_dataset("chair", str(bench["chair"]), resolve_protocol("chair", syn.PROTOCOL["chair"]))
    assert [r["image_id"] for r in chair] == [1, 2, 3, 4, 5]
    # POPE's ground-truth file lists each image's scene classes; the scenes come from the benchmark seed
    ann = [json.loads(x) for x in (bench["pope"] / "annotations" / "shapes_ground_truth_segmentation.json")
           .read_text().splitlines()]
    for a in ann:
        idx = int(a["image"].split("_")[1].split(".")[0])
        assert a["objects"] == list(S.make_scene(S.BENCH_SEED, idx).classes)
        assert S.make_scene(S.TRAIN_SEED, idx) != S.make_scene(S.BENCH_SEED, idx)


def test_mme_pairs_are_true_and_false(bench):
    for task in syn.MME_TASKS:
        lines = (bench["mme"] / task / "0000.txt").read_text().splitlines()
        assert [ln.split("\t")[1] for ln in lines] == ["Yes", "No"]
        assert all(ln.split("\t")[0].endswith(" Please answer yes or no.") for ln in lines)
    scene = S.make_scene(S.BENCH_SEED + syn.BENCH_OFFSETS["count"], 0)
    q_yes = (bench["mme"] / "count" / "0000.txt").read_text().splitlines()[0]
    c = next(c for c in scene.classes if f" {c}" in q_yes.split("\t")[0])
    assert S.count_word(scene.count(c)) in q_yes or "only one" in q_yes


def test_chair_synthetic_variant_needs_no_nltk(bench, monkeypatch):
    from vtoolkit.eval.scorers import chair

    monkeypatch.setitem(sys.modules, "nltk", None)   # any NLTK import would now raise
    gt = chair.build_gt_from_coco(str(bench["chair"] / "annotations"), variant="synthetic")
    refs = json.loads((bench["chair"] / "annotations" / "captions_val2014.json").read_text())["annotations"]
    caps = [{"image_id": r["image_id"], "caption": r["caption"]} for r in refs]
    res = chair.score_chair(caps, gt, "synthetic")
    assert res.overall["CHAIRs"] == 0.0 and res.overall["Recall"] == 1.0
    img1 = sorted(gt[1])
    absent = next(c for c in S.CLASSES if c not in img1)
    caps[0]["caption"] = f"Two {S.noun(img1[0], 2)}, a crescent and three {S.noun(absent, 2)}."
    per = chair.score_chair(caps, gt, "synthetic").per_caption[0]
    assert per["generated_node_words"] == [img1[0], "moon", absent]
    assert [h[1] for h in per["hallucinated"]] == [c for c in ("moon", absent) if c not in img1]
    assert per["n_words"] == 9   # words and punctuation, as word_tokenize counts them
