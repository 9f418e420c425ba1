"""Torch-free file helpers shared across the package: the cache folder and a file's SHA-256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """$MOBILENETV3_CACHE, else $XDG_CACHE_HOME/mobilenetv3, else ~/.cache/mobilenetv3."""
    if os.environ.get("MOBILENETV3_CACHE"):
        return Path(os.environ["MOBILENETV3_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mobilenetv3"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
