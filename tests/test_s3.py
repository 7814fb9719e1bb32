"""Object storage against a real S3 server: Ceph's RADOS Gateway on loopback (``tests/ceph.py``).

- SigV4 is checked by the server: a wrong secret, a tampered and an expired presigned URL are refused;
- big files go as multipart uploads; listings and deletions page past 1000 keys;
- a fetched LoRA is shared through the bucket (a second machine does not download it again);
- two API processes sharing only the database and the bucket (the second with presigned URLs and
  no workers): a Run with a multipart image and a ``File/Upload`` image on IC-Light, outputs
  fetched from their served and presigned URLs, an output URL used as the next Run's input,
  InputOutputDelete removing the objects, hostile names kept inside the prefix, nothing on disk;
- the retention sweeper deletes expired outputs, orphaned uploads and unused LoRAs in the bucket;
- ``easel serve`` refuses to start on a missing bucket or wrong credentials, saying so.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from sqlalchemy import update

from conftest import TIME_SCALE, Server, png_size
from easel.config import Settings
from easel.storage import check_key, create_storage
from easel.store import Task
from easel.tasks import lifecycle as lc

IC = "wiro/ic-light-background"
QUICK = {"prompt": "a woman", "negativePrompt": "bad quality", "samples": 1, "steps": 3, "scale": "2.0",
         "highres_scale": "1.5", "highres_denoise": "0.5", "seed": "7"}


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(ceph_s3):
    """(admin boto3 client, bucket name, environment for Easel processes) on the session's radosgw."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=ceph_s3.endpoint, aws_access_key_id=ceph_s3.access_key,
                          aws_secret_access_key=ceph_s3.secret_key, region_name="us-east-1",
                          config=Config(signature_version="s3v4"))
    bucket = f"easel-{uuidlib.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    env = {"AWS_ACCESS_KEY_ID": ceph_s3.access_key, "AWS_SECRET_ACCESS_KEY": ceph_s3.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "EASEL_S3_ENDPOINT_URL": ceph_s3.endpoint}
    yield client, bucket, env


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The S3 environment in this process (boto3's credential chain reads it)."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3[2].items():
        monkeypatch.setenv(name, value)
    return s3


def keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def settings(tmp_path: Path, bucket: str, prefix: str, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", storage=f"s3://{bucket}/{prefix}",
                    s3_endpoint_url=os.environ["EASEL_S3_ENDPOINT_URL"], **kw)


def tamper(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the server checks signatures ----------------------------------------------------------------

def test_radosgw_refuses_a_wrong_secret_and_tampered_or_expired_presigned_urls(tmp_path, s3_env, monkeypatch):
    client, bucket, _ = s3_env
    storage = create_storage(settings(tmp_path, bucket, "sig", output_urls="presigned", s3_presign_seconds=300))
    storage.check()
    storage.put_bytes("files/t1/0.png", b"\x89PNG real bytes", content_type="image/png")
    url = storage.url("k" * 32, "0.png", key="files/t1/0.png")
    assert url.startswith(f"{os.environ['EASEL_S3_ENDPOINT_URL']}/{bucket}/sig/files/t1/0.png?")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=300" in url
    ok = httpx.get(url, timeout=30)
    assert ok.status_code == 200 and ok.content == b"\x89PNG real bytes"
    assert ok.headers["content-type"] == "image/png"

    sig = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert httpx.get(tamper(url, **{"X-Amz-Signature": flipped}), timeout=30).status_code == 403
    assert httpx.get(tamper(url, **{"X-Amz-Expires": "604800"}), timeout=30).status_code == 403  # longer life
    storage.put_bytes("files/t1/1.png", b"another file")
    other = url.replace("/files/t1/0.png?", "/files/t1/1.png?")  # the signature of 0.png for 1.png
    assert httpx.get(other, timeout=30).status_code == 403

    short = storage.presign("files/t1/0.png", seconds=1)
    assert httpx.get(short, timeout=30).status_code == 200
    time.sleep(2.5)
    expired = httpx.get(short, timeout=30)
    assert expired.status_code == 403 and "AccessDenied" in expired.text

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = create_storage(settings(tmp_path, bucket, "sig"))
    with pytest.raises(OSError, match="access denied"):
        wrong.check()
    with pytest.raises(OSError) as info:
        wrong.get_bytes("files/t1/0.png")
    assert not isinstance(info.value, FileNotFoundError) and "SignatureDoesNotMatch" in str(info.value)
    forged = wrong.presign("files/t1/0.png")
    assert httpx.get(forged, timeout=30).status_code == 403


def test_multipart_uploads_and_paged_listings(tmp_path, s3_env):
    client, bucket, _ = s3_env
    storage = create_storage(settings(tmp_path, bucket, "big"))
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(40 * 1024**2))
    assert storage.put("fetched/big.safetensors", big) == 40 * 1024**2
    head = client.head_object(Bucket=bucket, Key="big/fetched/big.safetensors")
    assert head["ContentLength"] == 40 * 1024**2 and head["ETag"].strip('"').endswith("-3")  # 3 parts of 16 MiB
    copy = storage.local_path("fetched/big.safetensors", tmp_path / "cache")
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert not list((tmp_path / "cache").glob(".*part"))

    names = [f"uploads/many/{i:05d}.png" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: storage.put_bytes(k, b"x"), names))
    assert sorted(o.key for o in storage.list("uploads/")) == names  # two pages
    assert dict(storage.folders("uploads")) .keys() == {"many"}
    assert storage.delete_prefix("uploads/many/") == 1100  # two DeleteObjects batches
    assert keys(client, bucket, "big/uploads/") == []


