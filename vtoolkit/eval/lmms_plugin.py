"""lmms-eval plugin: ``lmms-eval --model vtoolkit --model_args pretrained=PATH,method=fastervlm,keep_ratio=0.1``.

``pretrained`` is a checkpoint path / hub id (``AutoModelForImageTextToText``), ``ref:shapes`` (the reference model
shipped in the package) or ``tiny:<arch>`` (offline tiny random model);
``method`` a vtoolkit method name or preset YAML; every other ``--model_args`` key that is not a loader option below is
a method option (``keep_ratio=0.1``). Loader options: ``dtype`` (auto|float16|bfloat16|float32), ``device_map``,
``attn_implementation``, ``max_new_tokens`` (a cap on the task's value), ``batch_size``.

Composition and list values in ``--model_args``
-----------------------------------------------
lmms-eval splits ``--model_args`` on commas (not inside ``[...]``, ``{...}`` or quotes) and turns ``true``/``false``
and numbers into bool/int/float; everything else reaches the plugin as a string, which the plugin reads as follows:

- ``method=fastervlm+vhr`` composes methods (as ``vt.apply_method(model, ["fastervlm", "vhr"])``; each part may be
  a preset YAML). An option goes to the one composed method that has it (``keep_ratio=0.1`` -> fastervlm); an
  option that several of them have must be prefixed: ``vhr.seed=1``. An option no composed method has is an error.
- A list: ``sink_dims=0;1;2`` (``;``-separated, each item read as a YAML scalar; ``sink_dims=5;`` is the one-item
  list ``[5]``), or a JSON / YAML flow value ``sink_dims=[0,1,2]`` (also ``{...}``; quote it for the shell:
  ``--model_args 'pretrained=ref:shapes,method=var,sink_dims=[0,1,2]'``). Surrounding quotes are removed.

Every method and option is checked before the model is loaded.

Errors
------
lmms-eval 0.7.3's ``cli_evaluate`` catches every ``Exception`` raised while it evaluates (the model's constructor
and requests included), prints the traceback, logs "Error during evaluation" and exits **0**. So when the plugin runs
under that CLI, an error in the plugin prints ``error: vtoolkit lmms-eval plugin: <Type>: <message>`` to stderr and
exits through :class:`PluginExit` (a ``SystemExit``, which ``except Exception`` does not catch): status **2** for a
wrong setting (the constructor: method, option, model path), **1** for an error while answering requests. With
``--verbosity DEBUG`` the original exception is raised instead (lmms-eval re-raises it: traceback, status 1). Called
from Python (``lmms_eval.evaluator.simple_evaluate``), the plugin raises the original exception unchanged.

Registration with lmms-eval 0.7.3
---------------------------------
0.7.3 resolves ``--model NAME`` through ``MODEL_REGISTRY_V2``, which is filled from built-in manifests, the deprecated
``LMMS_EVAL_PLUGINS`` variable and the entry-point group ``lmms_eval.models``. An entry point's payload must be a
``ModelManifest``, an iterable of them, or a *callable returning one*: the pyproject entry point is
``vtoolkit = "vtoolkit.eval.lmms_plugin:manifests"``, which lazily names :class:`VToolkitLMM`. Without an installed
package (no entry points), call :func:`register` before ``simple_evaluate(model="vtoolkit", ...)``.

Interface: the *simple* (``doc_to_visual``) one, ``is_simple = True``: ``generate_until`` (batched, stop strings
applied), ``loglikelihood`` (sum of continuation log-probs + greedy flag, one request at a time),
``generate_until_multi_round`` is not supported (NotImplementedError, as several built-in backends).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch
from lmms_eval.api.model import lmms

MODEL_ID = "vtoolkit"
CLASS_PATH = "vtoolkit.eval.lmms_plugin.VToolkitLMM"
_LOADER_KEYS = {"pretrained", "method", "dtype", "device_map", "attn_implementation", "max_new_tokens", "batch_size",
                "max_batch_size", "device", "trust_remote_code", "seed"}


class PluginExit(SystemExit):
    """The plugin's exit under lmms-eval's CLI (which swallows ``Exception``); ``__cause__`` is the original error."""


def _under_lmms_cli() -> bool:
    """Whether lmms-eval's ``cli_evaluate`` (the function that catches every Exception and exits 0) is on the stack."""
    f = sys._getframe(1)
    while f is not None:
        c = f.f_code
        if c.co_name == "cli_evaluate" and c.co_filename.replace("\\", "/").endswith("lmms_eval/__main__.py"):
            return True
        f = f.f_back
    return False


