"""Keep large CPU tensors from fragmenting the C heap.

glibc's malloc serves an allocation above its mmap threshold with a private mapping that is
returned to the system when freed, but it raises that threshold dynamically up to 32 MiB each time
such a block is freed. Loops that allocate and free many large tensors of a few sizes (the logit
lens: one Float[cells, vocab] block per reading, layer and chunk) then move onto the heap, whose
freed blocks fragment and are not returned: measured on SmolLM2 (vocabulary 49,152), decoding 320
positions x 31 layers under three lens variants peaked at 11.4 GB of resident memory instead of
1.5 GB. Fixing the threshold (which turns the dynamic adjustment off) keeps such blocks in
mappings; the run time was the same (57.9 s vs 57.7 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold."""
THRESHOLD_BYTES = 4 * 2**20
"""Allocations of at least this size (4 MiB) get their own mapping."""


@cache
def keep_large_blocks_mapped() -> bool:
    """Fix glibc's mmap threshold at :data:`THRESHOLD_BYTES` (once per process); returns whether it
    was set (False where the C library is not glibc). Allocations below the threshold are unaffected."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))


__all__ = ["THRESHOLD_BYTES", "keep_large_blocks_mapped"]