def test_a_fetched_lora_is_shared_through_the_bucket(tmp_path, s3_env, file_server):
    """Worker 1 fetches a LoRA URL and keeps it in the bucket; worker 2 (another data directory)
    gets it from the bucket although the URL is gone; a use after half the retention renews it."""
    from easel.net.fetch import FetchPolicy, fetch_safetensors

    client, bucket, _ = s3_env
    base, folder = file_server
    (folder / "shared.safetensors").write_bytes((folder / "sd15-lora-peft.safetensors").read_bytes())
    url = f"{base}/shared.safetensors"
    policy = FetchPolicy(allow=("127.0.0.1",))
    one = create_storage(settings(tmp_path / "w1", bucket, "lora"))
    first = fetch_safetensors(url, one, policy, tmp_path / "w1" / "cache")
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert first.name == f"{digest}.safetensors"
    index = f"lora/fetched/urls/{hashlib.sha256(url.encode()).hexdigest()}"
    assert keys(client, bucket, "lora/") == sorted([f"lora/fetched/{digest}.safetensors", index])

    (folder / "shared.safetensors").unlink()  # the URL is gone: only the bucket has it now
    two = create_storage(settings(tmp_path / "w2", bucket, "lora"))
    second = fetch_safetensors(url, two, policy, tmp_path / "w2" / "cache")
    assert second != first and second.read_bytes() == first.read_bytes()

    before = client.head_object(Bucket=bucket, Key=f"lora/fetched/{digest}.safetensors")["LastModified"]
    time.sleep(1.1)
    fetch_safetensors(url, two, policy, tmp_path / "w2" / "cache", refresh_after=0.5)
    after = client.head_object(Bucket=bucket, Key=f"lora/fetched/{digest}.safetensors")["LastModified"]
    assert after > before and client.get_object(Bucket=bucket, Key=index)["Body"].read() == first.name.encode()


# -- the retention sweeper ---------------------------------------------------------------------------

def _finished_task(store, project_id: int, uuid: str | None = None):
    task, _ = lc.submit(store, project_id=project_id, tool="wiro/text-to-image-sd-lora", parameters={}, inputs={},
                        callbackurl="", cost_per_second=0, uuid=uuid)
    assert lc.claim(store, "w1", 30) == task.id
    for status in (lc.PREPROCESS_START, lc.PREPROCESS_END, lc.ASSIGN, lc.START, lc.OUTPUT_FULL, lc.ERROR_FULL,
                   lc.END, lc.POSTPROCESS_START):
        assert lc.advance(store, task.id, status, owner="w1", lease_seconds=30)
    store.add_outputs(task.id, [{"name": "0.png", "contenttype": "image/png", "size": 3,
                                 "path": f"{task.uuid}/0.png"}])
    assert lc.advance(store, task.id, lc.POSTPROCESS_END, owner="w1", pexit="0")
    return store.get_task(task.id)


