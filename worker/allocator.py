"""glibc malloc thresholds for the batch loop: the buffers one batch frees serve the next.

Every batch allocates and frees a few blocks of 100 KB to 1 MB: the Redis reply as it is read, the
joined payloads, the float32 images, the reconstruction and its error. With glibc's defaults such a
block is either mapped and unmapped again (above the mmap threshold) or, freed at the top of the
heap, trimmed back to the system; the next batch then faults every page in afresh. Measured on a
256-image batch of the default detector: about 380 page faults and 1.5 ms of kernel time per batch,
a fifth of the worker's time. Fixed thresholds keep the freed memory in the process instead: up to
the trim threshold (64 MB) may stay resident; in `make bench` the peak RSS under load stayed at
84 MB, as before (benchmarks/results/throughput.md).

Only glibc has `mallopt`; on another C library (musl, macOS) this does nothing. Operators who tune
malloc themselves (MALLOC_*_ variables, GLIBC_TUNABLES) turn it off with ANOMALY_TUNE_MALLOC=false.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Blocks below 16 MB come from the heap (a 4096-image float32 batch is 12.8 MB); up to 64 MB freed
# at its top stays there; the heap grows in steps of 16 MB rather than one batch's worth at a time.
BATCH_LOOP_SETTINGS: tuple[tuple[int, int], ...] = (
    (M_MMAP_THRESHOLD, 16 * 1024 * 1024),
    (M_TRIM_THRESHOLD, 64 * 1024 * 1024),
    (M_TOP_PAD, 16 * 1024 * 1024),
)


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """The process's `mallopt`, or None when its C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory(mallopt: Callable[[int, int], int] | None = None) -> dict[str, bool]:
    """Set the batch loop's malloc thresholds: name=value -> whether glibc took it (`mallopt`
    returns 1). Empty when the C library is not glibc. `mallopt` defaults to the process's own."""
    mallopt = mallopt or glibc_mallopt()
    if mallopt is None:
        return {}
    names = {M_MMAP_THRESHOLD: "mmap_threshold", M_TRIM_THRESHOLD: "trim_threshold", M_TOP_PAD: "top_pad"}
    return {f"{names[param]}={value}": mallopt(param, value) == 1 for param, value in BATCH_LOOP_SETTINGS}
