"""Downloads in progress: the ``*.part`` files of the safe fetcher (:func:`easel.net.fetch.fetch_safetensors`).

A ``.part`` file is created and written by one process, which holds an exclusive ``flock`` on it
until the file is renamed or removed. A process that dies mid-download (``kill -9``, OOM, a lost
machine) loses the lock with it, so any other process can tell an abandoned ``.part`` file from
one being written, at once and without guessing from its age: :func:`remove_abandoned` (called
at start-up and by the retention sweeper, :mod:`easel.api.maintenance`) removes exactly the files
whose lock it can take. Where there is no ``flock`` (Windows), a file is abandoned when it is older
than a download may last (``Settings.fetch.fetch_total_timeout_seconds``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; remove_abandoned goes by age
    fcntl = None

SUFFIX = ".part"


def hold(fd: int) -> None:
    """Take the writer's lock on the open ``.part`` file ``fd`` (released when ``fd`` is closed,
    or when the process dies)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def remove_abandoned(folder: Path, max_download_seconds: float) -> int:
    """Remove the ``*.part`` files in ``folder`` that no live process is writing; returns how many.
    A missing folder or a file that vanishes meanwhile counts as nothing to do.

    ``max_download_seconds``: only without ``flock``, the age past which a file is abandoned."""
    removed = 0
    try:
        candidates = [p for p in folder.iterdir() if p.name.endswith(SUFFIX)]
    except OSError:
        return 0
    for path in candidates:
        try:
            if fcntl is None:
                if path.stat().st_mtime < time.time() - max_download_seconds:
                    path.unlink()
                    removed += 1
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer is alive
                continue
            else:
                path.unlink()
                removed += 1
            finally:
                os.close(fd)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed
