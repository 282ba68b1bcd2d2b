"""Reading a config: YAML file or JSON, ``--set dotted.path=value`` overrides, validation.

Every invalid field is reported at once, each named by its dotted path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kd_lib.config.base import ConfigError
from kd_lib.config.pipeline import PipelineConfig


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} invalid field(s):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `kdflow validate` prints every valid field)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.path=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected dotted.path=value, e.g. distill.train.epochs=30")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r}: empty field path")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = tree
    # A list item is addressed by its index: distill.losses.0.params.temperature=2.
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                where = ".".join(keys[:depth])
                raise ConfigError(
                    f"override {assignment!r}: {where} has {len(node)} item(s); use an index 0..{len(node) - 1}"
                )
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {keys[depth - 1]} is a value, not a section")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def parse_config(tree: dict[str, Any], overrides: list[str] | None = None, origin: str = "config") -> PipelineConfig:
    """Validate a raw dict (plus dotted overrides) into a PipelineConfig or raise ConfigError."""
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config file, apply ``--set`` overrides, validate.

    Raises:
        ConfigError: the file is missing or not YAML, or fields are invalid (each named by
            its dotted path).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the config file ({err.strerror}); pass an existing YAML file") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, teacher:, ...)")
    return parse_config(tree, overrides, origin=str(p))


def config_from_json(text: str) -> PipelineConfig:
    """Inverse of PipelineConfig.to_json, used inside components."""
    return parse_config(json.loads(text), origin="config_json")
