"""The services some tests need (PostgreSQL, Redis, RabbitMQ, Ceph, Chromium): what happens when
one is missing.

- Locally, the tests that need it are skipped with the reason, and the end of the pytest run
  lists the missing services and how many tests each one skipped (``pytest_terminal_summary``).
- In CI (``CI`` set to ``true``/``1``/``yes``, as CI systems and ``.ci/run`` set it), a missing
  service fails those tests instead, naming the service: a green CI run has run every test.

``EASEL_TEST_MISSING`` (comma-separated service names, any case, e.g. ``postgresql,redis``)
treats those services as missing even when they are up: how ``tests/test_services.py`` checks
this mechanism, and a way to run the suite without a service locally.

Loaded as a pytest plugin by ``tests/conftest.py`` (``-p services`` elsewhere).
"""
from __future__ import annotations

import os
from collections import Counter

import pytest

SERVICES = ("PostgreSQL", "Redis", "RabbitMQ", "Ceph", "Chromium")
_PREFIX = "service missing: "


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` is ``true``, ``1`` or ``yes``, any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def forced_missing(service: str) -> bool:
    """Whether ``EASEL_TEST_MISSING`` names ``service`` (one of :data:`SERVICES`, any case)."""
    names = {n.strip().lower() for n in os.environ.get("EASEL_TEST_MISSING", "").split(",")}
    return service.lower() in names


def missing(service: str, reason: str) -> None:
    """The test cannot run because ``service`` is missing (``reason``: what was tried): skip it,
    or in CI fail it naming the service. Never returns.

    Raises:
        pytest.skip.Exception / pytest.fail.Exception.
    """
    assert service in SERVICES, service
    if in_ci():
        pytest.fail(f"{service} is missing and CI=true requires it: {reason}", pytrace=False)
    pytest.skip(f"{_PREFIX}{service}: {reason}")


def require(service: str) -> None:
    """Call before probing ``service``: treated as missing when ``EASEL_TEST_MISSING`` names it."""
    if forced_missing(service):
        missing(service, "EASEL_TEST_MISSING names it")


def import_or_missing(module: str, service: str, reason: str = ""):
    """``import module`` for a test of ``service`` (:func:`missing` when it cannot be imported)."""
    require(service)
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        missing(service, reason or f"the Python module {module!r} is not installed ({exc})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """List the services that were missing and how many tests each one skipped."""
    per_service: Counter = Counter()
    reasons: dict[str, str] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        text = text.removeprefix("Skipped: ")
        if text.startswith(_PREFIX):
            service, _, reason = text[len(_PREFIX):].partition(": ")
            per_service[service] += 1
            reasons.setdefault(service, reason)
    if per_service:
        terminalreporter.section("missing services (their tests were skipped; CI=true fails them)")
        for service, n in per_service.most_common():
            terminalreporter.line(f"{service}: {n} test(s) skipped: {reasons[service]}")