def test_retention_deletes_objects_in_the_bucket(tmp_path, s3_env):
    from easel.api.services import Services

    client, bucket, _ = s3_env
    s = settings(tmp_path, bucket, "ret", output_retention_seconds=60, orphan_retention_seconds=3600,
                 event_retention_seconds=0)
    api = Services.build(s, None)
    api.store.migrate()
    project = api.store.create_project("p")
    old, fresh = _finished_task(api.store, project.id), _finished_task(api.store, project.id)
    for task in (old, fresh):
        api.storage.put_bytes(f"files/{task.uuid}/0.png", b"png")
        api.storage.put_bytes(f"uploads/{task.uuid}/inputImage-a.png", b"in")
    orphan = str(uuidlib.uuid4())  # a Run refused after its upload was stored
    api.storage.put_bytes(f"uploads/{orphan}/inputImage-x.png", b"x")
    api.storage.put_bytes("fetched/" + "a" * 64 + ".safetensors", b"w")
    now = time.time()
    with api.store.engine.begin() as conn:  # "fresh" ends 1000 s from now (objects predate their task's end)
        conn.execute(update(Task).where(Task.id == fresh.id).values(postprocessendtime=now + 1000))

    assert api.maintenance.sweep(now=now + 120) == {"tasks": 1, "orphans": 0, "fetched": 0, "events": 0}
    assert keys(client, bucket, f"ret/files/{old.uuid}/") == keys(client, bucket, f"ret/uploads/{old.uuid}/") == []
    assert api.store.outputs(old.id) == [] and api.store.get_task(old.id).status == lc.POSTPROCESS_END
    assert keys(client, bucket, f"ret/files/{fresh.uuid}/") == [f"ret/files/{fresh.uuid}/0.png"]
    assert api.maintenance.sweep(now=now + 121)["tasks"] == 0  # once

    later = now + 7200  # past the orphan retention: the orphan upload and the unused LoRA go
    removed = api.maintenance.sweep(now=later)
    assert removed["orphans"] == 1 and removed["fetched"] == 1 and removed["tasks"] == 1  # fresh expired too
    assert keys(client, bucket, "ret/") == []


# -- two API processes on one bucket ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(s3, tmp_path_factory, tiny):
    """API 1 (served URLs, one local worker) and API 2 (presigned URLs, no workers) with their own
    data directories, sharing only the database and the bucket; the public URL is API 1's (as
    behind one load balancer)."""
    _, bucket, env = s3
    dirs = [tmp_path_factory.mktemp("api1"), tmp_path_factory.mktemp("api2")]
    (dirs[0] / "models").mkdir()
    (dirs[0] / "models" / "tiny").symlink_to(next(iter(tiny.values())).parent)
    storage = ("--storage", f"s3://{bucket}/srv")
    one = Server(dirs[0], storage, env=env)
    two = Server(dirs[1], (*storage, "--workers", "0"),
                 env={**env, "EASEL_OUTPUT_URLS": "presigned", "EASEL_S3_PRESIGN_SECONDS": "600",
                      "EASEL_DATABASE_URL": one.env["EASEL_DATABASE_URL"], "EASEL_PUBLIC_URL": one.base})
    one.start()
    try:
        two.start()
    except BaseException:
        one.stop()
        raise
    yield one, two
    two.stop()
    one.stop()


