"""``Settings.storage``: where outputs, uploads and fetched LoRAs are kept, and for how long."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class StorageSettings:
    """The storage's settings (``easel.storage``) and the retention sweeps' (``easel.api.maintenance``).

    Attributes:
        storage: ``local`` (under ``data_dir``) or ``s3://bucket/prefix`` (S3-compatible object
            storage through boto3; credentials from boto3's default chain:
            ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``, instance
            roles). See ``docs/storage.md``.
        s3_endpoint_url: S3 endpoint (MinIO, Ceph RADOS Gateway, R2...); empty = boto3's choice
            (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, else AWS for the region).
        s3_region: S3 region; empty = boto3's (``AWS_REGION``/``AWS_DEFAULT_REGION``, ``~/.aws/config``).
        s3_addressing_style: ``auto``, ``path`` (``endpoint/bucket/key``, what most self-hosted
            servers need behind a plain host name) or ``virtual`` (``bucket.endpoint/key``).
        output_urls: ``served`` (default): output URLs point at this API
            (``/v1/File/{accesskey}/{name}``, the task's access key is the credential; with S3 the
            API streams the object); ``presigned``: S3 presigned GET URLs (needs ``s3://`` storage).
        s3_presign_seconds: Lifetime of a presigned URL, 1 to 604800 (7 days, SigV4's limit); a
            new one is made at every Task/Detail, socket message and webhook.
        output_retention_seconds: Delete a finished task's outputs and uploads this long after
            it ended (the record stays, as after InputOutputDelete); 0 = keep for ever.
        event_retention_seconds: Delete the per-step events (``task_output`` progress with its
            preview JPEG, ``task_error`` lines) of tasks that ended this long ago; the lifecycle
            events stay, so a late WebSocket client still gets the whole stage sequence and the
            end. 0 = keep for ever.
        orphan_retention_seconds: Delete upload folders and worker scratch folders that belong
            to no task (a refused or crashed request), and fetched LoRAs not used for this long;
            0 = never.
        sweep_interval_seconds: Seconds between retention sweeps (lease checks are every
            quarter ``lease_seconds``) in each API process.
    """

    storage: str = "local"
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_addressing_style: str = "auto"
    output_urls: str = "served"
    s3_presign_seconds: int = 3600
    output_retention_seconds: float = 0.0
    event_retention_seconds: float = 7 * 24 * 3600.0
    orphan_retention_seconds: float = 7 * 24 * 3600.0
    sweep_interval_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.storage in ("", "local"):
            object.__setattr__(self, "storage", "local")
        else:
            parse_s3_url(self.storage)
        if self.output_urls not in ("served", "presigned"):
            raise ValueError(f"output_urls must be 'served' or 'presigned', not {self.output_urls!r}")
        if self.output_urls == "presigned" and self.storage == "local":
            raise ValueError("output_urls 'presigned' needs S3 storage (storage = s3://bucket/prefix)")
        if not 1 <= self.s3_presign_seconds <= 604800:
            raise ValueError(f"s3_presign_seconds must be 1 to 604800 (7 days), not {self.s3_presign_seconds}")
        if self.s3_addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(f"s3_addressing_style must be 'auto', 'path' or 'virtual', not {self.s3_addressing_style!r}")


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def parse_s3_url(value: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (the prefix may be empty or several segments).

    Raises:
        ValueError: not an ``s3://`` URL, a bucket name outside S3's rules (3 to 63 lower-case
            letters, digits, ``.`` and ``-``), or a prefix with an unsafe or empty segment or over
            120 characters.
    """
    if not isinstance(value, str) or not value.startswith("s3://"):
        raise ValueError(f"storage must be 'local' or 's3://bucket/prefix', not {value!r}")
    bucket, _, prefix = value[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"storage {value!r}: the bucket name must be 3 to 63 lower-case letters, digits, "
                         "'.' and '-', starting and ending with a letter or digit")
    prefix = prefix.strip("/")
    if prefix and (len(prefix) > 120 or not all(_PREFIX_SEGMENT.match(p) for p in prefix.split("/"))):
        raise ValueError(f"storage {value!r}: the prefix must be at most 120 characters of A-Z a-z 0-9 . _ - "
                         "in /-separated segments, none empty or starting with '.'")
    return bucket, prefix
