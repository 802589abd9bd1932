"""Where plait keeps its files.

Everything plait writes (dequantised weights, DSPy's cache, the SQLite store) lives under one
directory, `.plait/` in the working directory unless `PLAIT_HOME` says otherwise, so a project
is self-contained and `make clean` removes it all.
"""

import hashlib
import os
from pathlib import Path


def plait_home() -> Path:
    return Path(os.environ.get("PLAIT_HOME", ".plait")).resolve()


def cache_dir(*parts: str) -> Path:
    path = plait_home().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks (index files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
