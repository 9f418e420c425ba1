"""Torch-free file helpers shared across the package: the cache folder, a file's SHA-256, whether a location
is a URL, the folders a command creates (so that a failed one can remove them), and the error for a missing
or misplaced file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """$MOBILENETV3_CACHE, else $XDG_CACHE_HOME/mobilenetv3, else ~/.cache/mobilenetv3."""
    if os.environ.get("MOBILENETV3_CACHE"):
        return Path(os.environ["MOBILENETV3_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mobilenetv3"


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL ("scheme://...") rather than a local path."""
    return "://" in str(location)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """`folder` and those of its parents that do not exist yet (what creating it would create), innermost first."""
    missing = []
    for candidate in (Path(folder), *Path(folder).parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (innermost first, as `missing_folders` lists them) while they are empty: what a failed
    command created, so that it leaves nothing behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there), or already gone
            break


#: Files in a run folder that a command taking a weights file most likely wanted, most likely first.
RUN_FOLDER_WEIGHTS = ("checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/swa.safetensors", "best.pt", "last.pt")


def missing_file_error(path: str | os.PathLike, what: str = "weights file") -> UserError:
    """`{what} not found: PATH`; for a directory (a run folder, say), that it is one and which weights
    file inside it was probably meant, rather than a "not found" that contradicts what the user sees."""
    path = Path(path)
    if not path.is_dir():
        return UserError(f"{what} not found: {path}")
    candidates = [path / name for name in RUN_FOLDER_WEIGHTS] + sorted(path.glob("*.safetensors"))
    hint = next((candidate for candidate in candidates if candidate.is_file()), None)
    return UserError(f"{path} is a directory; expected a {what}" + (f" (did you mean {hint}?)" if hint else ""))
