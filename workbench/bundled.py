"""The files that ship inside the package: the built-in configs in `workbench/configs/`.

A built-in config goes by the name the docs give it, `configs/<path>`: `configs/quickstart.yaml`,
`configs/deepspeed/zero2.json`, `configs/finetune/arithmetic-lora.yaml`, `configs/studies/example.yaml`,
`configs/bose/stability.yaml`. `workbench.config.resolve_path` looks a path up as given (relative to the current
directory) first, then, when it starts with `configs/`, among the built-in configs. They are found through
`importlib.resources`, so the same names work from a git checkout and from an installed wheel, in any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PREFIX = "configs"  # the first part of a built-in config's name, and the folder in the package that holds them


def configs_dir() -> Path:
    """The folder of the built-in configs (a real folder: the package is installed as files, not zipped)."""
    return Path(str(resources.files("workbench").joinpath(PREFIX)))


def builtin_config(path: str | Path) -> Path | None:
    """The built-in file that the relative name `configs/<rest>` stands for, or None (another name, or no such
    file)."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] != PREFIX:
        return None
    candidate = configs_dir().joinpath(*parts[1:])
    return candidate if candidate.exists() else None


def builtin_name(path: Path) -> str:
    """The name `configs/<rest>` of a file in the built-in configs folder."""
    return str(Path(PREFIX) / path.relative_to(configs_dir()))


def builtin_matches(pattern: str) -> list[Path]:
    """The built-in configs that a glob pattern `configs/...` matches (e.g. `configs/studies/repetition-*.yaml`),
    sorted; [] for another pattern."""
    parts = Path(pattern).parts
    if len(parts) < 2 or parts[0] != PREFIX:
        return []
    return sorted(p for p in configs_dir().glob(str(Path(*parts[1:]))) if p.is_file())
