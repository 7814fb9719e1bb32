"""Leftovers of ended work (issue 21, item 8): a ``models/fetched/*.part`` download that no live
process is writing and the scratch folder of a task that has ended are removed by the retention
sweeper, whatever their age (the default orphan retention is a week), and by the first pass at
start-up; a download in progress and the scratch folder of a queued or running task stay."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TIME_SCALE
from easel.api.maintenance import Maintenance
from easel.config import Settings
from easel.net import fetch, partfiles
from easel.storage import create_storage
from easel.tasks import lifecycle as lc

HOLDER = """
import sys, tempfile, time
from easel.net import partfiles
fd, path = tempfile.mkstemp(dir=sys.argv[1], suffix=".part")
partfiles.hold(fd)
print(path, flush=True)
time.sleep(600)
"""


def _task(store, cancel: bool) -> str:
    project = store.create_project("p", "apikey")
    task, _ = lc.submit(store, project_id=project.id, tool="wiro/text-to-image-sd-lora", parameters={}, inputs={},
                        callbackurl="", cost_per_second=0.0)
    if cancel:
        assert lc.cancel(store, task.id)
    return task.uuid


@pytest.fixture
def leftovers(tmp_path, store):
    """A data directory with a download being written (by a live process that holds its lock), an
    abandoned one, the scratch folder of an ended task and that of a queued one."""
    settings = Settings(data_dir=tmp_path, database_url=store.url)  # the store fixture's database
    fetched = settings.core.models_dir / "fetched"
    fetched.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", HOLDER, str(fetched)], stdout=subprocess.PIPE, text=True)
    try:
        live_part = Path(writer.stdout.readline().strip())
        abandoned = Path(tempfile.mkstemp(dir=fetched, suffix=".part")[1])  # its writer died: no lock
        ended = Path(tempfile.mkdtemp(prefix=f"easel-{_task(store, cancel=True)}-", dir=tmp_path))
        queued = Path(tempfile.mkdtemp(prefix=f"easel-{_task(store, cancel=False)}-", dir=tmp_path))
        yield settings, {"live": live_part, "abandoned": abandoned, "ended": ended, "queued": queued}
    finally:
        writer.kill()
        writer.wait(10)


def test_the_sweeper_removes_abandoned_downloads_and_scratch_folders_of_ended_tasks(leftovers, store):
    settings, paths = leftovers
    sweeper = Maintenance(settings, store, lambda task: None, create_storage(settings))
    removed = sweeper.sweep()
    assert not paths["abandoned"].exists() and not paths["ended"].exists()
    assert paths["live"].exists() and paths["queued"].exists()  # written / still needed
    assert removed["fetched"] == 1 and removed["orphans"] == 1


def test_the_first_pass_at_start_up_removes_them(leftovers, store):
    settings, paths = leftovers
    sweeper = Maintenance(settings, store, lambda task: None, create_storage(settings))
    sweeper.start()
    try:
        deadline = time.monotonic() + 10 * TIME_SCALE
        while (paths["abandoned"].exists() or paths["ended"].exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not paths["abandoned"].exists() and not paths["ended"].exists()
        assert paths["live"].exists() and paths["queued"].exists()
    finally:
        sweeper.stop()


def test_a_download_in_progress_holds_its_part_file(tmp_path, monkeypatch):
    """fetch_safetensors's own ``.part`` file survives a sweep while the download runs (the
    sweep of any process, this one included, sees the writer's lock)."""
    seen = {}

    def download(url, dest, policy, **_kwargs):
        seen["removed"] = partfiles.remove_abandoned(dest.parent, 0.0)
        seen["exists"] = dest.exists()
        raise fetch.FetchError("stop here")

    monkeypatch.setattr(fetch, "fetch_to_file", download)
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(fetch.FetchError):
        fetch.fetch_safetensors("http://127.0.0.1:9/x.safetensors", create_storage(settings),
                                fetch.FetchPolicy(), settings.core.models_dir / "fetched")
    assert seen == {"removed": 0, "exists": True}
    assert list((settings.core.models_dir / "fetched").glob("*.part")) == []  # a failed download leaves none


def test_a_worker_start_removes_the_downloads_a_dead_worker_left(tmp_path):
    """A fleet worker's models folder is its own machine's: its start cleans it too."""
    from easel.tasks.runner import Worker

    settings = Settings(data_dir=tmp_path)
    (settings.core.models_dir / "fetched").mkdir(parents=True)
    abandoned = Path(tempfile.mkstemp(dir=settings.core.models_dir / "fetched", suffix=".part")[1])
    Worker(settings, "w-test")
    assert not abandoned.exists()
