"""Options given as a plain dict, checked against a config dataclass (methods, data.noise, data.repetition...).

Its own module so that `workbench.config` and `workbench.methods` both use it without importing each other."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pydantic

from workbench.errors import did_you_mean


def dataclass_options(label: str, config_class: type, options: dict[str, Any]) -> dict[str, Any]:
    """Check `options` against a config dataclass (unknown keys, types, its own __post_init__ checks) and
    return them with defaults filled in; raise ValueError('[label.field] ...') naming the field."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in options:
        if key not in fields:
            raise ValueError(f"[{label}.{key}] unknown option{did_you_mean(key, fields)}")
    try:
        config = pydantic.TypeAdapter(config_class).validate_python(options)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # raised by the dataclass's own __post_init__ checks
            raise ValueError(f"[{label}] {message}") from None
        field = ".".join(str(p) for p in first["loc"])
        hint = _choice_hint(config_class, first) if first["type"] == "literal_error" else ""
        raise ValueError(f"[{label}.{field}] {message} (got {first.get('input')!r}){hint}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"[{label}] {err}") from None
    return dataclasses.asdict(config)


def _choice_hint(config_class: type, error: Any) -> str:
    """' (did you mean ...?)' for a value outside a top-level `Literal[...]` field's choices."""
    annotation = typing.get_type_hints(config_class).get(str(error["loc"][0]))
    return did_you_mean(str(error.get("input")), [str(choice) for choice in typing.get_args(annotation)])
