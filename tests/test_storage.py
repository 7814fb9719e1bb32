"""The storage interface (``easel.storage``): one contract for both backends, checked against
LocalStorage and S3Storage (on moto's in-process S3, for speed; ``test_s3.py`` runs the real
thing against Ceph's RADOS Gateway), hostile keys, and the S3 settings."""
from __future__ import annotations

import os
import time

import pytest

from easel.config import Settings
from easel.storage import LocalStorage, check_key, create_storage

HOSTILE = ["files/../secret", "files/a/../../b", "/etc/passwd", "files//x", "files/.hidden", "files/a\\b",
           "other/x", "files/%2e%2e/x", "files/a b", "files/\u00e9t\u00e9", "files/x\x00y", "..", "files/",
           "files", "", "files/" + "a" * 300, "files/." , "files/a/..", "uploads/u/../../../etc/passwd"]


@pytest.fixture
def aws_env(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, aws_env):
    if request.param == "local":
        yield LocalStorage(Settings(data_dir=tmp_path / "data"))
        return
    from moto import mock_aws

    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="unit-bucket")
        yield create_storage(Settings(data_dir=tmp_path / "data", storage="s3://unit-bucket/team/easel",
                                      output_urls="presigned", s3_presign_seconds=120))


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_keys_are_refused(key):
    with pytest.raises(ValueError):
        check_key(key)


def test_every_operation_refuses_a_hostile_key(storage, tmp_path):
    src = tmp_path / "x.png"
    src.write_bytes(b"x")
    for key in ("files/../../x", "uploads/a/../../../etc/passwd", "fetched/.x"):
        for call in (lambda: storage.put(key, src), lambda: storage.put_bytes(key, b"x"),
                     lambda: storage.get_bytes(key), lambda: storage.stat(key), lambda: storage.open(key),
                     lambda: storage.local_path(key, tmp_path / "c"), lambda: storage.delete(key),
                     lambda: storage.touch(key)):
            with pytest.raises(ValueError):
                call()
    with pytest.raises(ValueError):
        storage.delete_prefix("uploads/../")
    with pytest.raises(ValueError):
        list(storage.list("files/../"))
    with pytest.raises(ValueError):
        storage.save("../../escape", src)
    assert src.exists() and not (tmp_path / "escape").exists()


def test_the_storage_contract(storage, tmp_path):
    """put/get/stat/open/local_path/list/folders/touch/delete/delete_prefix/save/discard behave
    the same on both backends."""
    assert storage.stat("files/t1/0.png") is None
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("files/t1/0.png")
    with pytest.raises(FileNotFoundError):
        storage.open("files/t1/0.png")
    with pytest.raises(FileNotFoundError):
        storage.local_path("files/t1/0.png", tmp_path / "cache")

    out = tmp_path / "work" / "0.png"
    out.parent.mkdir()
    out.write_bytes(b"\x89PNG" + os.urandom(1000))
    data = out.read_bytes()
    record = storage.save("t1", out)
    assert record == {"name": "0.png", "contenttype": "image/png", "size": 1004, "path": "t1/0.png"}
    assert not out.exists()  # moved
    assert storage.get_bytes("files/t1/0.png") == data
    stream, size = storage.open("files/t1/0.png")
    try:
        assert size == 1004 and stream.read() == data
    finally:
        stream.close()
    local = storage.local_path("files/t1/0.png", tmp_path / "cache")
    assert local.read_bytes() == data and local.name == "0.png"
    st = storage.stat("files/t1/0.png")
    assert st.size == 1004 and abs(st.mtime - time.time()) < 120

    storage.put_bytes("uploads/t1/inputImage-a.jpg", b"jpeg")
    storage.put_bytes("uploads/t2/inputImage-b.jpg", b"jpeg2")
    storage.put_bytes("fetched/urls/abc", b"name")
    assert sorted(o.key for o in storage.list("uploads/")) == ["uploads/t1/inputImage-a.jpg",
                                                               "uploads/t2/inputImage-b.jpg"]
    assert sorted(name for name, _ in storage.folders("uploads")) == ["t1", "t2"]
    assert [o.key for o in storage.list("fetched/")] == ["fetched/urls/abc"]

    assert storage.delete_prefix("uploads/t1/") == 1
    assert [o.key for o in storage.list("uploads/")] == ["uploads/t2/inputImage-b.jpg"]
    assert storage.delete_prefix("uploads/t1/") == 0  # idempotent
    with pytest.raises(ValueError):
        storage.delete_prefix("uploads/")  # never a whole area

    storage.touch("fetched/urls/abc")
    assert storage.get_bytes("fetched/urls/abc") == b"name"  # touching keeps the content

    storage.discard("t1", [record])
    assert storage.stat("files/t1/0.png") is None and list(storage.list("files/")) == []
    storage.delete("files/t1/0.png")  # deleting what is gone is fine


