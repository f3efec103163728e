"""A bad ``vtoolkit`` entry is a clear error at engine start (vLLM environment)."""
from __future__ import annotations

import pytest

from conftest import make_llm


@pytest.mark.parametrize("arch,entry,message", [
    ("llava", {"method": "fastv", "keep_tokens": 8}, r"method'\]='fastv'.*serves fastervlm, random"),
    ("llava", {"method": "fastervlm", "keep_tokens": 65}, r"keep_tokens=65 exceeds the 64 visual tokens"),
    ("qwen2_vl", {"method": "fastervlm", "keep_tokens": 65}, r"keep_tokens=65 exceeds the 64 visual tokens"),
    ("qwen2_vl", {"method": "random", "keep_ratio": 0.1, "budget_scope": "global"}, r"unknown option\(s\) \['budget_scope'\]"),
    ("qwen2_vl", {"method": "random", "keep_tokens": 8}, r"mm_device_do_normalize=False"),
    ("qwen2_5_vl", {"method": "fastervlm", "keep_tokens": 65}, r"keep_tokens=65 exceeds the 64 visual tokens"),
    ("llava_next", {"method": "fastervlm", "keep_tokens": 8}, r"does not serve LlavaNextForConditionalGeneration"),
])
def test_bad_configuration_fails_at_engine_start(fixtures, arch, entry, message):
    with pytest.raises(Exception, match=message):
        make_llm(fixtures / arch, entry)
