"""The rule for missing services (tests/services.py): locally a test whose service is missing is
skipped and the run's summary names the service; with ``CI=true`` it fails, naming the service.
Checked by running pytest on a small test file in a subprocess, with PostgreSQL made missing by
``EASEL_TEST_MISSING`` (whether or not it is up on this machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

PROBE = '''
import pg


def test_needs_postgresql():
    url, drop = pg.create_database()
    drop()
'''


def _pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "CI": ci, "EASEL_TEST_MISSING": "redis, postgresql"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "services",
                           "test_probe.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_service_fails_the_run_in_ci_naming_it(tmp_path):
    run = _pytest(tmp_path, "true")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 failed" in out and "PostgreSQL is missing and CI=true requires it" in out, out


def test_a_missing_service_skips_locally_and_the_summary_names_it(tmp_path):
    run = _pytest(tmp_path, "")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 skipped" in out, out
    assert "missing services" in out and "PostgreSQL: 1 test(s) skipped: EASEL_TEST_MISSING names it" in out, out
