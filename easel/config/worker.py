"""``Settings.worker``: how the workers run tasks (count, GPUs, threads, leases, time limits)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerSettings:
    """The workers' settings (local worker processes of ``easel serve`` and ``easel worker``).

    Attributes:
        workers: Number of local worker processes.
        gpus: GPU indices (``CUDA_VISIBLE_DEVICES`` values) dealt round-robin to the local workers,
            one worker per GPU when ``workers`` equals their count; empty = every worker sees
            every GPU (and uses the first). ``"all"`` means every GPU torch sees: it is expanded
            where the workers start (``easel.executors.local.expand_gpus``).
        torch_threads: CPU threads (``torch.set_num_threads``) of each local worker process.
            0 (default) = automatic: without CUDA, the cores left after one for the API, shared
            among the workers (at least 1 each), so that the API answers while torch computes;
            with CUDA, torch's default. The ``easel worker`` of a separate machine keeps torch's
            default unless this is set.
        preview_interval: Every how many denoising steps a latent preview JPEG is stored with the
            progress event (and at the last step); 0 disables previews.
        poll_interval: Seconds an idle worker waits between store polls when not woken.
        lease_seconds: How long a worker's claim on a task lasts without renewal. The worker
            renews it at every step and from a heartbeat thread (every third of it); a running
            task whose lease expired is ended by whichever Easel process notices first.
        requeue_unstarted: A task whose lease expired before ``task_start`` (no inference ran)
            is queued again instead of failed.
        task_timeout_seconds: Longest a task may run from ``task_accept``; it then ends as
            failed with the reason. 0 = no limit.
        shutdown_grace_seconds: On SIGTERM/SIGINT, how long a running task may take to finish
            before it is ended as failed ("the server stopped ...") and its worker exits; idle
            workers stop at once. A worker that still has not exited a few seconds later is
            killed (SIGKILL) and its task failed by the server.
        preload: Tools (``OWNER/SLUG``) whose pipelines each local worker loads at start, before
            it takes its first task, so the first Run of these tools starts denoising at once;
            ``/readyz`` says which are warm.
    """

    workers: int = 1
    gpus: tuple[str, ...] = field(default_factory=tuple)
    torch_threads: int = 0
    preview_interval: int = 5
    poll_interval: float = 0.25
    lease_seconds: float = 30.0
    requeue_unstarted: bool = False
    task_timeout_seconds: float = 3600.0
    shutdown_grace_seconds: float = 5.0
    preload: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.shutdown_grace_seconds < 0:
            raise ValueError(f"shutdown_grace_seconds must be 0 or more, not {self.shutdown_grace_seconds}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be 0 (automatic) or more, not {self.torch_threads}")
