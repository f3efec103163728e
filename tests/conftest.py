"""Shared test setup: offline, deterministic, fp32 on CPU, tiny models cached per session."""
import contextlib
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("NLTK_DATA", str(SHARED_DATA / "nltk_data"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.use_deterministic_algorithms(False)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ARCHS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
# the families added by issue 19: in the contract suite (tests/test_contract.py) and their own family tests; the
# other per-arch test files keep ARCHS, so the suite time grows only by what the contract needs
NEW_ARCHS = ["qwen3_vl", "llava_onevision", "internvl"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"fixtures not found at {SHARED_DATA}: the shared/ folder must sit next to the repository")
    return SHARED_DATA


_MODELS = {}
_CLEAN: dict = {}   # arch -> hook count of the freshly built model


def _attrs(model):
    """Instance attribute names per submodule (transformers' own lazy flags left out)."""
    return {id(m): set(vars(m)) - {"_output_capturing_hooks_installed"} for m in model.modules()}


@pytest.fixture(autouse=True)
def _models_left_clean():
    """Every test must leave the shared cached models as it found them: no active handle, no attention interceptor,
    no extra hook, no instance attribute patched. A leak is cleaned up (so it cannot cascade into later tests) and
    fails the test that caused it."""
    yield
    import vtoolkit as vt
    from vtoolkit.hooks import count_hooks
    from vtoolkit.hooks.attention import interceptor_count

    problems = []
    for arch, (model, _, _) in _MODELS.items():
        handles = vt.active_handles(model)
        for h in handles:
            h.remove()
        if handles:
            problems.append(f"{arch}: {len(handles)} handle(s) left active")
        if count_hooks(model) != _CLEAN[arch]["hooks"]:
            problems.append(f"{arch}: {count_hooks(model) - _CLEAN[arch]['hooks']} extra hook(s)")
        patched = _attrs(model) != _CLEAN[arch]["attrs"]
        if patched:
            problems.append(f"{arch}: instance attributes differ from the fresh model")
        impl = model.config.get_text_config()._attn_implementation
        if impl != _CLEAN[arch]["impl"]:
            problems.append(f"{arch}: LLM attention implementation left at {impl!r}")
    if interceptor_count():
        problems.append(f"{interceptor_count()} attention interceptor(s) left")
    if problems:
        pytest.fail("test left the shared models dirty: " + "; ".join(problems))


def tiny_model(arch: str):
    """A cached (model, processor, adapter) per arch; tests must leave the model as they found it."""
    if arch not in _MODELS:
        import vtoolkit as vt
        from vtoolkit.hooks import count_hooks

        model, proc = vt.models.tiny.build(arch, seed=0)
        _MODELS[arch] = (model, proc, vt.models.get_adapter(model))
        with torch.no_grad():   # transformers installs its output-capturing hooks at the first call: count after it
            model.generate(**sample_batch(arch, n=1), max_new_tokens=1)
        _CLEAN[arch] = {"hooks": count_hooks(model), "attrs": _attrs(model),
                        "impl": model.config.get_text_config()._attn_implementation}
    return _MODELS[arch]


def sample_batch(arch: str, n: int = 3, two_images: bool = False):
    """A left-padded batch of ``n`` prompts of different lengths (sample 1 gets two images if asked)."""
    from vtoolkit.models.tiny import demo_image

    model, proc, adapter = tiny_model(arch)
    sizes = [(160, 120), (200, 100), (120, 120), (90, 140), (140, 90)]
    qs = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?",
          "Is there a person in the image?", "What color is the car?"]
    images = [demo_image(i, sizes[i % len(sizes)]) for i in range(n)]
    if two_images and n > 1:
        images[1] = [images[1], demo_image(7, (100, 150))]
    return adapter.prepare_inputs(proc, images, qs[:n])


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def assert_same_continuation(batched: torch.Tensor, single: torch.Tensor, pad_id: int, what: str = "") -> None:
    """A batched row's new tokens equal a single run's, except that the batch keeps padding after the single stopped
    at EOS."""
    n = single.numel()
    assert batched.numel() >= n, what
    assert torch.equal(batched[:n], single), f"{what}: {batched.tolist()} != {single.tolist()}"
    assert bool((batched[n:] == pad_id).all()), f"{what}: tokens after the single run stopped: {batched.tolist()}"


@contextlib.contextmanager
def attn_implementation(config, impl: str):
    """Run the block with ``config._attn_implementation = impl``; the previous value comes back afterwards."""
    old = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = old


def load_example(name: str):
    """``examples/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def layer0_inputs(model, adapter, inputs) -> tuple[torch.Tensor, tuple]:
    """The hidden states and position embeddings the first decoder layer receives in a stock forward of ``inputs``."""
    got = {}

    def grab(m, args, kwargs):
        got["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
        got["pe"] = kwargs["position_embeddings"]

    hk = adapter.decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        hk.remove()
    return got["hidden"], got["pe"]


def pruned_llava_embeds(model, adapter, batch, kept) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM input a pre-LLM pruner builds for one LLaVA-1.5 sample, by hand: merged embeddings with only the
    visual rows ``kept`` (indices within the image's tokens) left; returns ``(embeds [1, L', D], visual [1, L'])``."""
    ids = batch["input_ids"]
    emb = model.get_input_embeddings()(ids)
    feats = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    img = ids == adapter.image_token_id
    emb = emb.masked_scatter(img[..., None], feats)
    keep = ~img[0]
    keep[img[0].nonzero().flatten()[kept]] = True
    return emb[:, keep], img[:, keep]


@pytest.fixture
def vcd_without_qwen3_vl(monkeypatch):
    """The refusal path of an unsupported (method, architecture) pair: ``vcd`` registered without ``qwen3_vl`` for
    this test (the built-in methods support every family, so tests of the refusal narrow one)."""
    import dataclasses

    from vtoolkit import registry

    spec = registry.get_method("vcd")
    narrowed = dataclasses.replace(spec, architectures=tuple(a for a in spec.architectures if a != "qwen3_vl"))
    monkeypatch.setitem(registry._METHODS, "vcd", narrowed)
    return narrowed
