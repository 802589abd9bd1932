"""Keep a long-running serving process's private memory close to what it actually uses.

Each query allocates a few MB of transient arrays (candidate rows copied out of the map,
similarity blocks). glibc raises its mmap threshold after such buffers are freed, so later ones
come from the heap and stay resident after `free` - RssAnon then reports the high-water mark
of every thread's arena rather than the index's real footprint. Pinning the threshold (which
also disables its dynamic adjustment) makes large buffers mmap-backed and returned on free.
Measured on SciFact (200 hybrid queries): private memory over the loaded encoder ~134 MB
without, ~87 MB with this setting. Only glibc is affected; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3


def return_large_buffers_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations >= `threshold_bytes` with mmap (process-wide). True if applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused")
    return ok
