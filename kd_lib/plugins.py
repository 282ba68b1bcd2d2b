"""Named, pluggable components (models, losses, quantizers): one generic registry, found by module path.

A config names a component by string (``arch: mlp``, ``scheme: dynamic_int8``); a ``Registry``
turns that string into the object and, when the name is wrong, says what the valid names are.
One class serves all kinds (torchdistill style) instead of one bespoke registry per kind.

Discovery. ``PROVIDERS`` declares, per kind, which module fills the registry of the built-in
entries, as an entry-point string ``"package.module:ATTRIBUTE"``; ``names(kind)`` imports that
module by its path (importlib) and lists the registry. Why: config sits *below* models and
compress (they import it, and they import torch), yet the config must check names such as
``sweep.schemes``. Importing them from config would be an upward import and a cycle; naming
them by module path, as setuptools entry points do, keeps config free of torch until a check
actually needs the names: ``registry(kind)`` and ``names(kind)`` import the provider when called.

This module is a bottom layer: besides ``kd_lib.errors`` it imports nothing from kdflow at
module level.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kd_lib.errors import KdflowError

T = TypeVar("T")


class UnknownNameError(KdflowError, ValueError):
    """A name was looked up that nothing registered; the message lists the available names."""


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny(input_shape, num_classes): ...
        >>> MODELS.get("tiny") is tiny
        True

    Args:
        kind: What the entries are (``"model"``, ``"loss"``, ...); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name`` and returns it unchanged.

        Args:
            name: The name configs will use.

        Raises:
            ValueError: ``name`` is already registered (silently replacing an entry would make
                the meaning of a config depend on import order).
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the object registered under ``name``.

        Raises:
            UnknownNameError: nothing is registered under ``name``.
        """
        try:
            return self._entries[name]
        except KeyError:
            available = ", ".join(self.names()) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {available}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


# kind -> "module:ATTRIBUTE" of the Registry holding that kind's built-in entries (entry-point syntax).
PROVIDERS: dict[str, str] = {
    "model": "kd_lib.models.builders:MODELS",
    "loss": "kd_lib.train.losses:LOSSES",
    "quantizer": "kd_lib.compress.quantization:QUANTIZERS",
}


def registry(kind: str) -> Registry[Any]:
    """Import the module that provides ``kind`` and return the registry it fills.

    Args:
        kind: A key of ``PROVIDERS`` (``"model"``, ``"loss"``, ``"quantizer"``).

    Raises:
        UnknownNameError: ``kind`` is not declared in ``PROVIDERS``.
        TypeError: the declared attribute is not a ``Registry`` of that kind (a stale entry of
            ``PROVIDERS``: a programming error, not a user's).
    """
    try:
        target = PROVIDERS[kind]
    except KeyError:
        raise UnknownNameError(
            f"unknown plugin kind {kind!r}; available: {', '.join(sorted(PROVIDERS))}",
            f"use one of them, or declare the kind's provider in {__name__}.PROVIDERS",
        ) from None
    module_path, _, attribute = target.partition(":")
    # lazy: a provider imports torch; load it only when its names are asked for.
    module = importlib.import_module(module_path)
    found = getattr(module, attribute, None)
    if not isinstance(found, Registry) or found.kind != kind:
        raise TypeError(f"{__name__}.PROVIDERS[{kind!r}] = {target!r} is not a Registry of kind {kind!r}")
    return found


def names(kind: str) -> list[str]:
    """The sorted names registered for ``kind`` by its provider module (imported on first use).

    Example:
        >>> "mlp" in names("model")
        True

    Raises:
        UnknownNameError: ``kind`` is not declared in ``PROVIDERS``.
    """
    return registry(kind).names()
