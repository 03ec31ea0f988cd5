"""Large buffers from the OS and straight back to it: glibc's malloc, tuned once at start.

A queued request holds its body (up to --max-request-body) and reading and parsing it
briefly needs a few more buffers of that size. glibc serves an allocation of at least
``M_MMAP_THRESHOLD`` bytes with its own mapping and unmaps it on free, but it raises that
threshold to the size of every mapped block it frees (up to 32 MiB): after the first large
body, later ones come from the heap, whose freed pages mostly stay with the process.
Setting the threshold fixes it (and stops the raising). Measured with ten queued 8 MiB
bodies (tests/security/test_memory.py, docs/security.md): without this the broker grew by
1.2-1.3x the bytes held and kept about 190 MiB after they were answered; with it, 1.01x,
and it went back to about 100 MiB.

Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import platform

from shared.logging import get_logger

log = get_logger("broker.malloc")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from then on


def return_large_buffers() -> bool:
    """Serve large allocations from their own mappings from now on; False off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        log.warning("mallopt_failed", option="M_MMAP_THRESHOLD", value=MMAP_THRESHOLD)
    return done
