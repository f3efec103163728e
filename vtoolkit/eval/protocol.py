"""Evaluation protocols: the prompt, generation settings and scoring rule of each benchmark, in one place.

Defaults follow the protocols papers use (``shared/docs/benchmarks.md``):

- **POPE**: the question + ``"\\nAnswer the question using a single word or phrase."`` (LLaVA-1.5's eval scripts and
  lmms-eval's default), greedy, ``max_new_tokens=128`` (LLaVA / lmms-eval; OPERA uses 10), scored with the official
  POPE rule (= LLaVA ``eval_pope.py``), per split plus the mean over splits.
- **MME**: lmms-eval's default prompt: `` Please answer yes or no.`` is removed and
  ``"\\nAnswer the question using a single word or phrase."`` appended; greedy, ``max_new_tokens=16``; official
  ``calculation.py`` scoring (Perception /2000, Cognition /800).
- **CHAIR**: ``"Please describe this image in detail."`` on 500 COCO val2014 images drawn with a seeded RNG from the
  *sorted* file list (OPERA shuffles ``os.listdir``, which is not reproducible across machines); greedy,
  ``max_new_tokens=512`` (OPERA's script; the short-caption setting uses 64); ``wordnet`` (OPERA) tokenizer profile.

Every field can be overridden (``--set pope.max_new_tokens=10``), and the resolved protocol is written to each
run's ``config.json``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BENCHMARKS = ("pope", "mme", "chair")

LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."


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
    zero_division: str | None = "zero"  # report 0 with a note rather than crash a long run on a degenerate split
    n_images: int | None = None         # CHAIR subset size (None: all)
    seed: int = 0                       # CHAIR subset seed
    source: str = ""                    # where the defaults come from (documentation, recorded with the run)
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
    """The default protocol of ``bench`` with ``overrides`` applied; unknown keys raise with the valid names."""
    if bench not in DEFAULTS:
        raise ValueError(f"unknown benchmark {bench!r}; choose from {', '.join(BENCHMARKS)}")
    base = DEFAULTS[bench]
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(Protocol)} - {"bench"}
    bad = [k for k in overrides if k not in names]
    if bad:
        import difflib

        hints = [difflib.get_close_matches(k, names, n=1) for k in bad]
        hint = "".join(f" Did you mean {h[0]!r} for {k!r}?" for k, h in zip(bad, hints) if h)
        raise ValueError(f"unknown {bench} protocol option(s) {bad}.{hint} Valid: {', '.join(sorted(names))}")
    return dataclasses.replace(base, **overrides)
