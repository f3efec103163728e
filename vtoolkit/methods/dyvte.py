"""DyVTE: dynamic visual-token exit (Sun et al., "Multimodal LLMs can be their own hyper-network: dynamic visual token
exit"; official code for LLaVA-1.5-13B, docs/methods.md section 5).

Algorithm (official code). One small router per LLM layer, trained with the LLM frozen (``vtoolkit train dyvte``,
:mod:`vtoolkit.train.dyvte`): ``Linear(2d -> 2048, no bias) -> GELU -> Linear(2048 -> 2, no bias)``. Router ``l`` reads
the OUTPUT of decoder layer ``l``: ``feat = [mean of the text tokens after the last visual token, excluding the last
prompt token ; the last prompt token]``. At prefill, after layers ``l = 0, 1, ...``, the first router whose argmax is
"exit" (``logit[1] > logit[0]``; no threshold) ends the visual tokens: layers ``l+1 .. L-1`` run on the text tokens
only (hidden states, masks and position ids; the text keeps its original positions, M-RoPE included), so the KV cache
of those layers holds text only. Decode steps do not re-run the routers (nor do the later prefills of
``generate(use_cache=False)``, which keep the call's exits, so cache and no-cache give the same tokens).

Options (exactly one of ``routers`` / ``exit_layer``):

- ``routers``: a path (a ``.safetensors`` file written by ``vtoolkit train dyvte``, or its output folder) or a
  :class:`DyVTERouters` object. Files carry the architecture fingerprint of the model they were trained for; another
  model is refused with both fingerprints in the message.
- ``exit_layer=k``: no router, every sample exits after layer ``k`` (studies, and the router-free mode). The decision
  uses the OUTPUT of layer ``k``; removal takes effect from ``k+1``. Python-style negative ``k``: ``-1`` is the last
  layer, after which nothing runs, so it changes nothing.
- neither: the routers shipped with vtoolkit for this model (matched by architecture fingerprint, see
  :func:`shipped_routers`), else an error that names both ways.

Batches (the official code is batch 1): every sample gets its own exit layer. The visual tokens leave the batch (and
the compute drops) from the first layer at which every sample has exited; a sample that exited earlier has its visual
tokens masked as keys in the layers in between, which is exact (a masked key gets weight 0, as a removed one; see
:class:`vtoolkit.hooks.midstack.MidStackPruner`, ``decide``), so a padded batch gives what single runs give. Those
layers' caches are compacted (:func:`vtoolkit.kernels.compact_kv`) at the first decode step where that shortens them.

Deviations from the official code:

- visual positions come from ``input_ids`` (official: hard-coded ``[35, 611)``); LLaVA-NeXT: the whole image block,
  ``image_newline`` tokens included; Qwen2-VL / 2.5-VL: every ``<|image_pad|>``. The ``<|vision_start|>`` /
  ``<|vision_end|>`` markers stay: they are text tokens of the prompt template (like LLaVA's ``\\n`` after
  ``<image>``), so the router's "text after the last visual token" starts at ``<|vision_end|>``;
- an empty text slice (no token between the last visual token and the last prompt token) gives a zero mean (official:
  NaN); features are computed in float32, the router runs in its own dtype;
- the last layer's router is not evaluated (an exit after the last layer removes nothing);
- no eager ``output_attentions`` (the official code computes and discards them); SDPA and eager are supported;
- per-layer masks at decode (the official code truncates one mask from the right: correct for batch 1 only).

``stats`` (per input sample): ``exit_layer`` (``None``: no router voted exit before the last layer),
``visual_tokens_removed``, ``flops_saved`` (analytic, LLM prefill, per sample as if run alone:
``(L - 1 - e) * (F(n) - F(n - v)) - r * 2 * (2d * h + 2h)`` with ``F`` = :func:`vtoolkit.bench.flops.llm_layer_flops`
of one layer over ``n`` tokens (``n``: the sample's prompt tokens, ``v``: its visual tokens), ``r`` router evaluations
of hidden size ``h``); and for the batch: ``layer`` (the first layer that ran without visual tokens, ``None`` when some
sample never exited), ``visual_tokens_before`` / ``visual_tokens_after`` (the visual tokens the last layer still
attends, per sample).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtoolkit.config import ConfigError, MethodConfig
from vtoolkit.hooks.attention import current_implementation
from vtoolkit.hooks.midstack import MidStackPruner
from vtoolkit.methods.base import Method
from vtoolkit.registry import register_method

FORMAT = "vtoolkit.dyvte.routers/1"
ROUTERS_FILE = "routers.safetensors"
SHIPPED_DIR = Path(__file__).resolve().parent / "dyvte_routers"
OFFICIAL_ROUTER_HIDDEN = 2048


# ------------------------------------------------------------------------------------------------ fingerprints
def fingerprint(model_or_adapter) -> dict[str, Any]:
    """The architecture a set of routers belongs to: the model type and the LLM's shape (what the routers' input is
    made of); ``config_hash`` is a short digest of those fields (one string to compare or name a file by)."""
    from vtoolkit.models import get_adapter

    a = model_or_adapter if hasattr(model_or_adapter, "text_config") else get_adapter(model_or_adapter)
    tc = a.text_config
    fp = {"model_type": a.config.model_type, "hidden_size": int(tc.hidden_size), "num_layers": int(a.num_layers),
          "num_heads": int(a.num_heads), "num_kv_heads": int(a.num_kv_heads),
          "intermediate_size": int(tc.intermediate_size), "vocab_size": int(tc.vocab_size)}
    fp["config_hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return fp


def _fp_text(fp) -> str:
    return ", ".join(f"{k}={v}" for k, v in fp.items()) if fp else "(none recorded)"


# ------------------------------------------------------------------------------------------------ routers
class Router(nn.Module):
    """``Linear(2d -> hidden, no bias) -> GELU -> Linear(hidden -> 2, no bias)``; logit 1 = "exit"."""

    def __init__(self, hidden_size: int, router_hidden: int = OFFICIAL_ROUTER_HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden_size, router_hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(router_hidden, 2, bias=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(feats)))


class DyVTERouters(nn.Module):
    """One :class:`Router` per decoder layer, with the fingerprint of the model they belong to.

    ``forward(layer, feats [B, 2d]) -> logits [B, 2]`` (features are cast to the router's dtype / device).
    New routers get Xavier-uniform weights, as the official ``init_weight.py``.
    """

    def __init__(self, hidden_size: int, num_layers: int, router_hidden: int = OFFICIAL_ROUTER_HIDDEN,
                 fingerprint: dict | None = None):
        super().__init__()
        if router_hidden < 1:
            raise ValueError(f"router_hidden must be a positive integer, got {router_hidden}")
        self.hidden_size, self.num_layers, self.router_hidden = int(hidden_size), int(num_layers), int(router_hidden)
        self.fingerprint = dict(fingerprint) if fingerprint else None
        self.routers = nn.ModuleList(Router(hidden_size, router_hidden) for _ in range(num_layers))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    @classmethod
    def for_model(cls, model_or_adapter, router_hidden: int = OFFICIAL_ROUTER_HIDDEN) -> DyVTERouters:
        fp = fingerprint(model_or_adapter)
        return cls(fp["hidden_size"], fp["num_layers"], router_hidden, fp)

    def forward(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        router = self.routers[layer]
        w = router.fc1.weight
        return router(feats.to(w.device, w.dtype))

    def check(self, model_or_adapter, source: str = "these routers") -> None:
        """Raise a clear error unless the routers were made for this model's architecture."""
        mine = fingerprint(model_or_adapter)
        theirs = self.fingerprint
        if theirs is None:       # an object built by hand: the shapes must fit at least
            theirs = {"hidden_size": self.hidden_size, "num_layers": self.num_layers}
            if all(mine[k] == v for k, v in theirs.items()):
                return
        elif {k: v for k, v in theirs.items()} == mine:
            return
        raise ConfigError(f"dyvte: {source} were trained for another architecture: routers fingerprint "
                         f"[{_fp_text(theirs)}], this model [{_fp_text(mine)}]. Train routers for this model with "
                         f"`vtoolkit train dyvte --model ...`, or use exit_layer=k (no router).")

    # -- safetensors ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
        """Write the routers (float32 unless they are in another float dtype) and their fingerprint to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / ROUTERS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "hidden_size": str(self.hidden_size), "num_layers": str(self.num_layers),
                "router_hidden": str(self.router_hidden), **(extra or {})}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model_or_adapter=None) -> DyVTERouters:
        """Routers from a file written by :meth:`save` (or the folder holding ``routers.safetensors``); with a model,
        refuse routers of another architecture."""
        from safetensors import safe_open

        path = resolve_routers_path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ConfigError(f"dyvte: {path} is not a DyVTE routers file (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); write one with `vtoolkit train dyvte`")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        fp = json.loads(meta["fingerprint"]) if meta.get("fingerprint") not in (None, "null") else None
        obj = cls(int(meta["hidden_size"]), int(meta["num_layers"]), int(meta["router_hidden"]), fp)
        if model_or_adapter is not None:
            obj.check(model_or_adapter, source=f"the routers in {path}")
        obj.load_state_dict(tensors)
        obj.metadata = meta
        return obj.eval()


def resolve_routers_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ROUTERS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"dyvte: no routers at {path} (a .safetensors file from `vtoolkit train dyvte`, or "
                                f"the --out folder holding {ROUTERS_FILE})")
    return p


def shipped_routers(model_or_adapter) -> Path | None:
    """The routers file shipped in ``vtoolkit/methods/dyvte_routers/`` whose fingerprint is this model's, if any."""
    from safetensors import safe_open

    mine = fingerprint(model_or_adapter)
    for p in sorted(SHIPPED_DIR.glob("*.safetensors")) if SHIPPED_DIR.is_dir() else []:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == FORMAT and json.loads(meta.get("fingerprint") or "null") == mine:
            return p
    return None


# ------------------------------------------------------------------------------------------------ features
def router_features(hidden: torch.Tensor, vis: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Router input from one layer's output ``hidden [B, L, d]``: ``[mean of the tokens after the last visual token and
    before the last prompt token ; the last prompt token]`` -> ``[B, 2d]`` float32.

    ``vis [B, L]`` bool marks visual tokens; ``last [B]`` is the index of each row's last prompt token (``L - 1`` under
    left padding; training batches are right-padded). An empty slice gives a zero mean."""
    B, L, _ = hidden.shape
    pos = torch.arange(L, device=hidden.device)
    vis = vis.to(hidden.device)
    last = last.to(hidden.device)
    last_vis = torch.where(vis, pos, -1).amax(1)
    text = (pos[None] > last_vis[:, None]) & (pos[None] < last[:, None])
    h = hidden.float()
    mean = torch.einsum("bl,bld->bd", text.float(), h) / text.sum(1, keepdim=True).clamp(min=1)
    return torch.cat([mean, h[torch.arange(B, device=h.device), last]], -1)


# ------------------------------------------------------------------------------------------------ method
@dataclass(frozen=True)
class DyVTEConfig(MethodConfig):
    """routers: trained routers (a path or a :class:`DyVTERouters`); exit_layer: a fixed exit after layer k (no
    router; -1 = the last layer = no change). Give one; neither: the routers shipped for this model."""

    routers: Any = None
    exit_layer: int | None = None

    def validate(self) -> None:      # exit_layer's type (an integer or None) is checked by MethodConfig
        if self.routers is not None and self.exit_layer is not None:
            raise ConfigError("dyvte: give routers (learned exits) or exit_layer (a fixed exit layer), not both")
        r = self.routers
        if r is not None and not isinstance(r, (str, os.PathLike, DyVTERouters)):
            raise ConfigError(f"routers must be a path to a routers .safetensors file / folder or a DyVTERouters "
                             f"object, got {type(r).__name__}")

    def check_model(self, adapter, spans=None) -> None:
        """exit_layer within the LLM's layers: 0..L-1 or -L..-1."""
        L, k = adapter.num_layers, self.exit_layer
        if k is not None and not -L <= k < L:
            raise ConfigError(f"exit_layer={k} is out of range for this {L}-layer LLM: use 0..{L - 1} (removal "
                              f"from layer k+1 on) or -{L}..-1 (exit_layer=-1: the last layer, no change)")

    def to_dict(self) -> dict[str, Any]:
        r = self.routers
        return {"routers": r if r is None or isinstance(r, str) else str(r) if isinstance(r, os.PathLike)
                else f"<DyVTERouters {r.num_layers} x {r.router_hidden}>", "exit_layer": self.exit_layer}