def test_urls_served_or_presigned(storage):
    served = storage.url("k" * 32, "0.png")
    assert served == f"{storage.public_url}/v1/File/{'k' * 32}/0.png"
    assert storage.own_file(served) == ("k" * 32, "0.png")
    shown = storage.url("k" * 32, "0.png", key="files/t1/0.png")
    if storage.kind == "local":
        assert shown == served
    else:  # presigned in this fixture: SigV4, the prefix in the object key, the configured lifetime
        assert shown.startswith("https://unit-bucket.s3.amazonaws.com/team/easel/files/t1/0.png?") \
            or "/unit-bucket/team/easel/files/t1/0.png?" in shown
        assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in shown and "X-Amz-Expires=120" in shown
        assert storage.own_file(shown) is None
    # a stored path that is no storage key (never written by Easel) is never presigned: served instead
    assert storage.url("k" * 32, "0.png", key="files/../../etc/passwd") == served


def test_a_failed_upload_leaves_nothing(tmp_path, aws_env, monkeypatch):
    """All or nothing on S3: an upload that fails midway leaves no object (the transfer manager
    aborts the multipart upload), and the error is an OSError naming the key."""
    from moto import mock_aws

    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="unit-bucket")
        storage = create_storage(Settings(data_dir=tmp_path / "d", storage="s3://unit-bucket"))
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(40 * 1024**2))  # multipart: 3 parts of 16 MiB
        calls = {"n": 0}
        real = storage.client._make_api_call

        def flaky(operation, params):
            if operation == "UploadPart":
                calls["n"] += 1
                if calls["n"] == 2:
                    from botocore.exceptions import ClientError

                    raise ClientError({"Error": {"Code": "InternalError", "Message": "disk on fire"}}, operation)
            return real(operation, params)

        monkeypatch.setattr(storage.client, "_make_api_call", flaky)
        with pytest.raises(OSError, match="fetched/big"):
            storage.put("fetched/big.safetensors", big)
        monkeypatch.setattr(storage.client, "_make_api_call", real)
        assert storage.stat("fetched/big.safetensors") is None
        assert storage.client.list_multipart_uploads(Bucket="unit-bucket").get("Uploads", []) == []
        assert storage.put("fetched/big.safetensors", big) == 40 * 1024**2
        assert storage.stat("fetched/big.safetensors").size == 40 * 1024**2


def test_check_names_the_bucket_and_the_reason(tmp_path, aws_env):
    from moto import mock_aws

    with mock_aws():
        storage = create_storage(Settings(data_dir=tmp_path, storage="s3://no-such-bucket/p"))
        with pytest.raises(OSError, match="no-such-bucket.*does not exist"):
            storage.check()


@pytest.mark.parametrize("fields, match", [
    ({"storage": "s3://UPPER/x"}, "bucket name"),
    ({"storage": "s3://ok-bucket/../up"}, "prefix"),
    ({"storage": "gs://bucket"}, "storage must be 'local' or 's3://bucket/prefix'"),
    ({"output_urls": "presigned"}, "needs S3 storage"),
    ({"output_urls": "public"}, "output_urls must be 'served' or 'presigned'"),
    ({"storage": "s3://ok-bucket", "s3_presign_seconds": 604801}, "604800"),
    ({"storage": "s3://ok-bucket", "s3_presign_seconds": 0}, "604800"),
    ({"s3_addressing_style": "dns"}, "addressing_style"),
])
def test_bad_storage_settings_name_the_field(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        Settings(data_dir=tmp_path, **fields)


def test_storage_settings_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_STORAGE", "s3://my-bucket/easel/prod/")
    monkeypatch.setenv("EASEL_OUTPUT_URLS", "presigned")
    monkeypatch.setenv("EASEL_S3_PRESIGN_SECONDS", "900")
    monkeypatch.setenv("EASEL_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    s = Settings.from_env(data_dir=tmp_path)
    assert (s.storage.storage, s.storage.output_urls, s.storage.s3_presign_seconds) == ("s3://my-bucket/easel/prod/", "presigned", 900)
    storage = create_storage(s)
    assert (storage.kind, storage.bucket, storage.prefix, storage.shared) == ("s3", "my-bucket", "easel/prod", True)
    assert storage.object_name("files/u/0.png") == "easel/prod/files/u/0.png"
    assert create_storage(Settings(data_dir=tmp_path)).kind == "local"


def test_local_storage_keeps_its_layout(tmp_path):
    """Keys map to the data directory's folders as before (existing deployments keep their files)."""
    s = Settings(data_dir=tmp_path)
    storage = LocalStorage(s)
    storage.put_bytes("files/u/0.png", b"a")
    storage.put_bytes("uploads/u/in.png", b"b")
    storage.put_bytes("userfiles/f/x.png", b"c")
    storage.put_bytes("fetched/" + "0" * 64 + ".safetensors", b"d")
    assert (s.core.files_dir / "u" / "0.png").read_bytes() == b"a"
    assert (s.core.uploads_dir / "u" / "in.png").read_bytes() == b"b"
    assert (s.core.user_files_dir / "f" / "x.png").read_bytes() == b"c"
    assert (s.core.models_dir / "fetched" / ("0" * 64 + ".safetensors")).read_bytes() == b"d"
    assert not [p for p in tmp_path.rglob("*.part")]
    storage.delete("files/u/0.png")
    assert not (s.core.files_dir / "u").exists() and s.core.files_dir.exists()  # the task's empty folder goes
    src = s.core.models_dir / "fetched" / ("0" * 64 + ".safetensors")
    assert storage.put("fetched/" + src.name, src) == 1 and src.read_bytes() == b"d"  # its own file: a no-op
