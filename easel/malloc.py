"""A worker process's memory: the C allocator keeps the memory a denoising step freed for the
next step (:func:`tune_allocator`), and Python's cyclic collector leaves the start-up objects alone
(:func:`freeze_startup_objects`).

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults, a block above
the *dynamic* mmap threshold is a fresh ``mmap`` and goes back to the kernel when freed, and free
memory at the top of the heap beyond the trim threshold is returned as well: every step of a
denoising loop then maps its activations again, and the kernel zero-fills every page on first
touch. Measured on full-size SD 1.5 at 256² on the CPU (``docs/benchmarks.md``, "Overhead on
full-size weights"): 5.0 million minor page faults and 8.5 s of system time per image in Easel's
worker (1.5-1.9 million and 2.4-3.2 s in a plain script making the same diffusers call); with the
thresholds below, 37 thousand and 0.1 s, for 0.3 GB more resident memory (the step's working
set, kept instead of returned).

:func:`tune_allocator` fixes both thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) with
``mallopt``. It changes nothing where glibc's own settings are given (the environment variables
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``, or
``glibc.malloc.*`` tunables in ``GLIBC_TUNABLES``: an operator's choice wins), nor on a C
library without ``mallopt`` (macOS, Windows).
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys

MMAP_THRESHOLD = 32 * 1024 * 1024  # bytes: glibc's own ceiling for its dynamic threshold (64-bit)
TRIM_THRESHOLD = 1024 * 1024 * 1024  # bytes of free heap top kept before returning memory to the kernel
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set this process's glibc ``malloc`` thresholds (bytes, > 0): blocks up to ``mmap_threshold``
    come from the heap, and up to ``trim_threshold`` bytes of free heap top stay mapped. Call it
    once in a worker process, before its first inference; it raises nothing.

    Returns:
        True when both were set; False when left alone (the operator set glibc's variables, not
        Linux, or a C library whose ``mallopt`` is missing or refuses them).
    """
    if any(os.environ.get(name) for name in OPERATOR_VARIABLES) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1


def freeze_startup_objects() -> int:
    """Move every object alive now (the imports: torch, diffusers, transformers, the catalog, about
    0.5 million objects) out of the cyclic collector's reach (``gc.freeze``), after one collection,
    as the API process does at start. Call it once in a worker process after its imports and
    before its first load: a full collection during a pipeline load otherwise walks them all,
    0.27 of the 0.52 CPU-s of loading full-size SD 1.5 (``docs/benchmarks.md``, "Loading a
    full-size checkpoint"). Objects created later (pipelines, which the model cache may evict)
    stay collectable. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
