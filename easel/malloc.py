"""A worker process's memory: the C allocator keeps the memory a denoising step freed for the
next step (:func:`tune_allocator`) and gives it back when the model cache evicts a pipeline
(:func:`release_free_heap`); Python's cyclic collector leaves the start-up objects alone
(:func:`freeze_startup_objects`).

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults a block at or
above the mmap threshold (dynamic, at most 32 MiB on 64-bit, and no ``mallopt`` value may be
higher) is a fresh ``mmap`` and goes back to the kernel at its ``free``, so every use maps it again
and the kernel zero-fills each of its pages on first touch. A denoising step makes such blocks
at every call: on the CPU, PyTorch's oneDNN convolution reorders each weight into oneDNN's
blocked layout at each call (``ideep::tensor::reorder_if_differ_in``), and SD 1.5's up-block
convolutions with 2 560 and 1 920 input channels have 112.5 and 84.4 MiB weights; the VAE
decoder's activations at 256² are 32-64 MiB. Measured on full-size SD 1.5 at 256², 10 steps,
one torch thread (``docs/benchmarks.md``, "Overhead on full-size weights"): 84 such maps, 7.2 GB
zero-filled, 1.8 million minor page faults and 3.5-4.3 s of system time per image. Whether a
block came from the heap instead depended on what the process had freed before (a free region
big enough), so the count moved between 0.00 and 5 million from one process to the next.

:func:`tune_allocator` turns ``malloc``'s use of ``mmap`` off (``M_MMAP_MAX`` 0: every block
comes from the heap, which glibc extends with ``brk``, or with ``mmap`` as its own fallback when
``brk`` cannot grow) and keeps up to 1 GiB of free heap top mapped (``M_TRIM_THRESHOLD``): the same
image then makes 20-50 page faults and 0.0 s of system time, for the step's working set kept
resident (0.7-0.9 GB anonymous against 0.4 GB with glibc's defaults, measured over 5 such images).
Free memory at the top of the heap beyond 1 GiB still goes back at the ``free``; what an evicted
pipeline freed below it goes back at :func:`release_free_heap`, which the model cache calls
after each eviction (``easel.weights.cache``); and a worker calls
:func:`release_free_heap_beyond` after each task, so that fragments left between live blocks
never keep more than 1 GiB of free memory resident between tasks (``bench/bench_rss.py``: 0.46-1.21
GiB anonymous over 30 mixed full-size tasks, not growing).

Neither changes anything where glibc's own settings are given (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or ``glibc.malloc.*``
tunables in ``GLIBC_TUNABLES``: an operator's choice wins), nor on a C library without ``mallopt``
(macOS, Windows, musl).
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys

TRIM_THRESHOLD = 1024 * 1024 * 1024  # bytes of free heap top kept before returning memory to the kernel
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
FREE_HEAP_KEPT = TRIM_THRESHOLD  # bytes of free heap a worker keeps between tasks (release_free_heap_beyond)
_tuned = False  # set by tune_allocator: release_free_heap only trims what tune_allocator kept


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33; every field in bytes or counts, ``size_t``)."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc on Linux, else None (opened once per process)."""
    try:
        if not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None)
    except (OSError, ValueError, AttributeError):  # no such confstr name, no C library to open
        return None


def tune_allocator(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make this process's glibc ``malloc`` take every block from the heap (no ``mmap`` per
    block) and keep up to ``trim_threshold`` bytes (> 0) of free heap top mapped. Call it once in
    a worker process, before its first inference; it raises nothing.

    Returns:
        True when both were set; False when left alone (the operator set glibc's variables, not
        glibc on Linux, or a ``mallopt`` that is missing or refuses them).
    """
    global _tuned
    if any(os.environ.get(name) for name in OPERATOR_VARIABLES) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned = mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    return _tuned


def release_free_heap() -> bool:
    """Give the kernel back every whole free page of the heap (glibc's ``malloc_trim(0)``: the free
    top beyond one page, and free pages inside the heap with ``MADV_DONTNEED``). The model cache
    calls it after an eviction: with :func:`tune_allocator` an evicted pipeline's CPU memory (an
    upcast copy of its weights, its buffers) would otherwise stay mapped until the heap reuses
    it. Costs a walk of the free lists (milliseconds). Returns True when memory was released;
    False when there was none, or when :func:`tune_allocator` did not tune this process (glibc
    then returns big blocks at their ``free`` itself)."""
    if not _tuned:
        return False
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim(0) == 1


def resident_free_heap_bytes() -> int | None:
    """Bytes of free ``malloc`` memory that are still resident in this process: its anonymous
    resident memory (``RssAnon`` in ``/proc/self/status``) less what ``malloc`` has handed out
    (glibc's ``mallinfo2()``: ``uordblks`` in the heaps plus ``hblkhd`` mapped per block). An upper
    bound (Python's object arenas and thread stacks count as free here, tens of MiB), and unlike
    ``mallinfo2().fordblks`` it drops once free pages were given back: ``fordblks`` still counts
    the pages :func:`release_free_heap` returned, so a check on it would trim after every task
    and make each next task fault its working set in again. None without glibc >= 2.33 or
    ``/proc``."""
    mallinfo2 = getattr(_glibc(), "mallinfo2", None)
    if mallinfo2 is None:
        return None
    try:
        with open("/proc/self/status") as status:
            rss_anon = next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    mallinfo2.argtypes, mallinfo2.restype = (), _MallInfo2
    info = mallinfo2()
    return max(0, rss_anon - int(info.uordblks) - int(info.hblkhd))


def release_free_heap_beyond(kept: int = FREE_HEAP_KEPT) -> bool:
    """Between tasks: when more than ``kept`` bytes of free heap are resident
    (:func:`resident_free_heap_bytes`: fragments between live blocks that a task of another size
    or tool left), give the free pages back (:func:`release_free_heap`). Costs a look at the free
    lists when nothing is released; what is released, the next task maps again once. Returns
    True when it released memory."""
    if not _tuned:
        return False
    free = resident_free_heap_bytes()
    if free is None or free <= kept:
        return False
    return release_free_heap()


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
