"""Method options are checked against their config field's type annotation before the method's own validation, for
every method config (generic, in MethodConfig), with the option named in the error."""
from dataclasses import dataclass
from typing import Literal

import pytest

import vtoolkit as vt
from conftest import tiny_model
from vtoolkit.config import ConfigError, ConfigTypeError, MethodConfig


@pytest.mark.parametrize("value, got", [("0.1", "got str '0.1'"), (True, "got bool True")])
def test_apply_method_rejects_wrong_types_naming_the_option(value, got):
    model, _, _ = tiny_model("llava")
    with pytest.raises(TypeError) as info:
        vt.apply_method(model, "fastervlm", keep_ratio=value)
    assert str(info.value) == f"FasterVLMConfig option 'keep_ratio' must be a number or None, {got}"
    assert isinstance(info.value, ConfigError)
    assert vt.active_handles(model) == []


def test_every_registered_config_is_checked():
    with pytest.raises(ConfigTypeError, match="FastVConfig option 'K' must be an integer, got float 2.0"):
        vt.get_config_class("fastv")(K=2.0)
    with pytest.raises(ConfigTypeError, match="'K' must be an integer, got bool True"):
        vt.get_config_class("fastv")(K=True)
    with pytest.raises(ConfigTypeError, match="RandomPruneConfig option 'seed' must be an integer, got str '1'"):
        vt.get_config_class("random")(seed="1")
    with pytest.raises(ConfigTypeError, match="'skip_unused_vision_layers' must be a bool"):
        vt.get_config_class("fastervlm")(skip_unused_vision_layers=1)
    # an int is fine for a float, and stored as one (so configs written to config.json compare equal)
    cfg = vt.get_config_class("fastv")(keep_ratio=1)
    assert cfg.keep_ratio == 1.0 and isinstance(cfg.keep_ratio, float)
    assert vt.get_config_class("fastervlm")(keep_ratio=1).to_dict()["keep_ratio"] == 1.0
    # range checks of validate() still apply after the type check
    with pytest.raises(ValueError, match=r"keep_ratio \(the share of visual tokens KEPT\) must be in"):
        vt.get_config_class("fastervlm")(keep_ratio=1.5)


@dataclass(frozen=True)
class _NewConfig(MethodConfig):
    """A config as another method author would write it."""

    flag: bool = False
    mode: Literal["a", "b"] = "a"
    name: str | None = None
    weights: tuple = ()


def test_new_configs_get_the_check_without_code():
    assert _NewConfig(flag=True, mode="b", name=None, weights=(1, 2)).mode == "b"
    with pytest.raises(ConfigTypeError) as info:
        _NewConfig(flag=1, mode="c", name=3)
    assert info.value.problems == ["_NewConfig option 'flag' must be a bool (true/false), got int 1",
                                   "_NewConfig option 'mode' must be one of 'a', 'b', got str 'c'",
                                   "_NewConfig option 'name' must be a string or None, got int 3"]
    assert _NewConfig(weights=[1]).weights == [1]   # annotations this check does not know are left alone
