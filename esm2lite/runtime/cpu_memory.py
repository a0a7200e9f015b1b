"""Keep freed CPU memory in the process (what esm2lite-infer does before computing on a CPU).

glibc's malloc gives every block above its mmap threshold (at most 32 MiB, adjusted as blocks are
freed) pages of its own and unmaps them when the block is freed; it also returns the top of the
heap to the system once more than its trim threshold is free there. A forward over a CPU batch
allocates and frees activation tensors of tens of MB at every op ([8192, 1920] fp32 is 63 MB), so
each op pays the kernel to map fresh pages and zero them (a page fault per 4 KiB): x.abs() of an
[8192, 1920] fp32 tensor, 1 thread, 30.3 ms on fresh pages, 5.8 ms on reused ones; 35M int8
inference 1.58x faster with this (docs/cpu.md). Raising both thresholds lets a freed block be
reused at the next op, as PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc.

The cost: memory freed by the run is kept by the process until it exits, and blocks that no
longer fit one another's holes add to the peak: a 35M run over 8,192-token batches peaked at
806 MB instead of 604 MB in int8, 715 MB instead of 633 MB in fp32 (docs/cpu.md).
For this reason the library never calls this by itself; esm2lite-infer does, for a run on the CPU
(training measured no faster with it: docs/cpu.md). Elsewhere (not glibc) it does nothing.
"""

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB free at its top is kept


@functools.cache
def glibc():
    """The C library when it is glibc (mallopt and mallinfo2 there), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None
    return libc


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES, for this process. True when applied."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
