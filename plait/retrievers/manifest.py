"""The index manifest: format version, encoder, dimensions, counts and per-file checksums.

Opening an index always checks that every file the manifest names exists with the recorded
size (cheap); `verify=True` also recomputes each sha256 (reads every byte once). Either check
failing raises `IndexCorruptError` naming the file, so a truncated copy or a bit flip never
turns into silently wrong rankings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.paths import sha256_file
from plait.retrievers.errors import IndexCorruptError, IndexFormatError, IndexNotFoundError

MANIFEST = "manifest.json"
FORMAT = "plait-colbert-serve"
FORMAT_VERSION = 1


def file_entries(
    directory: Path, names: list[str], on_file: Callable[[int], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named file, relative to `directory`. `on_file(n)` is told after
    the n-th file: hashing a large index takes a while."""
    entries = {}
    for n, name in enumerate(sorted(names), 1):
        entries[name] = {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
        if on_file is not None:
            on_file(n)
    return entries


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / MANIFEST)  # atomic: a half-written manifest is never seen


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IndexNotFoundError(f"index directory {directory} does not exist")
    if not path.is_file():
        raise IndexNotFoundError(f"{directory} is not an index: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory}: index format version {manifest.get('format_version')} is not supported "
            f"(this plait reads version {FORMAT_VERSION}); rebuild it with `plait index build`"
        )
    if not isinstance(manifest.get("files"), dict):
        raise IndexCorruptError(f"{path} has no 'files' table")
    return manifest


def check_files(directory: Path, manifest: dict[str, Any], verify: bool) -> None:
    """Raise if a file is missing, has the wrong size, or (with `verify`) the wrong sha256."""
    for name, entry in manifest["files"].items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IndexCorruptError(f"{directory / MANIFEST} names a file outside the index: {name}")
        if (
            not isinstance(entry, dict)
            or type(entry.get("bytes")) is not int
            or not isinstance(entry.get("sha256"), str)
        ):
            raise IndexCorruptError(f"{directory / MANIFEST}: the entry of {name} lacks its size or sha256")
        if not path.is_file():
            raise IndexNotFoundError(f"index {directory} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IndexCorruptError(
                f"index file {path} is {size} bytes, the manifest says {entry['bytes']}: "
                "the index is truncated or was modified; rebuild it"
            )
        if verify and sha256_file(path) != entry["sha256"]:
            raise IndexCorruptError(
                f"index file {path} fails its sha256 check: the index is corrupt; rebuild it"
            )