def _keep_no_visual(ctx) -> list[torch.Tensor]:
    return [torch.zeros(0, dtype=torch.long) for _ in range(ctx.batch_size)]


@register_method("dyvte", config=DyVTEConfig, kind="prune", stage="llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("trained routers (vtoolkit train dyvte) or exit_layer=k",),
                 description="Dynamic visual-token exit: per-layer routers end all visual tokens mid-stack (DyVTE)")
class DyVTE(Method):
    rewrites_sequence = True

    def check(self) -> None:
        super().check()
        L = self.adapter.num_layers
        impl = current_implementation(self.adapter.text_config)
        if "flash" in impl or "flex" in impl:
            raise ConfigError(f"dyvte rewrites the causal masks of the layers after the exit, which needs 'sdpa' or "
                             f"'eager' attention in the LLM; this model uses {impl!r}: model.set_attn_implementation"
                             f"({{'text_config': 'sdpa'}}) first")
        self.exit = None
        self.routers = None
        k = self.config.exit_layer
        if k is not None:
            self.exit = k % L
            return
        r = self.config.routers
        if r is None:
            found = shipped_routers(self.adapter)
            if found is None:
                raise ConfigError(f"dyvte needs routers=PATH (trained with `vtoolkit train dyvte`) or exit_layer=k: "
                                 f"no routers ship with vtoolkit for this model [{_fp_text(fingerprint(self.adapter))}]")
            r = found
        if isinstance(r, DyVTERouters):
            r.check(self.adapter)
            self.routers = r
        else:
            self.routers = DyVTERouters.load(r, self.adapter)
            self._place(self.routers)

    def _place(self, routers: DyVTERouters) -> None:
        """Routers we loaded go to their layer's device, in the model's dtype (the official code runs them in bf16)."""
        dtype = next(self.adapter.language_model.parameters()).dtype
        for layer, router in zip(self.adapter.decoder_layers, routers.routers):
            dev = next(layer.parameters()).device
            router.to(dev, dtype if dtype.is_floating_point else None)

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        ctx.listeners.append(self)
        self.pruner = None
        L = self.adapter.num_layers
        if self.exit is not None:
            if self.exit < L - 1:
                self.pruner = MidStackPruner(self.adapter, ctx, self.exit + 1, _keep_no_visual, owner=self.name)
        else:
            self.pruner = MidStackPruner(self.adapter, ctx, 1, _keep_no_visual, owner=self.name, decide=self._decide)
        if self.pruner is not None:
            self.pruner.install(hooks)
        self._call = None

    def on_prefill(self, ctx) -> None:
        super().on_prefill(ctx)
        prev, self._call = self._call, {"exit": None, "gone": None, "evals": None, "frozen": None}
        if not getattr(ctx, "new_call", True) and prev is not None and prev["exit"] is not None:
            # generate(use_cache=False) re-runs the whole sequence at every step: the exits decided at the call's
            # prefill stay (the routers run once per call, as with a cache)
            self._call.update(frozen=prev["exit"], evals=prev["evals"])

    # -- routers ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _decide(self, ctx, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-hook of layer ``i`` at prefill: router ``i - 1`` on its output decides for the samples still holding their
        visual tokens. Returns the rows that have exited (one decision per sample, shared by its beam rows). The later
        prefills of ``generate(use_cache=False)`` reuse the call's first decisions."""
        c = self._call
        dev = hidden.device
        ids = ctx.inputs["input_ids"]
        B, L = ids.shape
        if c["gone"] is None:
            c["vis"] = (ids == self.adapter.image_token_id).to(dev)
            c["gone"] = ~c["vis"].any(1)                    # nothing to remove: decided from the start
            c["exit"] = [None] * B
            if c["frozen"] is None or len(c["frozen"]) != B:
                c["frozen"], c["evals"] = None, [0] * B
        if c["frozen"] is not None:
            for j, e in enumerate(c["frozen"]):
                if e is not None and e <= i - 1:
                    c["gone"][j] = True
                    c["exit"][j] = e
            return c["gone"].clone()
        firsts = torch.tensor(ctx.sample_rows, device=dev)   # one row per input sample (beam rows are copies)
        gone, expand = c["gone"], max(1, ctx.expand)
        # every sample's router runs in one batched call (what decided samples get is ignored)
        feats = router_features(hidden[firsts], c["vis"][firsts], torch.full((firsts.numel(),), L - 1, device=dev))
        logits = self.routers(i - 1, feats).to(dev)
        out = (logits[:, 1] > logits[:, 0]).tolist()
        for r, ex in zip(firsts.tolist(), out):
            if bool(gone[r]):
                continue
            for j in range(r, r + expand):
                c["evals"][j] += 1
                if ex:
                    gone[j] = True
                    c["exit"][j] = i - 1
        return gone.clone()

    # -- stats --------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        ctx = getattr(self, "ctx", None)
        if self._call is None or ctx is None or ctx.inputs.get("input_ids") is None:
            return {}
        from vtoolkit.models.flops import llm_layer_flops

        a, L = self.adapter, self.adapter.num_layers
        rows = ctx.sample_rows
        spans = ctx.spans
        ids = ctx.inputs["input_ids"]
        m2 = ctx.inputs.get("attention_mask")
        n_tok = m2.sum(1).tolist() if m2 is not None and m2.dim() == 2 else [ids.shape[1]] * ids.shape[0]
        vis = [sum(s.num_tokens for s in spans[r]) for r in rows]
        if self.exit is not None:
            exits = [self.exit if v else None for v in vis]
            evals = [0] * len(rows)
        else:
            ex, ev = self._call["exit"], self._call["evals"]
            exits = [ex[r] if ex is not None else None for r in rows]
            evals = [ev[r] if ev is not None else 0 for r in rows]
        d, d_kv, m = a.text_config.hidden_size, a.num_kv_heads * a.head_dim, a.text_config.intermediate_size
        h = self.routers.router_hidden if self.routers is not None else 0
        removed, saved = [], []
        for r, e, v, n in zip(rows, exits, vis, evals):
            gone = v if e is not None and e < L - 1 else 0
            removed.append(gone)
            tok = int(n_tok[r])
            layers = (L - 1 - e) if gone else 0
            saved.append(layers * (llm_layer_flops(tok, tok, d, d_kv, m) - llm_layer_flops(tok - v, tok - v, d, d_kv, m))
                         - n * 2 * (2 * d * h + 2 * h))
        plan = self.pruner.plan if self.pruner is not None else None
        return {"exit_layer": exits, "visual_tokens_removed": removed, "flops_saved": saved,
                "layer": self.pruner.removal_layer if plan is not None else None,
                "visual_tokens_before": vis, "visual_tokens_after": [v - g for v, g in zip(vis, removed)]}
