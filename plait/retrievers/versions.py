"""Index versions: a built index is version 1; `plait index tune` adds 2, 3, ... beside it.

    idx/manifest.json, idx/embeddings.f16, ...    version 1, as `plait index build` wrote it
    idx/versions/2/manifest.json, ...             a tuned version: a complete index directory
    idx/tune/                                     the tuner's work files (queries, checkpoints)

Why each version is a complete directory: `IndexStore` opens any of them as it opens a built
index, checks and all, and a version can be copied or served on its own. Why that costs no
disk: the files a version shares with its base are hard links (a copy only where the file
system has none), and a version writes only what tuning changed. Opening `idx/` opens the
newest version; `version=1` (`--version 1`) still opens the index as built.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plait.retrievers.errors import IndexNotFoundError
from plait.retrievers.manifest import MANIFEST, file_entries, read_manifest, write_manifest

VERSIONS_DIR = "versions"


def versions(root: str | Path) -> dict[int, Path]:
    """Version number -> directory, oldest first; {1: root} for an index never tuned."""
    root = Path(root)
    found = {1: root}
    folder = root / VERSIONS_DIR
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.isdigit() and int(entry.name) > 1 and (entry / MANIFEST).is_file():
                found[int(entry.name)] = entry
    return dict(sorted(found.items()))


def version_dir(root: str | Path, version: int | None = None) -> Path:
    """The directory of `version` of the index at `root` (None: the newest)."""
    known = versions(root)
    if version is None:
        return known[max(known)]
    if version not in known:
        raise IndexNotFoundError(
            f"index {root} has no version {version}; it has {', '.join(map(str, known))}"
        )
    return known[version]


def version_number(manifest: Mapping[str, Any]) -> int:
    """The version a manifest describes (a built index's manifest names none: 1)."""
    return int(manifest.get("version", 1))


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def write_version(
    root: str | Path, base: Path, new_files: Mapping[str, Path], fields: Mapping[str, Any]
) -> Path:
    """Add the next version of the index at `root`: `base`'s files (hard links) with
    `new_files` (name in the index -> a file to copy in) added or replacing theirs, and a
    manifest of `base`'s fields updated by `fields`. Returns the new version's directory.

    The version is written under a temporary name and renamed at the end, so a crash never
    leaves a half-written version that `versions` would list."""
    root = Path(root)
    base_manifest = read_manifest(base)
    number = max(versions(root)) + 1
    folder = root / VERSIONS_DIR
    tmp = folder / f".{number}.writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries = {}
        for name, entry in base_manifest["files"].items():
            if name not in new_files:
                _link(base / name, tmp / name)
                entries[name] = entry  # the same bytes: the base's checksum holds
        for name, source in new_files.items():  # copied: the tuner may rewrite its own file later
            shutil.copy2(source, tmp / name)
        entries |= file_entries(tmp, list(new_files))
        manifest = {
            **base_manifest,
            **fields,
            "version": number,
            "base_version": version_number(base_manifest),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": entries,
        }
        write_manifest(tmp, manifest)
        tmp.rename(folder / str(number))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / str(number)
