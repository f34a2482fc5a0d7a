"""The YAML the configs are written in (YAML 1.2 booleans and floats) and the `--set key=value` overrides."""

from __future__ import annotations

import re
from typing import Any

import yaml

from workbench.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are booleans; `no`, `off`, `yes`, `on` stay strings
    (so `eval_strategy: no` means the TrainingArguments value 'no', not False)."""


YamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


YamlLoader.add_implicit_resolver(  # YAML 1.2 floats such as 1e-3 (YAML 1.1 wants a dot: 1.0e-3)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML (`1e-3`, `true`, `[a, b]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set '{override}': expected key=value, e.g. training.learning_rate=1e-3")
    try:
        value = parse_yaml(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def override_string(key: str, value: Any) -> str:
    """`key=value` with the value written as YAML, the form `--set` takes."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
