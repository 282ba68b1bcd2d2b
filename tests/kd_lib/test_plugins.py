from __future__ import annotations

import pytest

from kd_lib import plugins
from kd_lib.errors import KdflowError
from kd_lib.plugins import Registry, UnknownNameError


def test_register_returns_the_object_unchanged_and_get_finds_it() -> None:
    reg: Registry = Registry("widget")

    @reg.register("a")
    def a() -> int:
        return 1

    assert a() == 1
    assert reg.get("a") is a
    assert "a" in reg and "b" not in reg


def test_names_are_sorted() -> None:
    reg: Registry = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name)(object())
    assert reg.names() == ["alpha", "mid", "zeta"]


def test_duplicate_name_is_rejected() -> None:
    reg: Registry = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a")(lambda: 2)
    assert reg.get("a")() == 1  # the first entry survives


def test_unknown_name_error_names_kind_name_and_alternatives() -> None:
    reg: Registry = Registry("loss")
    reg.register("kd")(object())
    reg.register("ce")(object())
    with pytest.raises(UnknownNameError) as info:
        reg.get("dkd")
    message = str(info.value)
    assert "loss" in message and "'dkd'" in message and "ce, kd" in message
    assert isinstance(info.value, ValueError)


def test_registries_are_independent() -> None:
    first: Registry = Registry("one")
    second: Registry = Registry("two")
    first.register("x")(1)
    assert "x" not in second


def test_names_imports_the_provider_by_module_path() -> None:
    from kd_lib.compress.quantization import QUANTIZERS
    from kd_lib.models.builders import MODELS
    from kd_lib.train.losses import LOSSES

    assert plugins.names("model") == MODELS.names()
    assert {"cnn", "mlp"} <= set(plugins.names("model"))
    assert plugins.names("quantizer") == QUANTIZERS.names()
    assert "dynamic_int8" in plugins.names("quantizer")
    assert plugins.names("loss") == LOSSES.names()
    assert {"ce", "kd"} <= set(plugins.names("loss"))


def test_every_declared_provider_fills_a_registry_of_its_kind() -> None:
    for kind in plugins.PROVIDERS:
        found = plugins.registry(kind)
        assert isinstance(found, Registry) and found.kind == kind and len(found) > 0


def test_unknown_kind_names_the_declared_kinds() -> None:
    with pytest.raises(UnknownNameError) as info:
        plugins.names("widget")
    assert isinstance(info.value, KdflowError)
    assert info.value.cause == "unknown plugin kind 'widget'; available: loss, model, quantizer"
    assert "PROVIDERS" in info.value.fix


def test_a_stale_provider_entry_is_a_type_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The attribute exists but is not the model registry (renamed, or pointed at the wrong kind).
    monkeypatch.setitem(plugins.PROVIDERS, "model", "kd_lib.compress.quantization:QUANTIZERS")
    with pytest.raises(TypeError, match="not a Registry of kind 'model'"):
        plugins.names("model")