def _bucket_bytes(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _file_upload(server, project, s3, filename: str, data: bytes, stored_as: str) -> dict:
    """``POST /v1/File/Upload``; the file is one object ``srv/userfiles/<id>/<stored_as>``, served back."""
    client, bucket, _ = s3
    up = server.post(project, "/v1/File/Upload", files={"file": (filename, data)}).json()
    assert up["result"], up
    item = up["list"][0]
    assert item["name"] == stored_as
    assert keys(client, bucket, f"srv/userfiles/{item['id']}/") == [f"srv/userfiles/{item['id']}/{stored_as}"]
    assert httpx.get(item["url"], timeout=30).content == data  # served from the bucket by the API
    return item


def test_runs_with_uploads_through_the_bucket(fleet, s3):
    from test_ic_light import BG, FG

    client, bucket, _ = s3
    one, two = fleet
    project = one.project()
    _file_upload(one, project, s3, "fg.png", FG, "fg.png")

    # task 1 on API 1: a multipart image and the File/Upload name; outputs at served URLs
    r = one.post(project, f"/v1/Run/{IC}", files={"inputImage": ("bg.jpg", BG)},
                 data={**QUICK, "inputImage2Url": "fg.png"}).json()
    assert r["result"], r
    task = one.wait(project, r["taskid"], timeout=240)
    assert task["pexit"] == "0", task["debugerror"]
    uid = task["uuid"]
    assert keys(client, bucket, f"srv/uploads/{uid}/") == [f"srv/uploads/{uid}/inputImageUrl-bg.jpg"]
    assert keys(client, bucket, f"srv/files/{uid}/") == [f"srv/files/{uid}/0.png"]
    out = task["outputs"][0]
    assert out["url"] == f"{one.base}/v1/File/{out['accesskey']}/0.png"
    got = httpx.get(out["url"], timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == _bucket_bytes(client, bucket, f"srv/files/{uid}/0.png") and png_size(got.content) == (128, 192)
    head = httpx.head(out["url"], timeout=30)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(got.content)) and not head.content
    assert httpx.get(task["parameters"]["inputImageUrl"], timeout=30).content == BG  # the upload, as shown

    # task 2 through API 2 (no workers, presigned URLs): task 1's output URL as the background
    r2 = two.run(project, {**QUICK, "inputImageUrl": out["url"], "inputImage2Url": "fg.png"}, tool=IC)
    assert r2["result"], r2
    task2 = two.wait(project, r2["taskid"], timeout=240)
    assert task2["pexit"] == "0", task2["debugerror"]
    assert "inputImageUrl: fetched" not in task2["debugoutput"]  # read from the bucket, not over HTTP
    url2 = task2["outputs"][0]["url"]
    assert url2.startswith(f"{one.env['EASEL_S3_ENDPOINT_URL']}/{bucket}/srv/files/{task2['uuid']}/0.png?")
    assert "X-Amz-Signature=" in url2 and "X-Amz-Expires=600" in url2
    direct = httpx.get(url2, timeout=30)
    assert direct.status_code == 200 and direct.content == _bucket_bytes(client, bucket, f"srv/files/{task2['uuid']}/0.png")
    assert httpx.get(url2.replace("0.png?", "1.png?"), timeout=30).status_code == 403  # tampered
    served2 = one.detail(project, r2["taskid"])["outputs"][0]["url"]  # API 1 serves the same file
    assert httpx.get(served2, timeout=30).content == direct.content

    # InputOutputDelete removes the objects; the URLs stop working
    gone = one.post(project, "/v1/Task/InputOutputDelete", json={"taskid": r["taskid"]}).json()
    assert gone["result"], gone
    assert keys(client, bucket, f"srv/files/{uid}/") == keys(client, bucket, f"srv/uploads/{uid}/") == []
    assert httpx.get(out["url"], timeout=30).status_code == 404
    assert httpx.get(task["parameters"]["inputImageUrl"], timeout=30).status_code == 404
    assert one.detail(project, r["taskid"])["outputs"] == []
    assert two.post(project, "/v1/Task/InputOutputDelete", json={"taskid": r2["taskid"]}).json()["result"]
    assert httpx.get(url2, timeout=30).status_code == 404  # a valid signature for an object that is gone
    assert keys(client, bucket, f"srv/files/{task2['uuid']}/") == []

    # nothing of this went to the API processes' disks
    for srv in (one, two):
        assert not [p for sub in ("files", "uploads", "userfiles") for p in (srv.data_dir / sub).rglob("*") if p.is_file()]


def test_hostile_names_stay_inside_the_prefix(fleet, s3):
    from test_ic_light import FG

    client, bucket, _ = s3
    one, _ = fleet
    project = one.project()
    item = _file_upload(one, project, s3, "../../../../etc/evil .png", FG, "evil_.png")
    for name in ("..%2F..%2Fevil_.png", "%2e%2e", ".evil_.png", "evil_.png%00"):
        assert httpx.get(f"{one.base}/v1/File/{item['accesskey']}/{name}", timeout=30).status_code == 404
    bad = "0" * 32
    for name in ("..%2Fsrv%2Ffiles", "..", "x%2F..%2F..%2Fy"):
        assert httpx.get(f"{one.base}/v1/File/{bad}/{name}", timeout=30).status_code == 404
    # a Run whose multipart file name tries to climb out: refused (the LoRA file is not weights)
    # but stored, while it lasted, under the task's own folder only
    r = one.post(project, "/v1/Run/wiro/text-to-image-sd-lora",
                 files={"selectedLoraModelPrivateUrl": ("../../../outside.safetensors", b"not weights")},
                 data={"prompt": "x", "samples": 1, "steps": 2, "width": 64, "height": 64}).json()
    assert r["result"], r
    failed = one.wait(project, r["taskid"], timeout=120)
    assert failed["pexit"] == "1" and "safetensors" in failed["debugerror"]
    for key in keys(client, bucket, ""):  # every object is a safe key under one of this module's prefixes
        prefix, _, rest = key.partition("/")
        assert prefix in ("srv", "sig", "big", "lora", "ret"), key
        check_key(rest)
    assert [k for k in keys(client, bucket, "") if "outside" in k] == \
        [f"srv/uploads/{failed['uuid']}/selectedLoraModelPrivateUrl-outside.safetensors"]


# -- start-up checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing bucket", "wrong secret"])
def test_serve_refuses_an_unusable_bucket(tmp_path, s3, case):
    _, bucket, env = s3
    env = {**os.environ, **env}
    if case == "missing bucket":
        bucket, expect = "easel-no-such-bucket", "does not exist"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
        expect = "access denied"
    done = subprocess.run([sys.executable, "-m", "easel", "serve", "--data-dir", str(tmp_path), "--port", "9",
                           "--storage", f"s3://{bucket}/x"], env=env, capture_output=True, text=True,
                          timeout=120 * TIME_SCALE)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expect in done.stdout and bucket in done.stdout and "Traceback" not in done.stdout + done.stderr
