"""What every config section shares: the strict pydantic base, the config error, ``flatten``.

Every section model derives from ``_Strict`` (``extra="forbid"``), so a misspelt key is an
error that names its dotted path instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from kd_lib.errors import KdflowError


class ConfigError(KdflowError, ValueError):
    """A pipeline config is unreadable or invalid; the message lists every bad field."""

    default_fix = "correct the field(s) named above in the YAML file or in the --set override"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into ``{"a.b.c": leaf}``; lists, and dicts with dotted keys, stay leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        # A mapping whose keys contain dots (Kubernetes labels) stays one JSON leaf, so the
        # dotted params can be turned back into the same tree.
        if isinstance(value, dict) and value and not any("." in str(k) for k in value):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out
