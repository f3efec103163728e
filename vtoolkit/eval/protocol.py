"""Evaluation protocols: the prompt, generation settings and scoring rule of a benchmark, as data.

Each benchmark declares its defaults in its own module in ``vtoolkit/eval/benchmarks/`` (attribute
``defaults``, each naming its origin in ``source``); this module holds the shared :class:`Protocol` and the override
rules. Scoring follows ``vtoolkit score NAME`` exactly, defaults included: ``zero_division=None`` behaves like the
rule's original script where it defines a value; where the original divides without a guard the metric is reported
as *undefined* or the benchmark is left *not scored*, with the reason (each benchmark documents which);
``--set NAME.zero_division=zero`` reports 0 instead.

Every field can be overridden (``--set NAME.max_new_tokens=10``; names, types and ranges are checked), and the
resolved protocol is written to each run's ``config.json``. :data:`SCORING_FIELDS` only change how predictions are
scored, so a finished run can be re-scored with other values (``--resume``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vtoolkit.config import ConfigError, check_field_types

LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."
SCORING_FIELDS = ("scorer_rule", "zero_division", "source")


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is prompted, decoded and scored."""

    bench: str
    pre_prompt: str = ""
    post_prompt: str = ""
    strip_suffix: str = ""            # removed from the question before pre/post prompts are added
    fixed_question: str | None = None  # every image gets the same instruction (captioning)
    max_new_tokens: int = 128
    do_sample: bool = False
    num_beams: int = 1
    temperature: float | None = None
    scorer_rule: str = "official"
    zero_division: str | None = None    # None: as the rule's original script (may leave the bench not scored); zero
    n_images: int | None = None         # a seeded subset of images (None: all)
    seed: int = 0                       # its seed
    source: str = ""                    # where the defaults come from, + "this run uses instead: k=v" (overrides)
    extra: dict = field(default_factory=dict)

    def build_question(self, question: str | None) -> str:
        if self.fixed_question is not None:
            q = self.fixed_question
        else:
            q = (question or "").strip()
            if self.strip_suffix and (self.pre_prompt or self.post_prompt) and q.endswith(self.strip_suffix.strip()):
                q = q[: len(q) - len(self.strip_suffix.strip())].rstrip()
        return f"{self.pre_prompt}{q}{self.post_prompt}"

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample),
                              "num_beams": int(self.num_beams)}
        if self.do_sample and self.temperature is not None:
            kw["temperature"] = float(self.temperature)
        return kw

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """ConfigError listing every field whose value is out of range for this benchmark."""
        bad = []
        if self.max_new_tokens < 1:
            bad.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            bad.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature is not None and self.temperature <= 0:
            bad.append(f"temperature must be > 0 (or null), got {self.temperature}")
        if self.n_images is not None and self.n_images < 1:
            bad.append(f"n_images must be >= 1 (or null for all), got {self.n_images}")
        from vtoolkit.eval.benchmark import get_benchmark

        b = get_benchmark(self.bench)
        allowed = b.zero_division
        if self.zero_division not in allowed:
            bad.append(f"zero_division must be null, {', '.join(a for a in allowed if a)}, got "
                       f"{self.zero_division!r}")
        if self.scorer_rule not in b.rules:
            bad.append(f"scorer_rule must be one of {', '.join(b.rules)}, got {self.scorer_rule!r}")
        if bad:
            raise ConfigError([f"{self.bench} protocol: {b}" for b in bad])


class _Defaults(Mapping):
    """``DEFAULTS[name]``: the default :class:`Protocol` of each registered benchmark (read from the registry)."""

    def __getitem__(self, name: str) -> Protocol:
        from vtoolkit.eval.benchmark import get_benchmark

        if name not in self:
            raise KeyError(name)
        return get_benchmark(name).default_protocol()

    def __iter__(self):
        from vtoolkit.eval.benchmark import list_benchmarks

        return iter(list_benchmarks())

    def __len__(self) -> int:
        from vtoolkit.eval.benchmark import list_benchmarks

        return len(list_benchmarks())

    def __contains__(self, name) -> bool:
        from vtoolkit.eval.benchmark import list_benchmarks

        return name in list_benchmarks()


DEFAULTS: Mapping[str, Protocol] = _Defaults()


def resolve_protocol(bench: str, overrides: Mapping[str, Any] | None = None) -> Protocol:
    """The default protocol of ``bench`` with ``overrides`` applied; unknown names, wrong types and out-of-range
    values raise :class:`~vtoolkit.config.ConfigError` naming the option (and the closest valid name)."""
    from vtoolkit.eval.benchmark import get_benchmark

    base = get_benchmark(bench).default_protocol()
    if not isinstance(overrides, (Mapping, type(None))):
        raise ConfigError(f"{bench} protocol: expected option: value pairs, got {overrides!r}")
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(Protocol)} - {"bench"}
    bad = [k for k in overrides if k not in names]
    if bad:
        import difflib

        hints = [difflib.get_close_matches(k, names, n=1) for k in bad]
        hint = "".join(f" Did you mean {h[0]!r} for {k!r}?" for k, h in zip(bad, hints) if h)
        raise ConfigError(f"unknown {bench} protocol option(s) {bad}.{hint} Valid: {', '.join(sorted(names))}")
    overrides = check_field_types(Protocol, overrides, owner=f"{bench} protocol")
    proto = dataclasses.replace(base, **overrides)
    proto.check()
    changed = {k: v for k, v in overrides.items() if k != "source" and v != getattr(base, k)}
    if changed and "source" not in overrides:   # the defaults' origin, then what this run uses instead
        proto = dataclasses.replace(proto, source=f"{base.source}; this run uses instead: "
                                                  + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return proto
