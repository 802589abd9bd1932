"""Output files (`--out`, `--json-out`) checked before the work that fills them.

A compile or an evaluation can run for minutes before it writes its result; a path that cannot
be written (its directory missing or read-only, or a directory itself) must fail at once, not
after the work. The check makes and removes a file beside the target, which is exactly what the
final atomic write needs. Missing directories are not created: a typo should be an error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from plait.compilers.errors import OutputPathError


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """`path` as a Path, once it is known that a file can be written there; `flag` names the
    setting in the error (`--out`)."""
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{flag} {target} is a directory: name a file, e.g. {target / 'result.json'}")
    directory = target.parent
    if not directory.exists():
        raise OutputPathError(f"{flag} {target}: the directory {directory} does not exist")
    if not directory.is_dir():
        raise OutputPathError(f"{flag} {target}: {directory} is not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    except OSError as exc:
        raise OutputPathError(f"{flag} {target}: cannot write in {directory} ({exc.strerror})") from exc
    os.close(handle)
    os.unlink(probe)
    return target
