"""S3-compatible object storage through boto3 (``EASEL_STORAGE=s3://bucket/prefix``).

Why boto3: it is the reference S3 client, maintained by AWS, and does what a hand-written client
would get subtly wrong: SigV4 signing and presigned URLs, the whole credential chain (environment,
profiles, ``~/.aws``, container and instance roles, SSO), retries with backoff, and the transfer
manager's multipart uploads and parallel ranged downloads for big files. It speaks to any
S3-compatible server (MinIO, Ceph RADOS Gateway, Cloudflare R2, Backblaze B2...) given an endpoint.

Objects are ``<prefix>/<key>`` in the bucket, ``key`` checked by :func:`easel.storage.check_key`
(no ``..`` or empty segments, so a hostile name cannot reach outside the prefix). Writes are all
or nothing: a PUT, or a multipart upload that is completed only after every part arrived and is
aborted otherwise; downloads go to a temporary file renamed into place. The bucket must exist;
the server checks it at start (:meth:`S3Storage.check`).
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from easel.config import Settings, parse_s3_url

from . import Storage, StoredObject, check_key
from . import content_type as guess_type

MULTIPART_THRESHOLD = 16 * 1024**2  # bytes; bigger files go as multipart uploads of this part size
_ERRORS = (BotoCoreError, ClientError, Boto3Error)  # what boto3 raises: turned into OSError here


class S3Storage(Storage):
    """Files as objects of one bucket under one prefix; see the module doc."""

    kind = "s3"
    shared = True

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.config = settings.storage  # the StorageSettings: the bucket, endpoint, addressing, presigning
        self.timeouts = (settings.fetch.fetch_connect_timeout, settings.fetch.fetch_read_timeout)
        self.bucket, self.prefix = parse_s3_url(self.config.storage)
        self.presigned = self.config.output_urls == "presigned"
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        """The boto3 S3 client (made on first use: settings travel to worker processes pickled,
        and a client is thread-safe but must not cross a fork)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    s = self.config
                    config = Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                                    connect_timeout=self.timeouts[0], read_timeout=self.timeouts[1],
                                    s3={"addressing_style": s.s3_addressing_style}, max_pool_connections=32)
                    self._client = boto3.session.Session().client(
                        "s3", endpoint_url=s.s3_endpoint_url or None, region_name=s.s3_region or None, config=config)
        return self._client

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)

    def object_name(self, key: str, prefix: bool = False) -> str:
        """The S3 object key of a storage key (``<prefix>/<key>``)."""
        check_key(key, prefix)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key_of(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if self.prefix else name

    @staticmethod
    def _missing(exc: Exception) -> bool:
        if not isinstance(exc, ClientError):
            return False
        err = exc.response.get("Error", {})
        return err.get("Code") in ("404", "NoSuchKey", "NotFound") or \
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404

    def _oserror(self, exc: Exception, key: str) -> OSError:
        """An :class:`OSError` saying what failed, for botocore's errors (never with credentials)."""
        if self._missing(exc):
            return FileNotFoundError(key)
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            return OSError(f"S3 {err.get('Code', '?')} on {key} in bucket {self.bucket}: {err.get('Message') or ''}".strip())
        return OSError(f"S3 request for {key} failed: {type(exc).__name__}: {exc}")

    # -- primitives ------------------------------------------------------------------------------

    def check(self) -> None:
        """``HeadBucket``: the bucket exists and these credentials may use it.

        Raises:
            OSError: naming the bucket, the endpoint and the reason.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _ERRORS as exc:
            where = self.config.s3_endpoint_url or self.client.meta.endpoint_url
            code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
            hint = {"404": "the bucket does not exist: create it first", "NoSuchBucket": "the bucket does not exist",
                    "403": "access denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE) and the bucket policy"}.get(code, f"{type(exc).__name__}: {exc}")
            raise OSError(f"storage s3://{self.bucket}/{self.prefix} at {where}: {hint}") from None

    def put(self, key: str, src: Path, move: bool = False, content_type: str | None = None) -> int:
        name = self.object_name(key)
        size = os.path.getsize(src)
        try:
            self.client.upload_file(str(src), self.bucket, name, Config=self._transfer(),
                                    ExtraArgs={"ContentType": content_type or guess_type(key)})
        except _ERRORS as exc:
            raise self._oserror(exc, key) from None
        if move:
            Path(src).unlink(missing_ok=True)
        return size

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.object_name(key), Body=data,
                                   ContentType=content_type or guess_type(key))
        except _ERRORS as exc:
            raise self._oserror(exc, key) from None

    def get_bytes(self, key: str) -> bytes:
        stream, _ = self.open(key)
        try:
            return stream.read()
        finally:
            stream.close()

    def stat(self, key: str) -> StoredObject | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except _ERRORS as exc:
            if self._missing(exc):
                return None
            raise self._oserror(exc, key) from None
        return StoredObject(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def open(self, key: str) -> tuple[BinaryIO, int]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key))
        except _ERRORS as exc:
            raise self._oserror(exc, key) from None
        return got["Body"], int(got["ContentLength"])

    def local_path(self, key: str, into: Path) -> Path:
        dest = Path(into) / key.rsplit("/", 1)[-1]
        name = self.object_name(key)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, name, tmp, Config=self._transfer())
            os.replace(tmp, dest)
        except _ERRORS as exc:
            raise self._oserror(exc, key) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))
        except _ERRORS as exc:
            if not self._missing(exc):
                raise self._oserror(exc, key) from None

    def delete_prefix(self, prefix: str) -> int:
        if not prefix.endswith("/") or prefix.count("/") < 2:
            raise ValueError("delete_prefix: give a folder below an area (uploads/<task uuid>/)")
        keys = [obj.key for obj in self.list(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.object_name(k)} for k in keys[i:i + 1000]]
            try:
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except _ERRORS as exc:
                raise self._oserror(exc, prefix) from None
            failed = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                raise OSError(f"S3 could not delete {len(failed)} object(s) under {prefix}: {failed[0].get('Code')}")
        return len(keys)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        name = self.object_name(prefix, prefix=True)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = self._key_of(obj["Key"])
                    try:
                        check_key(key)
                    except ValueError:
                        continue  # not ours (written by hand into the prefix): never touched
                    yield StoredObject(key, int(obj["Size"]), obj["LastModified"].timestamp())
        except _ERRORS as exc:
            raise self._oserror(exc, prefix) from None

    def touch(self, key: str) -> None:
        """Copy the object onto itself with its metadata replaced: S3 has no utime, and this is
        the documented way to renew ``LastModified`` (server-side, no bytes travel)."""
        name = self.object_name(key)
        try:
            self.client.copy({"Bucket": self.bucket, "Key": name}, self.bucket, name, Config=self._transfer(),
                             ExtraArgs={"MetadataDirective": "REPLACE", "ContentType": guess_type(key)})
        except _ERRORS as exc:
            if not self._missing(exc):
                raise self._oserror(exc, key) from None

    # -- URLs --------------------------------------------------------------------------------------

    def url(self, accesskey: str, name: str, key: str | None = None, base_url: str | None = None) -> str:
        """A presigned GET URL of ``key`` valid ``s3_presign_seconds`` when presigned URLs are
        chosen (``EASEL_OUTPUT_URLS=presigned``) and a key is given; else the API's URL."""
        if self.presigned and key is not None:
            try:
                return self.presign(key)
            except ValueError:  # not a storage key (a row no Easel wrote): the API still serves it
                pass
        return super().url(accesskey, name, key, base_url)

    def presign(self, key: str, seconds: int | None = None) -> str:
        """A SigV4 presigned ``GET`` URL of ``key`` (no request is made: signing is local)."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.object_name(key)},
            ExpiresIn=seconds or self.config.s3_presign_seconds)
