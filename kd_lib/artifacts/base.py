"""What every JSON file between steps shares: reading it, naming what is wrong, typed records.

A record validates what it reads (a wrong file fails here, naming the file and the field,
rather than as a ``KeyError`` three steps later) and writes back exactly what it read:
``Record.to_dict()`` gives the keys in their original order, only those that were given, and
the values unchanged (the number types below never coerce: an int stays an int, a float a
float), so the bytes on disk do not change when a step moves from plain dicts to records.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from kd_lib.artifacts.errors import ArtifactError


def _number(value: Any) -> Any:
    # Any real number (numpy's too, as float() accepted them); bool is an int to Python, never a measurement.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return value


def _as_given(value: Any) -> Any:
    return value


# Validated and written back as given: an int stays an int (``1`` must not come back as ``1.0``).
Number = Annotated[float, PlainValidator(_number), PlainSerializer(_as_given, return_type=Any)]
Int = StrictInt
Str = StrictStr
Bool = StrictBool


class Record(BaseModel):
    """A JSON object between steps; ``to_dict()`` gives back exactly what was validated.

    Subclasses declare the fields they know; ``extra="allow"`` subclasses keep the rest as is.
    """

    model_config = ConfigDict(extra="forbid")

    _order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        record = handler(data)
        if isinstance(data, Mapping) and isinstance(record, Record):
            record._order = [key for key in data if isinstance(key, str)]
        return record

    @model_serializer(mode="wrap")
    def _in_given_order(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        first = {key: out[key] for key in self._order if key in out}
        return first | {key: value for key, value in out.items() if key not in first}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict: the keys that were given, in their order, values unchanged."""
        return self.model_dump(exclude_unset=True)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a field or extra key that was given (as a record for nested ones), else ``default``."""
        if key in self.model_fields_set or key in (self.model_extra or {}):
            return getattr(self, key)
        return default


R = TypeVar("R", bound=BaseModel)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("checks", 0, "value")`` -> ``"checks[0].value"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(err: ValidationError) -> str:
    """The first problem of a validation error, naming its field (and how many more there are)."""
    first = err.errors()[0]
    where = field_path(tuple(first["loc"])) or "the top level"
    more = err.error_count() - 1
    return f"field {where}: {first['msg']}" + (f" (and {more} more problem(s))" if more else "")


def validate(model: type[R], data: Any, path: str | Path) -> R:
    """``model.model_validate(data)``; a mismatch is an ArtifactError naming ``path`` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(f"{path}: {describe(err)}") from None


def read_json(path: str | Path, missing: str = "") -> Any:
    """The parsed JSON of ``path``.

    Args:
        path: The file.
        missing: What to add to the error when the file does not exist (e.g. what the
            directory should hold).

    Raises:
        ArtifactError: the file is missing, unreadable or not JSON; the message names it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing" + (f"; {missing}" if missing else "")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable or not JSON ({err})") from None


def write_json(path: str | Path, data: Any, indent: int | None = None) -> Path:
    """Write ``json.dumps(data, indent=indent)`` to ``path``, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    return path
