from __future__ import annotations

import pytest

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
