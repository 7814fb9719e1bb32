"""The CPU threads torch gets in a worker process (``WorkerSettings.torch_threads``)."""
from __future__ import annotations

import os

from easel.config import WorkerSettings


def torch_thread_count(worker: WorkerSettings, shares_cpu_with_api: bool, cuda: bool, cores: int) -> int | None:
    """The CPU threads a worker process should give torch (None: torch's default).

    ``worker.torch_threads`` when set; otherwise, for a worker on the same machine as the API
    (``shares_cpu_with_api``) and without CUDA, the ``cores`` left after one for the API divided
    among ``worker.workers`` workers, at least 1: with every core busy in torch, the API's
    answers wait for a core and a polling client slows the denoising loop (28 % measured with 2
    threads on 2 cores, see ``docs/benchmarks.md``). With CUDA the denoiser does not run on
    those threads: torch's default.
    """
    if worker.torch_threads > 0:
        return worker.torch_threads
    if not shares_cpu_with_api or cuda:
        return None
    return max(1, (cores - 1) // max(1, worker.workers))


def apply_torch_threads(worker: WorkerSettings, shares_cpu_with_api: bool) -> int | None:
    """Set this process's torch threads by :func:`torch_thread_count`; returns the count set (None:
    left at torch's default). Call it in a worker process before its first inference."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    threads = torch_thread_count(worker, shares_cpu_with_api, torch.cuda.is_available(), cores)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads
