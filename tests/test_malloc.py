"""A worker's C allocator keeps the memory a step freed for the next step (``easel.malloc``):
issue 24, Easel's worker paid 3x the page faults of a plain script per full-size image."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Each round takes three 20 MiB blocks and one of 112.5 MiB, writes every page, frees them: what a
# denoising step does with its activations and with oneDNN's reordered copy of SD 1.5's biggest
# convolution weight (above 32 MiB, the highest mmap threshold glibc accepts). Prints the minor
# page faults of rounds 4-12 (rounds 1-3 grow the heap).
# A child process's start: the allocator tuned (argv[1] "tuned") or left at glibc's defaults, and
# glibc's malloc/free callable on raw sizes.
PRELUDE = """
import ctypes, os, resource, sys
from easel.malloc import release_free_heap, tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""
ROUNDS = PRELUDE + """
sizes = [20 << 20] * 3 + [117964800]
def one_round():
    blocks = [libc.malloc(size) for size in sizes]
    for b, size in zip(blocks, sizes):
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
for _ in range(3):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    one_round()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _rounds(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**environ, **env}, timeout=120).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's mallopt")
def test_freed_step_memory_is_reused_not_mapped_again():
    tuned, faults = _rounds("tuned")
    default, default_faults = _rounds("default")
    assert (tuned, default) == ("True", "None")
    pages = 9 * (3 * (20 << 20) + 117964800) // os.sysconf("SC_PAGE_SIZE")
    assert default_faults > pages // 2  # glibc's defaults: the freed blocks went back to the kernel
    assert faults < pages // 50  # tuned: the same memory again, no zero-filled pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_an_operators_glibc_settings_win():
    assert _rounds("tuned", MALLOC_TRIM_THRESHOLD_="0")[0] == "False"
    assert _rounds("tuned", MALLOC_MMAP_MAX_="65536")[0] == "False"
    assert _rounds("tuned", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4096")[0] == "False"


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    code = """
import gc, weakref
from easel.malloc import freeze_startup_objects
class Node: pass
old = Node(); old.self = old; old_ref = weakref.ref(old); del old  # start-up garbage: collected, not frozen
frozen = freeze_startup_objects()
new = Node(); new.self = new; new_ref = weakref.ref(new); del new  # a pipeline's cycle, made later
gc.collect()
print(frozen, old_ref() is None, new_ref() is None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    frozen, old_collected, new_collected = out.stdout.split()
    assert int(frozen) > 1000 and old_collected == "True" and new_collected == "True"


RELEASE = PRELUDE + """
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
size = 20 << 20
blocks = [libc.malloc(size) for _ in range(10)]  # an evicted pipeline's CPU memory
pin = libc.malloc(1 << 20)  # a later, live allocation above it (too big for a small free chunk below):
assert not tuned or pin > blocks[-1]  # tuned: the heap's top cannot shrink past it, the free pages stay in the free lists
for b in blocks:
    ctypes.memset(b, 1, size)
loaded = resident_mib()
for b in blocks:
    libc.free(b)
freed = resident_mib()
from easel.malloc import resident_free_heap_bytes, release_free_heap_beyond
free = resident_free_heap_bytes()
kept = release_free_heap_beyond(1 << 30)  # between tasks: 200 MiB free is under the 1 GiB a worker keeps
released = release_free_heap_beyond(100 << 20)  # over 100 MiB: given back
again = release_free_heap_beyond(100 << 20)  # given back already: nothing resident to trim again
print(tuned, released, loaded - freed, loaded - resident_mib(), kept, free >> 20, again, resident_free_heap_bytes() >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc_trim")
def test_an_evicted_pipelines_memory_goes_back_to_the_kernel():
    """The cache's eviction (``release_free_heap``) and the worker's check between tasks
    (``release_free_heap_beyond``: only beyond what it keeps) give freed heap pages back."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", RELEASE, "tuned"], capture_output=True, text=True, check=True,
                         env=environ, timeout=120).stdout.split()
    assert out[:2] == ["True", "True"] and out[4] == "False" and int(out[5]) >= 200  # the 200 MiB, resident
    # once given back they are not counted again (mallinfo2's fordblks still counts them: a check on
    # it trimmed after every task, and each next task faulted its working set in again)
    assert out[6] == "False" and int(out[7]) < 100, out
    kept_after_free, gone_after_release = int(out[2]), int(out[3])
    assert kept_after_free < 20  # tuned: the freed 200 MiB stay mapped for the next step...
    assert gone_after_release > 180  # ...until the cache's eviction releases them
    untuned = subprocess.run([sys.executable, "-c", RELEASE, "default"], capture_output=True, text=True, check=True,
                             env=environ, timeout=120).stdout.split()
    assert untuned[:2] == ["None", "False"]  # nothing to do: glibc returned the blocks at their free
