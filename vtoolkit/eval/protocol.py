"""Evaluation protocols: the prompt, generation settings and scoring rule of each benchmark, in one place.

Defaults follow the protocols papers use (each default names its origin in ``source``):

- **POPE**: the question + ``"\\nAnswer the question using a single word or phrase."`` (LLaVA-1.5's eval scripts and
  lmms-eval's default), greedy, ``max_new_tokens=128`` (LLaVA / lmms-eval; OPERA uses 10), scored with the official
  POPE rule (= LLaVA ``eval_pope.py``), per split plus the mean over splits.
- **MME**: lmms-eval's default prompt: `` Please answer yes or no.`` is removed and
  ``"\\nAnswer the question using a single word or phrase."`` appended; greedy, ``max_new_tokens=16``; official
  ``calculation.py`` scoring (Perception /2000, Cognition /800).
- **CHAIR**: ``"Please describe this image in detail."`` on 500 COCO val2014 images drawn with a seeded RNG from the
  *sorted* file list (OPERA shuffles ``os.listdir``, which is not reproducible across machines); greedy,
  ``max_new_tokens=512`` (OPERA's script; the short-caption setting uses 64); ``wordnet`` (OPERA) tokenizer profile.

Scoring follows ``vtoolkit score`` exactly, defaults included: ``zero_division=None`` behaves like the rule's
original script where it defines a value (lmms-eval, VLMEvalKit: 0); where the original divides without a guard and
crashes (official POPE: precision when no answer is "yes"), the metric is reported as *undefined* (``null``, with a
note) and the benchmark is still scored; for CHAIR (CHAIRi when no caption mentions an object) it leaves the benchmark
*not scored*, with the reason. ``--set pope.zero_division=zero`` (``--zero-division zero`` for ``vtoolkit score``)
reports 0 instead.

Every field can be overridden (``--set pope.max_new_tokens=10``; names, types and ranges are checked), and the
resolved protocol is written to each run's ``config.json``. :data:`SCORING_FIELDS` only change how predictions are
scored, so a finished run can be re-scored with other values (``--resume``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vtoolkit.config import ConfigError, check_field_types

BENCHMARKS = ("pope", "mme", "chair")

LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."
SCORING_FIELDS = ("scorer_rule", "zero_division", "source")
RULES = {"pope": ("official", "opera", "vcd", "lmms_eval", "vlmevalkit"),
         "mme": ("official", "lmms_eval", "vlmevalkit"),
         "chair": ("wordnet", "pattern", "opera", "original", "synthetic")}   # synthetic: vtoolkit.data.synthetic


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is prompted, decoded and scored."""

    bench: str
    pre_prompt: str = ""
    post_prompt: str = ""
    strip_suffix: str = ""            # removed from the question before pre/post prompts are added (MME)
    fixed_question: str | None = None  # CHAIR: every image gets the same instruction
    max_new_tokens: int = 128
    do_sample: bool = False
    num_beams: int = 1
    temperature: float | None = None
    scorer_rule: str = "official"
    zero_division: str | None = None    # None: as the rule's original script (may leave the bench not scored); zero
    n_images: int | None = None         # CHAIR subset size (None: all)
    seed: int = 0                       # CHAIR subset seed
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
        allowed = (None, "raise", "zero", "undefined") if self.bench == "pope" else (None, "raise", "zero")
        if self.zero_division not in allowed:
            bad.append(f"zero_division must be null, {', '.join(a for a in allowed if a)}, got "
                       f"{self.zero_division!r}")
        if self.bench in RULES and self.scorer_rule not in RULES[self.bench]:
            bad.append(f"scorer_rule must be one of {', '.join(RULES[self.bench])}, got {self.scorer_rule!r}")
        if bad:
            raise ConfigError([f"{self.bench} protocol: {b}" for b in bad])


DEFAULTS: dict[str, Protocol] = {
    "pope": Protocol(bench="pope", post_prompt=LLAVA_SHORT_ANSWER, max_new_tokens=128, scorer_rule="official",
                     source="LLaVA-1.5 eval / lmms-eval pope: short-answer prompt, greedy, 128 new tokens; "
                            "official POPE evaluate.py parsing"),
    "mme": Protocol(bench="mme", post_prompt=LLAVA_SHORT_ANSWER, strip_suffix=MME_SUFFIX, max_new_tokens=16,
                    scorer_rule="official",
                    source="lmms-eval mme default prompt, greedy, 16 new tokens; official eval_tool calculation.py"),
    "chair": Protocol(bench="chair", fixed_question="Please describe this image in detail.", max_new_tokens=512,
                      scorer_rule="wordnet", n_images=500, seed=0,
                      source="OPERA chair_eval.py: 500 random COCO val2014 images, 'Please describe this image in "
                             "detail.', greedy, 512 new tokens; OPERA (wordnet) CHAIR"),
}


def resolve_protocol(bench: str, overrides: Mapping[str, Any] | None = None) -> Protocol:
    """The default protocol of ``bench`` with ``overrides`` applied; unknown names, wrong types and out-of-range
    values raise :class:`~vtoolkit.config.ConfigError` naming the option (and the closest valid name)."""
    if bench not in DEFAULTS:
        raise ConfigError(f"unknown benchmark {bench!r}; choose from {', '.join(BENCHMARKS)}")
    base = DEFAULTS[bench]
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
