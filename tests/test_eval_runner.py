"""Runner end to end on a tiny LLaVA: every dataset layout, resume after a crash, bad rows, run-folder contents."""
import json

import pytest

from conftest import tiny_model
from vtoolkit.config import ConfigError
from vtoolkit.eval import demo_data as dd
from vtoolkit.eval.runner import RunInterrupted, evaluate, read_predictions, resolve_config

# random weights mention no COCO object, so CHAIRi is undefined (0 / 0): report it as 0 here
FAST = {"pope": {"max_new_tokens": 3}, "mme": {"max_new_tokens": 3},
        "chair": {"max_new_tokens": 6, "n_images": 3, "zero_division": "zero"}}
VOLATILE = ("latency_s", "batch_size")


def _mp():
    model, proc, _ = tiny_model("llava")
    return model, proc


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    return {"pope": dd.make_pope_json(root / "pope", n_images=2), "pope_pq": dd.make_pope_parquet(root / "POPE"),
            "mme": dd.make_mme_folder(root / "MME_Benchmark_release_version"),
            "mme_pq": dd.make_mme_parquet(root / "MME"), "coco": dd.make_coco(root / "coco", n_images=5)}


@pytest.mark.parametrize("layouts", [("pope", "mme", "coco"), ("pope_pq", "mme_pq", None)],
                         ids=["official-folders", "lmms-lab-parquet"])
def test_end_to_end_all_layouts(tmp_path, data, layouts):
    benches = ["pope", "mme"] + (["chair"] if layouts[2] else [])
    dmap = {"pope": str(data[layouts[0]]), "mme": str(data[layouts[1]])}
    if layouts[2]:
        dmap["chair"] = str(data[layouts[2]])
    cfg = resolve_config(model="tiny:llava", method="fastervlm", method_options={"keep_ratio": 0.25},
                         benchmarks=benches, data=dmap, protocol_overrides=FAST, batch_size=3)
    out = tmp_path / "run"
    m = evaluate(cfg, out, model_and_processor=_mp(), progress=False)
    for f in ("config.json", "env.json", "metrics.json"):
        assert (out / f).is_file()
    conf = json.loads((out / "config.json").read_text())
    assert conf["method_config"]["keep_ratio"] == 0.25 and conf["protocols"]["pope"]["max_new_tokens"] == 3
    assert conf["protocols"]["pope"]["post_prompt"].startswith("\nAnswer the question")
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "transformers", "vtoolkit"} <= set(env) and "commit" in env["git"]
    sizes = {"pope": 8, "mme": 16, "chair": 3}
    for b in benches:
        rows = read_predictions(out / "predictions" / f"{b}.jsonl")
        assert len(rows) == sizes[b] and [r["index"] for r in rows] == list(range(sizes[b]))
        assert all(r["error"] is None and isinstance(r["prediction"], str) for r in rows)
        assert all(r["visual_tokens_before"] == 64 and r["visual_tokens_after"] == 16 for r in rows)
        assert all(r["latency_s"] > 0 and r["new_tokens"] >= 1 for r in rows)
        mb = m["benchmarks"][b]
        assert mb["n"] == sizes[b] and mb["n_errors"] == 0 and mb["visual_tokens_after"] == 16
        assert mb.get("score_error") is None, mb.get("score_error")
        assert isinstance(mb["headline"], float)
    assert set(m["benchmarks"]["pope"]["splits"]) == ({"coco_pope_popular", "coco_pope_random"}
                                                      if layouts[0] == "pope" else {"adversarial", "random"})
    assert sorted(m["benchmarks"]["mme"]["tasks"]) == ["OCR", "artwork", "code_reasoning", "existence"]
    assert len((out / "mme_results" / "OCR.txt").read_text().splitlines()) == 4
    if layouts[2]:
        assert m["benchmarks"]["chair"]["overall"]["n_captions"] == 3
        assert len((out / "chair_captions.jsonl").read_text().splitlines()) == 3


def test_resume_after_crash_equals_uninterrupted(tmp_path, data):
    cfg = resolve_config(model="tiny:llava", method="random", method_options={"keep_ratio": 0.5},
                         benchmarks=["pope"], data={"pope": str(data["pope"])}, protocol_overrides=FAST,
                         batch_size=2)
    full = tmp_path / "full"
    evaluate(cfg, full, model_and_processor=_mp(), progress=False)
    ref = read_predictions(full / "predictions" / "pope.jsonl")

    part = tmp_path / "part"
    with pytest.raises(RunInterrupted):
        evaluate(cfg, part, model_and_processor=_mp(), progress=False, fail_after_batches=2)
    f = part / "predictions" / "pope.jsonl"
    assert len(read_predictions(f)) == 4 and not (part / "metrics.json").exists()
    with open(f, "ab") as fh:  # a write cut off by the crash
        fh.write(b'{"id": "pope/coco_pope_random/3", "predic')
    with pytest.raises(ConfigError, match="already holds results of an earlier run .*pass resume=True"):
        evaluate(cfg, part, model_and_processor=_mp(), progress=False)
    evaluate(cfg, part, model_and_processor=_mp(), progress=False, resume=True)
    got = read_predictions(f)
    assert _stable(got) == _stable(ref)
    assert len({r["id"] for r in got}) == len(got) == 8
    assert f.read_bytes().endswith(b"\n") and b"predic\n" not in f.read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text())["benchmarks"]["pope"] for d in (full, part))
    assert a["average"] == b["average"]
    # resuming with different settings would mix results: refused
    other = dict(cfg, method_options={"keep_ratio": 0.25})
    with pytest.raises(ConfigError, match="method_config.keep_ratio: 0.5 -> 0.25"):
        evaluate(other, part, model_and_processor=_mp(), progress=False, resume=True)


def test_bad_rows_are_recorded(tmp_path):
    root = dd.make_pope_json(tmp_path / "pope", n_images=2, splits=("random",))
    (root / "images" / "COCO_val2014_000000000101.jpg").write_bytes(b"not an image")
    with open(root / "coco_pope_random.json", "a") as fh:
        fh.write('{"question_id": 99, "image": "COCO_val2014_000000000100.jpg", "label": "yes"}\n')
        fh.write('{"question_id": 100, "image": "nope.jpg", "text": "Is there a cat?", "label": "no"}\n')
    cfg = resolve_config(model="tiny:llava", benchmarks=["pope"], data={"pope": str(root)},
                         protocol_overrides=FAST, batch_size=4)
    m = evaluate(cfg, tmp_path / "run", model_and_processor=_mp(), progress=False)
    rows = read_predictions(tmp_path / "run" / "predictions" / "pope.jsonl")
    assert len(rows) == 6
    errs = {r["id"]: r["error"] for r in rows if r["error"]}
    assert set(errs) == {"pope/coco_pope_random/3", "pope/coco_pope_random/4", "pope/coco_pope_random/99",
                         "pope/coco_pope_random/100"}
    assert "unreadable image" in errs["pope/coco_pope_random/3"] and "missing field" in errs["pope/coco_pope_random/99"]
    assert all(rows[i]["prediction"] is None for i in range(len(rows)) if rows[i]["error"])
    pm = m["benchmarks"]["pope"]
    assert pm["n"] == 6 and pm["n_scored"] == 2 and pm["n_errors"] == 4 and len(pm["errors"]) == 4
    assert pm["splits"]["coco_pope_random"]["n"] == 2
