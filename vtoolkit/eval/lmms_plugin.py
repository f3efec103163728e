"""lmms-eval plugin: ``lmms-eval --model vtoolkit --model_args pretrained=PATH,method=fastervlm,keep_ratio=0.1``.

``pretrained`` is a checkpoint path / hub id (``AutoModelForImageTextToText``), ``ref:shapes`` (the reference model
shipped in the package) or ``tiny:<arch>`` (offline tiny random model);
``method`` a vtoolkit method name or preset YAML; every other ``--model_args`` key that is not a loader option below is
a method option (``keep_ratio=0.1``). Loader options: ``dtype`` (auto|float16|bfloat16|float32), ``device_map``,
``attn_implementation``, ``max_new_tokens`` (a cap on the task's value), ``batch_size``.

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

from typing import Any

import torch
from lmms_eval.api.model import lmms

MODEL_ID = "vtoolkit"
CLASS_PATH = "vtoolkit.eval.lmms_plugin.VToolkitLMM"
_LOADER_KEYS = {"pretrained", "method", "dtype", "device_map", "attn_implementation", "max_new_tokens", "batch_size",
                "max_batch_size", "device", "trust_remote_code", "seed"}


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

    def __init__(self, pretrained: str, method: str = "none", dtype: str = "auto", device_map: str | None = None,
                 attn_implementation: str | None = None, max_new_tokens: int | None = None, batch_size: int = 1,
                 max_batch_size: int | None = None, device: str | None = None, trust_remote_code: bool = False,
                 seed: int = 0, **method_options: Any) -> None:
        super().__init__()
        import vtoolkit as vt
        from vtoolkit.config import load_method_preset
        from vtoolkit.eval.runner import load_model

        if device_map is None and device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            device_map = str(device)  # lmms-eval passes --device; with device_map unset the runner picks LOCAL_RANK
        self.model, self.processor = load_model(str(pretrained), dtype=dtype, device_map=device_map,
                                                attn_implementation=attn_implementation,
                                                trust_remote_code=bool(trust_remote_code), seed=int(seed))
        if str(method).endswith((".yaml", ".yml")):
            method, preset = load_method_preset(method)
            method_options = {**preset, **method_options}
        self.method = str(method)
        self.handle = vt.apply_method(self.model, self.method, **method_options)
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

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtoolkit's lmms-eval plugin does not support multi-round generation yet")
