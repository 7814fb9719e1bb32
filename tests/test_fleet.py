"""A fleet on one machine: two API processes (``easel serve --workers 0 --executor celery``) and two
``easel worker`` processes, each with its own working directory, sharing only a fresh PostgreSQL
database, a Redis broker and an S3 bucket on Ceph's RADOS Gateway (:func:`fleet_storage`).

Worker 1 serves the ``sd15`` and ``ic-light`` queues, worker 2 ``flux``, ``sdxl`` and ``instantid``,
so which worker runs a task is known from its tool. The seed requests of every implemented tool
run (smaller sizes and fewer steps, the seeds' bodies otherwise, input images uploaded first with
File/Upload); a WebSocket on API 1 follows a task that worker 2 runs; Kill through API 2 stops a
task on worker 1 within a step; ``kill -9`` of worker 2 mid-task loses nothing and runs nothing
twice; outputs are fetched from their URLs through both APIs."""
from __future__ import annotations

import io
import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import TIME_SCALE, Server, png_size
from easel.catalog import load_tools
from easel.tasks import lifecycle as lc
from fleet import WorkerProc, redis_broker
from test_live import check_sequence, ws_frames

# the seeds' requests, smaller: fewer steps and samples, the smallest sizes the tools accept
SMALLER = {
    "wiro/text-to-image-sd-lora": {"samples": 1, "steps": 3, "width": 64, "height": 64},
    "wiro/text-to-image-flux-lora-fast": {"steps": 3, "width": 64, "height": 64},
    "Adel_AI/Comics-Factory-v1": {"steps": 3, "width": 64, "height": 64},
    "wiro/ic-light-background": {"steps": 3},
    "wiro/instant-id-controlnet-lora": {"steps": 2},
}
ON_WORKER = {"wiro/text-to-image-sd-lora": 0, "wiro/ic-light-background": 0, "wiro/text-to-image-flux-lora-fast": 1,
             "Adel_AI/Comics-Factory-v1": 1, "wiro/instant-id-controlnet-lora": 1}
QUEUES = ("sd15,ic-light", "flux,sdxl,instantid")
FLUX = "wiro/text-to-image-flux-lora-fast"
SD = "wiro/text-to-image-sd-lora"
# each tool's example request (its seed page's own), from its catalog file
EXAMPLES = {tool: dict(load_tools()[tool].example.request) for tool in SMALLER}
CALLBACK_SENTENCE = "You can provide a callback URL; Wiro will send a POST request to it when the task is completed."


