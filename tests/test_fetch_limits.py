"""Deadlines and decompression limits of the URL fetcher and the webhook sender, against hostile
servers on loopback: a slow drip, a stalled body, a dripped header, a gzip bomb, a slow webhook
receiver."""
from __future__ import annotations

import gzip
import http.server
import threading
import time

import pytest

from easel.net.fetch import FetchError, FetchPolicy, fetch_to_file, post_pinned

seen_headers: list[dict] = []


class _Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        seen_headers.append(dict(self.headers))
        try:
            if self.path == "/drip":  # one byte every 0.2 s, for ever (each read is quick)
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(500):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif self.path == "/stall":  # headers, then nothing
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.flush()
                time.sleep(30)
            elif self.path == "/header-drip":  # the status line and headers, one byte at a time
                for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 400:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.path == "/bomb":  # 1 MB of zeros in ~1 KB, gzip-encoded twice
                body = gzip.compress(gzip.compress(b"\0" * 1_000_000))
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip, gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        time.sleep(float(self.path.strip("/") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def hostile():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


POLICY = FetchPolicy(allow=("127.0.0.1",), max_bytes=10_000_000, connect_timeout=2, read_timeout=5, total_timeout=1.5)


@pytest.mark.parametrize("path", ["/drip", "/stall", "/header-drip"])
def test_a_download_ends_at_its_total_deadline(hostile, tmp_path, path):
    began = time.monotonic()
    with pytest.raises(FetchError, match="timed out|longer than"):
        fetch_to_file(f"{hostile}{path}", tmp_path / "x", POLICY)
    # the per-read timeout (5 s) would let these run for minutes; the total deadline ends them
    assert time.monotonic() - began < POLICY.total_timeout + 2.0


def test_encoded_bodies_are_refused_not_decompressed(hostile, tmp_path):
    seen_headers.clear()
    with pytest.raises(FetchError, match="gzip.*-encoded body"):
        fetch_to_file(f"{hostile}/bomb", tmp_path / "x", POLICY)
    assert seen_headers[-1].get("Accept-Encoding") == "identity"
    assert not (tmp_path / "x").exists() or (tmp_path / "x").stat().st_size == 0


def test_a_webhook_attempt_ends_at_its_deadline(hostile):
    began = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        post_pinned(f"{hostile}/10", b"{}", {}, FetchPolicy(allow=("127.0.0.1",), connect_timeout=1, read_timeout=1,
                                                              total_timeout=1))
    assert time.monotonic() - began < 3


def test_one_slow_webhook_receiver_does_not_delay_the_others(hostile, tmp_path):
    from easel.api.webhooks import WebhookDispatcher
    from easel.config import Settings
    from easel.store import Store
    from easel.tasks import lifecycle as lc

    settings = Settings(data_dir=tmp_path, fetch_allow=("127.0.0.1",), webhook_timeout=3.0)
    store = Store(settings.core.database_url)
    store.migrate()
    p = store.create_project("x")
    ids = []
    for path in ("/1.5", "/1.5", "/1.5", "/0"):  # three slow receivers are due first
        task, _ = lc.submit(store, project_id=p.id, tool="wiro/x", parameters={}, inputs={},
                            callbackurl=f"{hostile}{path}", cost_per_second=0)
        assert lc.cancel(store, task.id)
        ids.append(task.id)
        time.sleep(0.01)
    began = time.time()
    WebhookDispatcher(settings, store, lambda tid: {"id": str(tid)}).run_once()
    (fast,) = store.deliveries(ids[-1])
    assert fast.status == "delivered" and fast.delivered_at - began < 1.2  # not after 3 x 1.5 s
    assert all(store.deliveries(i)[0].status == "delivered" for i in ids)
    store.engine.dispose()


# -- SSRF: every non-public range, with an example address ------------------------------------------

SSRF_TABLE = [
    # (range, example, refused)
    ("IPv4 loopback 127.0.0.0/8", "127.0.0.1", True),
    ("RFC 1918 10.0.0.0/8", "10.1.2.3", True),
    ("RFC 1918 172.16.0.0/12", "172.16.5.4", True),
    ("RFC 1918 192.168.0.0/16", "192.168.1.1", True),
    ("link-local / cloud metadata 169.254.0.0/16", "169.254.169.254", True),
    ("CGNAT 100.64.0.0/10", "100.64.0.1", True),
    ("IPv4 multicast 224.0.0.0/4", "239.1.2.3", True),
    ("unspecified 0.0.0.0/8", "0.0.0.0", True),
    ("IPv6 loopback ::1", "::1", True),
    ("IPv6 ULA fc00::/7", "fd00::1", True),
    ("IPv6 link-local fe80::/10", "fe80::1", True),
    ("IPv6 site-local fec0::/10", "fec0::1", True),
    ("IPv6 multicast ff00::/8 (global scope)", "ff0e::1", True),
    ("IPv4-mapped ::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
    ("IPv4-compatible ::127.0.0.1", "::127.0.0.1", True),
    ("IPv4-compatible ::10.0.0.1", "::10.0.0.1", True),
    ("NAT64 64:ff9b::/96 of loopback", "64:ff9b::7f00:1", True),
    ("NAT64 64:ff9b::/96 of 169.254.169.254", "64:ff9b::a9fe:a9fe", True),
    ("NAT64 local-use 64:ff9b:1::/48", "64:ff9b:1::808:808", True),
    ("6to4 2002::/16 of loopback", "2002:7f00:1::", True),
    ("6to4 2002::/16 of 192.168.0.1", "2002:c0a8:1::", True),
    ("public IPv4", "8.8.8.8", False),
    ("public IPv6", "2001:4860:4860::8888", False),
    ("NAT64 of a public IPv4", "64:ff9b::808:808", False),
    ("6to4 of a public IPv4", "2002:808:808::", False),
]


@pytest.mark.parametrize("name,address,refused", SSRF_TABLE, ids=[row[0] for row in SSRF_TABLE])
def test_ssrf_classifier(name, address, refused):
    import ipaddress

    from easel.net.fetch import non_public

    assert (non_public(ipaddress.ip_address(address)) is not None) == refused, name


def test_a_runs_url_check_is_reused_for_a_while_per_host(monkeypatch):
    """check_url (a callbackUrl at Run) resolves a (scheme, host, port) once per CHECK_TTL: the
    same verdict, refusal included, without another lookup; an unresolvable host is asked again
    after CHECK_RETRY_TTL; another port or allow-list is its own entry."""
    from easel.net import addresses
    from easel.net.fetch import URLRefused, check_url

    lookups, now = [], [1000.0]
    real = addresses._resolve

    def counted(host, port, deadline):
        lookups.append((host, port))
        if host.endswith(".invalid"):  # RFC 6761: never resolves
            raise FetchError(f"cannot resolve host {host!r}")
        return real(host, port, deadline)

    monkeypatch.setattr(addresses, "_resolve", counted)
    monkeypatch.setattr(addresses.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(addresses, "_checks", {})
    strict, loose = FetchPolicy(), FetchPolicy(allow=("127.0.0.1",))
    for _ in range(3):
        with pytest.raises(URLRefused, match="non-public"):
            check_url("http://127.0.0.1:9/hook", strict, 5)
    assert lookups == [("127.0.0.1", 9)]
    check_url("http://127.0.0.1:9/other", loose, 5)  # the allow-list is part of the key
    check_url("http://127.0.0.1:9/again", loose, 5)
    with pytest.raises(URLRefused):
        check_url("http://127.0.0.1:10/hook", strict, 5)  # so is the port
    assert lookups == [("127.0.0.1", 9), ("127.0.0.1", 9), ("127.0.0.1", 10)]
    for _ in range(2):
        with pytest.raises(FetchError, match="cannot resolve"):
            check_url("https://hooks.invalid/x", strict, 5)
    assert lookups.count(("hooks.invalid", 443)) == 1
    now[0] += addresses.CHECK_RETRY_TTL + 1  # an unresolvable host is asked again sooner
    with pytest.raises(FetchError):
        check_url("https://hooks.invalid/x", strict, 5)
    with pytest.raises(URLRefused):
        check_url("http://127.0.0.1:9/hook", strict, 5)
    assert lookups.count(("hooks.invalid", 443)) == 2 and lookups.count(("127.0.0.1", 9)) == 2
    now[0] += addresses.CHECK_TTL + 1
    with pytest.raises(URLRefused):
        check_url("http://127.0.0.1:9/hook", strict, 5)
    assert lookups.count(("127.0.0.1", 9)) == 3
