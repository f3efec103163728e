"""Dataset loaders: every layout, stable ids, seeded CHAIR subsets, and bad rows yielded as error records."""
import json

import pytest

from vtoolkit.eval import demo_data as dd
from vtoolkit.eval.datasets import load_dataset, open_image
from vtoolkit.eval.protocol import resolve_protocol


def test_pope_json_layout_crlf_and_splits(tmp_path):
    root = dd.make_pope_json(tmp_path / "pope", n_images=2, splits=("random", "popular"))
    assert b"\r\n" in (root / "coco_pope_popular.json").read_bytes()
    ds = load_dataset("pope", str(root))
    assert ds.layout == "json" and len(ds) == 8 and ds.n_errors() == 0
    assert ds.info["splits"] == {"coco_pope_popular": 4, "coco_pope_random": 4}
    r = ds.records[0]
    assert r["id"] == "pope/coco_pope_popular/1" and r["label"] in ("yes", "no") and r["question"].startswith("Is")
    assert open_image(r).mode == "RGB"
    # a single question file works too, with an explicit image folder
    one = load_dataset("pope", {"path": str(root / "coco_pope_random.json"), "images": str(root / "images")})
    assert [x["id"] for x in one] == [x["id"] for x in ds if x["split"] == "coco_pope_random"]


def test_pope_parquet_layout(tmp_path):
    root = dd.make_pope_parquet(tmp_path / "POPE", n_images=2, splits=("adversarial", "random"))
    ds = load_dataset("pope", str(root))
    assert ds.layout == "parquet" and len(ds) == 8 and ds.n_errors() == 0
    assert {r["split"] for r in ds} == {"adversarial", "random"}
    assert len({r["id"] for r in ds}) == 8
    im = open_image(ds.records[5])
    assert im.size == (64, 48)


def test_mme_folder_and_parquet_agree(tmp_path):
    folder = load_dataset("mme", str(dd.make_mme_folder(tmp_path / "MME_Benchmark_release_version", n_images=2)))
    pq = load_dataset("mme", str(dd.make_mme_parquet(tmp_path / "MME", n_images=2)))
    assert folder.layout == "folder" and pq.layout == "parquet"
    assert len(folder) == len(pq) == 16 and folder.n_errors() == pq.n_errors() == 0
    # split subtasks (artwork: images/ + questions_answers_YN/) and plain ones are both read
    assert folder.info["subtasks"] == {"existence": 4, "OCR": 4, "artwork": 4, "code_reasoning": 4}
    assert sorted(r["label"] for r in folder) == sorted(r["label"] for r in pq)
    assert all(open_image(r).mode == "RGB" for r in folder.records[:2] + pq.records[:2])
    assert pq.records[0]["id"].endswith("#0") and pq.records[1]["id"].endswith("#1")


def test_chair_subset_is_seeded_and_sorted(tmp_path):
    root = dd.make_coco(tmp_path / "coco", n_images=6)
    p = resolve_protocol("chair", {"n_images": 3, "seed": 1})
    a = load_dataset("chair", str(root), p)
    b = load_dataset("chair", str(root), p)
    c = load_dataset("chair", str(root), resolve_protocol("chair", {"n_images": 3, "seed": 2}))
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 3
    assert a.info["image_ids"] == sorted(a.info["image_ids"])
    assert [r["id"] for r in a] != [r["id"] for r in c]
    assert a.info["annotations"].endswith("annotations")
    assert len(load_dataset("chair", str(root), resolve_protocol("chair", {"n_images": None}))) == 6


def test_bad_rows_are_error_records_not_dropped(tmp_path):
    root = dd.make_pope_json(tmp_path / "pope", n_images=1, splits=("random",))
    f = root / "coco_pope_random.json"
    lines = f.read_text().splitlines()
    lines.append('{"question_id": 9, "image": "COCO_val2014_000000000100.jpg", "label": "yes"}')  # no text
    lines.append('{"question_id": 10, "image": "missing.jpg", "text": "Is there a cat?", "label": "no"}')
    lines.append('{"question_id": 11, "image": "x.jpg", "text": "Is th')  # truncated JSON
    lines.append('{"question_id": 12, "image": "x.jpg", "text": "Cat?", "label": "maybe"}')
    f.write_text("\n".join(lines) + "\n")
    ds = load_dataset("pope", str(root))
    assert len(ds) == 6
    errs = {r["id"]: r["error"] for r in ds if r["error"]}
    assert "missing field" in errs["pope/coco_pope_random/9"]
    assert "invalid JSON" in errs["pope/coco_pope_random/line5"]
    assert "yes/no" in errs["pope/coco_pope_random/12"]
    missing = next(r for r in ds if r["id"] == "pope/coco_pope_random/10")
    assert missing["error"] is None  # found only when opened: the runner records it
    with pytest.raises(FileNotFoundError):
        open_image(missing)
    # MME: a malformed line and a missing image
    mme = dd.make_mme_folder(tmp_path / "mme", n_images=1, tasks={"existence": "plain"})
    (mme / "existence" / "0000.txt").write_text("no tab here\nIs there a dog? Please answer yes or no.\tNo\n")
    (mme / "existence" / "0001.txt").write_text("Q?\tYes\nQ2?\tNo\n")
    ds = load_dataset("mme", str(mme))
    assert len(ds) == 4 and ds.n_errors() == 3
    assert any("expected 'question<TAB>" in r["error"] for r in ds if r["error"])
    assert any("not found" in r["error"] for r in ds if r["error"])
    json.dumps([{k: v for k, v in r.items() if k != "_ref"} for r in ds])  # records are JSON-able


def test_protocol_defaults_and_overrides():
    p = resolve_protocol("pope")
    assert p.max_new_tokens == 128 and not p.do_sample and p.num_beams == 1
    assert p.build_question("Is there a dog?") == "Is there a dog?\nAnswer the question using a single word or phrase."
    m = resolve_protocol("mme")
    assert m.build_question("Is it red? Please answer yes or no.") == (
        "Is it red?\nAnswer the question using a single word or phrase.")
    c = resolve_protocol("chair", {"max_new_tokens": 64})
    assert c.build_question(None) == "Please describe this image in detail." and c.n_images == 500
    assert c.max_new_tokens == 64
    with pytest.raises(ValueError, match="max_new_tokens"):
        resolve_protocol("pope", {"max_new_token": 3})