def _exits_under_cli(code: int):
    """Decorator: under lmms-eval's CLI an exception becomes a one-line ``error:`` message and exit status ``code``."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if os.environ.get("VERBOSITY", "").upper() == "DEBUG" or not _under_lmms_cli():
                    raise
                msg = " ".join(str(e).split()) if str(e) else ""
                print(f"error: vtoolkit lmms-eval plugin: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
                raise PluginExit(code) from e
        return wrapper
    return deco


def _option_value(value: Any) -> Any:
    """A ``--model_args`` value as the method expects it: ``a;b;c`` -> list, ``[..]`` / ``{..}`` -> parsed, quotes
    removed; numbers and booleans (already converted by lmms-eval) unchanged."""
    from vtoolkit.config import ConfigError, parse_value

    if not isinstance(value, str):
        return value
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1].strip()
    if v[:1] in "[{":
        import yaml

        try:
            return yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"--model_args value {value!r} is not valid JSON/YAML: {' '.join(str(e).split())}") \
                from None
    if ";" in v:
        return [parse_value(x.strip()) for x in v.split(";") if x.strip()]
    return v


def resolve_methods(method: str, options: dict[str, Any]):
    """``method`` (``"a"`` or ``"a+b"``, parts may be preset YAMLs) and the method options of ``--model_args`` ->
    what :func:`vtoolkit.apply_method` takes: ``(name, options)`` for one method, a list of ``(name, options)`` pairs
    for a composition. Checks names, option names and values (ConfigError naming the option) without a model."""
    from vtoolkit.api import _check_compatible
    from vtoolkit.config import ConfigError, load_method_preset
    from vtoolkit.registry import get_method

    parts = [m.strip() for m in str(method).split("+")]
    if not all(parts):
        raise ConfigError(f"method={method!r}: write one method name, or several joined by '+' "
                          f"(method=fastervlm+vhr)")
    names, opts = [], []
    for part in parts:
        preset = {}
        if part.endswith((".yaml", ".yml")):
            part, preset = load_method_preset(part)
        names.append(get_method(part).name)
        opts.append({k: _option_value(v) for k, v in preset.items()})
    if len(set(names)) != len(names):
        raise ConfigError(f"method={method!r} names the same method twice")
    specs = [get_method(n) for n in names]
    for key, value in options.items():
        value = _option_value(value)
        prefix, _, field = key.rpartition(".")
        if prefix:
            if prefix not in names:
                raise ConfigError(f"option {key!r}: {prefix!r} is not one of the composed methods ({', '.join(names)})")
            opts[names.index(prefix)][field] = value
            continue
        if len(names) == 1:
            opts[0][key] = value
            continue
        owners = [i for i, s in enumerate(specs) if key in s.config_cls.field_names()]
        if not owners:
            raise ConfigError(f"option {key!r} is not an option of any composed method ({', '.join(names)}); "
                              + "; ".join(f"{s.name}: {', '.join(s.config_cls.field_names())}" for s in specs))
        if len(owners) > 1:
            raise ConfigError(f"option {key!r} is an option of several composed methods "
                              f"({', '.join(names[i] for i in owners)}): write "
                              + " or ".join(f"{names[i]}.{key}=..." for i in owners))
        opts[owners[0]][key] = value
    for spec, o in zip(specs, opts):   # names, types and ranges, before any model is loaded
        spec.config_cls.check_keys(o)
        spec.config_cls(**o)
    _check_compatible(specs, [])
    pairs = list(zip(names, opts))
    return pairs[0] if len(pairs) == 1 else pairs


def manifests():
    """The ``ModelManifest`` of this plugin (entry-point payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("vtk",))]


