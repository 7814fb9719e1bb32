"""A throwaway single-node Ceph cluster with a RADOS Gateway on loopback: a real S3 server for tests.

Why radosgw: it is a complete, independently written S3 implementation (Ceph's object gateway,
used in production behind many S3 endpoints) from Debian's own packages (``radosgw``,
``ceph-mon``, ``ceph-osd``), so the tests exercise boto3 against a server that checks real SigV4
signatures (a wrong secret, a tampered or expired presigned URL are refused by the server, not by
a mock), multipart uploads and paginated listings. moto stays for fast unit tests only.

The recipe (what ``vstart.sh`` does for developers, cut to the minimum):

1. ``ceph.conf`` with cephx off (``auth_*_required = none``; the messenger must then accept
   ``crc`` mode, radosgw's monitor client defaults to ``secure`` only), msgr2 on 127.0.0.1,
   every path in the temporary folder, ``osd objectstore = memstore`` (objects in RAM: no disk
   to prepare), pools of size 1 (``mon allow pool size one``), 8 PGs per pool, free-space
   warnings off (the monitor refuses to run on a full-looking disk otherwise).
2. ``monmaptool --create`` + ``ceph-mon --mkfs``, then ``ceph-mon -f``.
3. ``ceph osd create`` + ``ceph-osd --mkfs``, then ``ceph-osd -f`` (it adds itself to the CRUSH map).
4. ``radosgw -f`` with the beast frontend on a free loopback port (it creates its pools), and
   ``radosgw-admin user create`` with a generated access key and secret.

No manager daemon: nothing here needs one (the cluster reports ``HEALTH_WARN no active mgr``).
Every daemon runs in the foreground as a child of the test process, in its own process group,
and is stopped (SIGTERM, then SIGKILL) by :meth:`CephS3.stop`, also when start-up fails.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")


class CephError(RuntimeError):
    """The cluster did not start; the message ends with the daemons' log tails."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``), so no daemon outlives a killed test run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephS3:
    """One cluster in ``root``; :meth:`start` returns when S3 answers at :attr:`endpoint`."""

    def __init__(self, root: Path, time_scale: float = 1.0):
        self.root = Path(root)
        self.scale = max(1.0, time_scale)
        self.procs: dict[str, subprocess.Popen] = {}
        self.mon_port = _free_port()
        self.rgw_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.access_key = "EASEL" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.conf = self.root / "ceph.conf"

    # -- start / stop ----------------------------------------------------------------------------

    def start(self) -> "CephS3":
        """Bootstrap the cluster (typically 10 to 20 s).

        Raises:
            CephError: with the step that failed and the daemons' logs.
        """
        began = time.monotonic()
        try:
            self._write_conf()
            self._mon()
            self._osd()
            self._rgw()
        except BaseException as exc:
            logs = self.logs()
            self.stop()
            if isinstance(exc, CephError):
                raise CephError(f"{exc}\n{logs}") from None
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop every daemon (SIGTERM, SIGKILL after 10 s); safe to call twice."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self.procs.clear()

    # -- steps -------------------------------------------------------------------------------------

    def _write_conf(self) -> None:
        for sub in ("mon", "osd", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.fsid = str(uuid.uuid4())
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = v2:127.0.0.1:{self.mon_port}
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
ms client mode = crc secure
ms service mode = crc secure
ms cluster mode = crc secure
ms mon service mode = crc secure
ms mon cluster mode = crc secure
run dir = {r}/run
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
mon data = {r}/mon/$id
osd data = {r}/osd/$id
mon data avail warn = 1
mon data avail crit = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 1073741824
[client.rgw.easel]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw enable usage log = false
""")

    def _run(self, *args: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run([*args], capture_output=True, text=True, timeout=timeout * self.scale,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise CephError(f"{' '.join(args[:3])} ... did not finish in {timeout * self.scale:.0f} s") from None
        if done.returncode != 0:
            raise CephError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def _daemon(self, name: str, *args: str) -> None:
        with open(self.root / "log" / f"{name}.stderr", "ab") as out:
            self.procs[name] = subprocess.Popen([*args, "-f", "-c", str(self.conf)], stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=_die_with_parent)

    def _ceph(self, *args: str, timeout: float = 30) -> str:
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", str(int(timeout * self.scale)), *args,
                         timeout=timeout + 10)

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout * self.scale
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise CephError(f"{name} exited with {proc.returncode} while waiting for {what}")
            try:
                if ok():
                    return
            except (CephError, OSError, httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise CephError(f"timed out after {timeout * self.scale:.0f} s waiting for {what}")

    def _mon(self) -> None:
        monmap = self.root / "monmap"
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]",
                  str(monmap))
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._daemon("mon.a", "ceph-mon", "-i", "a")
        self._wait("the monitor's quorum", lambda: "a" in json.loads(
            self._ceph("quorum_status", "-f", "json", timeout=5)).get("quorum_names", []), 60)

    def _osd(self) -> None:
        osd_id = self._ceph("osd", "create").strip()
        if not osd_id.isdigit():
            raise CephError(f"ceph osd create answered {osd_id!r}")
        (self.root / "osd" / osd_id).mkdir(parents=True, exist_ok=True)
        self._run("ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs")
        self._daemon(f"osd.{osd_id}", "ceph-osd", "-i", osd_id)
        self._wait("the OSD to be up", lambda: json.loads(
            self._ceph("osd", "stat", "-f", "json", timeout=5)).get("num_up_osds") == 1, 60)

    def _rgw(self) -> None:
        self._daemon("client.rgw.easel", "radosgw", "-n", "client.rgw.easel")
        self._wait("the RADOS Gateway to answer", lambda: httpx.get(self.endpoint, timeout=2).status_code == 200, 90)
        self._run("radosgw-admin", "-c", str(self.conf), "-n", "client.rgw.easel", "user", "create", "--uid", "easel",
                  "--display-name", "Easel tests", "--access-key", self.access_key, "--secret", self.secret_key,
                  timeout=90)

    # -- diagnostics --------------------------------------------------------------------------------

    def logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every daemon's log and stderr, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) if (self.root / "log").is_dir() else ():
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(parts) or "(no daemon logs)"
