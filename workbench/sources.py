"""Where a model, tokenizer or data set comes from: a local path or a hub name, and why a hub name cannot load
here (hub access off with no cached copy, or the hub unreachable)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

# A local data file's suffix -> the `datasets` builder that reads it.
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def looks_local(source: str) -> bool:
    """A data source that is a path rather than a hub name: starts like a path or ends like a data file."""
    return source.startswith((".", "/", "~")) or source.endswith(tuple(LOCAL_FORMATS))


def looks_like_model_path(name: str) -> bool:
    """A model or tokenizer name that is a path rather than a hub name ('org/name'): starts like a path or has
    more than one '/'."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_problem(name: str, repo_type: Literal["model", "dataset"]) -> str | None:
    """Why hub repository `name` cannot load here, or None: hub access is switched off and no copy is cached,
    or the hub's host does not answer (checked directly only when no proxy is configured)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    cached = [Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}"]
    offline = ["HF_HUB_OFFLINE"]
    if repo_type == "dataset":
        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"
        cached.append(Path(datasets_cache) / name.replace("/", "___"))
        offline.append("HF_DATASETS_OFFLINE")
    if any(path.exists() for path in cached):
        return None
    switched_off = [variable for variable in offline if _env_flag(variable)]
    if switched_off:
        return f"hub access is off ({switched_off[0]}=1) with no cached copy in {cached[0].parent}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        return f"the hub ({endpoint.geturl()}) is unreachable: {err}"
    return None
