"""The ``vtoolkit`` entry of a model's config (``hf_overrides={"vtoolkit": {...}}``), validated at engine start."""
from __future__ import annotations

from dataclasses import dataclass

import vtoolkit_core

METHODS = ("fastervlm", "random")
KEY = "vtoolkit"


@dataclass(frozen=True)
class PruneSpec:
    """``method`` fastervlm|random; ``keep_tokens`` T xor ``keep_ratio`` r (default r = 0.1, as vtoolkit); random:
    ``seed`` (default 0)."""

    method: str
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    seed: int = 0

    def budget(self, n: int, what: str) -> int:
        return vtoolkit_core.budget(n, self.keep_ratio, self.keep_tokens, what)


def spec_from(hf_config) -> PruneSpec | None:
    """The pruning asked for on ``hf_config`` (None: no ``vtoolkit`` entry, the model runs as stock vLLM)."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"hf_overrides['{KEY}'] must be a dict like {{'method': 'fastervlm', 'keep_tokens': 64}}, "
                         f"got {raw!r}")
    raw = dict(raw)
    method = raw.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"hf_overrides['{KEY}']['method']={method!r}: the vtoolkit vLLM plugin serves "
                         f"{', '.join(METHODS)}")
    allowed = {"keep_ratio", "keep_tokens"} | ({"seed"} if method == "random" else set())
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"hf_overrides['{KEY}']: unknown option(s) {unknown} for {method!r}; "
                         f"known: {sorted(allowed)}")
    ratio, tokens = raw.get("keep_ratio"), raw.get("keep_tokens")
    if ratio is not None and tokens is not None:
        raise ValueError(f"hf_overrides['{KEY}']: give keep_ratio or keep_tokens, not both")
    if ratio is None and tokens is None:
        ratio = 0.1
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < float(ratio) <= 1):
        raise ValueError(f"hf_overrides['{KEY}']['keep_ratio'] (the share of visual tokens KEPT) must be in (0, 1], "
                         f"got {ratio!r}")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
        raise ValueError(f"hf_overrides['{KEY}']['keep_tokens'] must be a positive integer, got {tokens!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ValueError(f"hf_overrides['{KEY}']['seed'] must be an integer, got {seed!r}")
    return PruneSpec(method, None if ratio is None else float(ratio), tokens, seed)
