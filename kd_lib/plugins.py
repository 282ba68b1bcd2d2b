"""One generic name -> object registry for every pluggable kind (models, losses, quantizers).

A config names a component by string (``arch: mlp``, ``scheme: dynamic_int8``); the registry
turns that string into the object and, when the name is wrong, says what the valid names are.
One class serves all kinds (torchdistill style) instead of one bespoke registry per kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

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