def _image(size: tuple[int, int], fmt: str, face: bool = False) -> bytes:
    from easel.synthetic.tiny_faces import draw_test_face

    image = Image.new("RGB", size, (120, 140, 160))
    Image.Image.paste(image, (200, 60, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    if face:
        draw_test_face(image, (30, 40, 62, 80), 0)
    buf = io.BytesIO()
    image.save(buf, fmt, quality=95)
    return buf.getvalue()


# the files the examples name (easel.catalog.examples), smaller
INPUT_FILES = {"bg-img2.png": _image((80, 48), "PNG"), "ic-light.png": _image((64, 96), "PNG"),
               "input-portrait-2.jpg": _image((96, 128), "JPEG", face=True)}
assert set(INPUT_FILES) == {name for tool in SMALLER for name in load_tools()[tool].example.files}


@pytest.fixture(scope="module")
def fleet_storage(ceph_s3):
    """The storage the whole fleet shares (outputs, Run uploads, File/Upload files, fetched LoRAs):
    a fresh bucket on the session's Ceph RADOS Gateway (``tests/ceph.py``). Yields
    ``(environment every process of the fleet gets, boto3 client, bucket)``; the bucket is emptied
    and removed afterwards."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=ceph_s3.endpoint, aws_access_key_id=ceph_s3.access_key,
                          aws_secret_access_key=ceph_s3.secret_key, region_name="us-east-1",
                          config=Config(signature_version="s3v4"))
    bucket = f"easel-fleet-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    env = {"EASEL_STORAGE": f"s3://{bucket}/fleet", "EASEL_S3_ENDPOINT_URL": ceph_s3.endpoint,
           "AWS_ACCESS_KEY_ID": ceph_s3.access_key, "AWS_SECRET_ACCESS_KEY": ceph_s3.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    try:
        yield env, client, bucket
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)


class Fleet:
    def __init__(self, apis: list[Server], workers: list[WorkerProc], project, s3, bucket: str):
        self.apis, self.workers, self.project, self.s3, self.bucket = apis, workers, project, s3, bucket

    def objects(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def store(self):
        return self.apis[0].store

    def seed(self, api: Server, tool: str) -> dict:
        """Send the seed's request for ``tool`` as its curl does (a JSON body under multipart/form-data)."""
        body = {**EXAMPLES[tool], **SMALLER[tool]}
        assert body["callbackUrl"] == CALLBACK_SENTENCE  # the seed's sentence, sent as is
        r = api.post(self.project, f"/v1/Run/{tool}", headers={"Content-Type": "multipart/form-data"},
                     content=json.dumps(body))
        assert r.json()["result"], r.text
        return r.json()

    def ran_once(self, taskid: str) -> list[str]:
        events = [e.type for e in self.store().events(int(taskid))]
        assert events.count(lc.ACCEPT) == 1 and events.count(lc.START) <= 1, events
        assert sum(events.count(s) for s in lc.TERMINAL) == 1 and events[-1] in lc.TERMINAL, events
        return events


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny, fleet_storage):
    from pg import create_database

    broker, prefix, clean_broker = redis_broker()
    try:
        url, drop_database = create_database()
    except BaseException:  # e.g. skipped: PostgreSQL is not reachable
        clean_broker()
        raise
    root = tmp_path_factory.mktemp("fleet")
    tiny_dir = Path(tiny["sd15"]).parent
    storage_env, client, bucket = fleet_storage
    # a lease short enough for the kill -9 test, long enough that a heartbeat starved on a loaded
    # machine does not lose it (4 s at scale 1, 12 s at the default 3)
    env = {"EASEL_QUEUE_PREFIX": prefix, "EASEL_LEASE_SECONDS": str(4 * TIME_SCALE), "EASEL_PREVIEW_INTERVAL": "0",
           **storage_env}
    apis, workers = [], []
    try:
        for i in (1, 2):
            (root / f"api{i}").mkdir()
            apis.append(Server(root / f"api{i}", ("--workers", "0", "--executor", "celery", "--broker", broker),
                               env=env, database_url=url))
        for i, queues in enumerate(QUEUES, 1):
            (root / f"worker{i}" / "models").mkdir(parents=True)
            # the tiny models the session already wrote (a worker would write its own on first use)
            (root / f"worker{i}" / "models" / "tiny").symlink_to(tiny_dir, target_is_directory=True)
            workers.append(WorkerProc(root / f"worker{i}", broker, url, env, queues, name=f"worker{i}"))
        starts = [threading.Thread(target=p.start) for p in [*apis, *workers]]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        assert all(w.proc is not None and w.proc.poll() is None for w in workers), [w.log()[-2000:] for w in workers]
        assert all(httpx.get(f"{a.base}/healthz").json()["ok"] for a in apis)
        project = apis[0].project()
        for name, data in INPUT_FILES.items():  # as the seeds' users: File/Upload first, then the Run names the file
            up = apis[0].post(project, "/v1/File/Upload", files={"file": (name, data)}).json()
            assert up["result"], up
        yield Fleet(apis, workers, project, client, bucket)
    finally:
        for p in [*workers, *apis]:
            p.stop()
        for a in apis:
            a.store.engine.dispose()
        clean_broker()
        drop_database()


def test_the_seed_requests_of_every_tool_run_on_the_worker_of_their_family(fleet):
    answers = {tool: fleet.seed(fleet.apis[i % 2], tool) for i, tool in enumerate(EXAMPLES)}
    for i, (tool, answer) in enumerate(answers.items()):
        api = fleet.apis[(i + 1) % 2]  # followed through the other API
        task = api.wait(fleet.project, answer["taskid"], timeout=300)
        assert task["pexit"] == "0", (tool, task["debugerror"])
        held_by = fleet.store().get_task(int(answer["taskid"])).worker_id
        assert held_by == fleet.workers[ON_WORKER[tool]].worker_id, (tool, held_by)
        fleet.ran_once(answer["taskid"])
        assert task["outputs"] and all(o["url"].startswith(api.base) for o in task["outputs"])
        uuid_ = task["uuid"]
        assert fleet.objects(f"fleet/files/{uuid_}/") == [f"fleet/files/{uuid_}/{o['name']}" for o in task["outputs"]]
        for output in task["outputs"]:  # written by a worker into the bucket, served by either API from there
            for base in (api.base, fleet.apis[i % 2].base):
                got = httpx.get(output["url"].replace(api.base, base), timeout=30)
                assert got.status_code == 200, (tool, base, got.status_code)
                size = png_size(got.content)
                assert size == (64, 64) if tool in (SD, FLUX) else min(size) >= 64, (tool, size)
    assert len(fleet.objects("fleet/userfiles/")) == len(INPUT_FILES)  # the File/Upload inputs, read by the workers
    for process in [*fleet.apis, *fleet.workers]:  # nothing of the fleet's files on a process's own disk
        assert not any((process.data_dir / name).exists() and any((process.data_dir / name).iterdir())
                       for name in ("files", "uploads", "userfiles")), process.data_dir


def test_a_websocket_on_api_1_follows_a_task_that_worker_2_runs(fleet):
    api1, api2 = fleet.apis
    answer = api2.run(fleet.project, {**EXAMPLES[FLUX], **SMALLER[FLUX], "steps": 4, "callbackUrl": ""}, tool=FLUX)
    frames = ws_frames(api1, answer["socketaccesstoken"])
    check_sequence(frames, 4, answer["taskid"], answer["socketaccesstoken"])
    assert fleet.store().get_task(int(answer["taskid"])).worker_id == fleet.workers[1].worker_id
    assert frames[-1]["message"][0]["url"].startswith(api1.base)  # the outputs as API 1 serves them
    fleet.ran_once(answer["taskid"])


def test_kill_through_api_2_stops_a_task_on_worker_1_within_a_step(fleet):
    api1, api2 = fleet.apis
    taskid = api1.run(fleet.project, {**EXAMPLES[SD], "samples": 1, "steps": 150, "width": 128, "height": 128,
                                      "callbackUrl": ""}, tool=SD)["taskid"]
    deadline = time.time() + 120 * TIME_SCALE
    while int((api2.detail(fleet.project, taskid)["progress"] or {}).get("stepCurrent", 0)) < 2:
        assert time.time() < deadline, api2.detail(fleet.project, taskid)
        time.sleep(0.1)
    before = int(api2.detail(fleet.project, taskid)["progress"]["stepCurrent"])
    killed = api2.post(fleet.project, "/v1/Task/Kill", json={"taskid": taskid}).json()
    assert killed["result"], killed
    task = api1.wait(fleet.project, taskid)
    assert task["status"] == "task_cancel" and task["outputs"] == []
    assert int(task["progress"]["stepCurrent"]) - before <= 3  # stopped within about one step
    assert fleet.store().get_task(int(taskid)).worker_id == fleet.workers[0].worker_id
    fleet.ran_once(taskid)


def test_a_worker_killed_mid_task_loses_nothing_and_runs_nothing_twice(fleet):
    api1, api2 = fleet.apis
    worker = fleet.workers[1]
    long = api1.run(fleet.project, {**EXAMPLES[FLUX], "steps": 150, "width": 128, "height": 128,
                                    "callbackUrl": ""}, tool=FLUX)["taskid"]
    api1.wait(fleet.project, long, until=("task_output",))
    behind = api2.run(fleet.project, {**EXAMPLES[FLUX], **SMALLER[FLUX], "callbackUrl": ""}, tool=FLUX)["taskid"]
    dead = worker.worker_id
    worker.kill9()
    # the APIs' lease rules end the task the dead worker held; nothing else runs it
    failed = api2.wait(fleet.project, long, timeout=60)
    assert failed["pexit"] == "1" and "stopped renewing its lease" in failed["debugerror"], failed
    assert fleet.store().get_task(int(long)).worker_id == dead
    fleet.ran_once(long)
    # the task queued behind it waits for a flux worker (none alive) and is not lost
    time.sleep(2)
    assert api1.detail(fleet.project, behind)["status"] == "task_queue"
    worker.start()
    done = api1.wait(fleet.project, behind, timeout=180)
    assert done["pexit"] == "0", done["debugerror"]
    assert fleet.store().get_task(int(behind)).worker_id == worker.worker_id != dead
    fleet.ran_once(behind)
    assert api2.detail(fleet.project, long)["status"] == "task_postprocess_end"  # ended once, never resumed