def register() -> None:
    """Register ``--model vtoolkit`` in lmms-eval's registry in this process (for use without an installed package)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for m in manifests():
        MODEL_REGISTRY_V2.register_manifest(m, overwrite=True)


class VToolkitLMM(lmms):
    """A stock HF multimodal LLM with a vtoolkit method applied, as an lmms-eval model."""

    is_simple = True

    @_exits_under_cli(2)
    def __init__(self, pretrained: str, method: str = "none", dtype: str = "auto", device_map: str | None = None,
                 attn_implementation: str | None = None, max_new_tokens: int | None = None, batch_size: int = 1,
                 max_batch_size: int | None = None, device: str | None = None, trust_remote_code: bool = False,
                 seed: int = 0, **method_options: Any) -> None:
        super().__init__()
        import vtoolkit as vt
        from vtoolkit.eval.runner import load_model

        methods = resolve_methods(method, method_options)   # every setting checked before the model is loaded
        if device_map is None and device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            device_map = str(device)  # lmms-eval passes --device; with device_map unset the runner picks LOCAL_RANK
        self.model, self.processor = load_model(str(pretrained), dtype=dtype, device_map=device_map,
                                                attn_implementation=attn_implementation,
                                                trust_remote_code=bool(trust_remote_code), seed=int(seed))
        self.method = "+".join(n for n, _ in (methods if isinstance(methods, list) else [methods]))
        self.handle = vt.apply_method(self.model, methods)
        if self.rank == 0:   # what was applied, with the parsed option values (a list is a list, not a string)
            applied = " + ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in o.items())})"
                                 for n, o in (methods if isinstance(methods, list) else [methods]))
            print(f"vtoolkit lmms-eval plugin: {pretrained}: applied {applied}", file=sys.stderr, flush=True)
        self.adapter = vt.models.get_adapter(self.model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.max_new_tokens_cap = int(max_new_tokens) if max_new_tokens is not None else None
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.visual_token_log: list[dict] = []  # per request: visual tokens before/after (what the method kept)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split):
        vis = doc_to_visual(self.task_dict[task][split][doc_id])
        vis = [v for v in (vis or []) if v is not None]
        out = []
        for v in vis:
            if isinstance(v, str):
                from PIL import Image

                with Image.open(v) as im:
                    v = im.convert("RGB")
            elif hasattr(v, "convert"):
                v = v.convert("RGB")
            else:
                raise TypeError(f"vtoolkit lmms plugin: unsupported visual of type {type(v).__name__} (images only)")
            out.append(v)
        return out

    def _device(self):
        return getattr(self.model, "device", None) or next(self.model.parameters()).device

    def _gen_kwargs(self, gk: dict) -> tuple[dict, list[str]]:
        gk = dict(gk or {})
        until = gk.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        mnt = int(gk.get("max_new_tokens", 128))
        if self.max_new_tokens_cap is not None:
            mnt = min(mnt, self.max_new_tokens_cap)
        temp = float(gk.get("temperature", 0) or 0)
        kw = {"max_new_tokens": mnt, "do_sample": bool(gk.get("do_sample", False)) and temp > 0,
              "num_beams": int(gk.get("num_beams", 1) or 1)}
        if kw["do_sample"]:
            kw["temperature"] = temp
            if gk.get("top_p"):
                kw["top_p"] = float(gk["top_p"])
        return kw, until

    # -- lmms API -----------------------------------------------------------------------------------------------
    @_exits_under_cli(1)
    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        from vtoolkit.eval.runner import _generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items(), key=str)), []).append(i)
        bar = tqdm(total=len(requests), desc="vtoolkit generate", disable=self.rank != 0)
        for idxs in groups.values():
            kw, until = self._gen_kwargs(requests[idxs[0]].args[1])
            for s in range(0, len(idxs), self.batch_size_per_gpu):
                chunk = idxs[s:s + self.batch_size_per_gpu]
                ctxs, ims = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    ctxs.append(context)
                    ims.append(self._visuals(doc_to_visual, doc_id, task, split))
                texts, extra, _ = _generate(self.model, self.processor, self.adapter, self.handle, ims, ctxs, kw)
                for i, text, ex in zip(chunk, texts, extra):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.visual_token_log.append({"before": ex["visual_tokens_before"],
                                                  "after": ex["visual_tokens_after"]})
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    @_exits_under_cli(1)
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            cont = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            if isinstance(cont, list):
                cont = cont[0]
            ims = self._visuals(doc_to_visual, doc_id, task, split)
            batch = self.adapter.prepare_inputs(self.processor, [ims] if ims else [[]], [context]).to(self._device())
            cont_ids = self.tokenizer(str(cont), add_special_tokens=False, return_tensors="pt")["input_ids"]
            cont_ids = cont_ids.to(batch["input_ids"].device)
            n = cont_ids.shape[1]
            inputs = dict(batch)
            L = batch["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([batch["input_ids"], cont_ids], 1)
            for k, v in batch.items():
                if k != "input_ids" and torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, L):
                    fill = torch.ones_like(cont_ids) if k == "attention_mask" else torch.zeros_like(cont_ids)
                    inputs[k] = torch.cat([v, fill.to(v.dtype)], 1)
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            logp = torch.log_softmax(logits[0, -n - 1:-1].float(), -1)
            tok_lp = logp.gather(-1, cont_ids[0].unsqueeze(-1)).squeeze(-1)
            greedy = bool((logp.argmax(-1) == cont_ids[0]).all())
            out.append((float(tok_lp.sum()), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, cont), (out[-1][0], greedy))
        return out

    @_exits_under_cli(1)
    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtoolkit's lmms-eval plugin does not support multi-round generation yet")
