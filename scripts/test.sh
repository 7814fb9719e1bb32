#!/usr/bin/env bash
# Set up, then run the whole test suite (a real server on loopback ports, tiny models) on SQLite,
# then a representative part of it again with every server on PostgreSQL (a fresh database per
# server directory on 127.0.0.1:5432): the task engine, runs, live events and webhooks, the
# hygiene checks and the two-server test. Running everything twice would double the suite's time
# for little: the SQL differences are in the store, which these tests exercise.
# EASEL_TEST_POSTGRES=0 skips the PostgreSQL pass; extra arguments go to the SQLite pass only.
# A missing service (PostgreSQL, Redis, RabbitMQ, Ceph, Chromium) skips its tests, listed at the end
# of the run; with CI=true it fails them, naming the service (tests/services.py), and a PostgreSQL
# that is not listening fails the PostgreSQL pass instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian packages the tests run for real, installed when missing: chromium for the playground's
# browser tests (Playwright drives it; no browser download) and Ceph's RADOS Gateway, a real S3
# server for the object-storage tests (tests/ceph.py starts a throwaway cluster on loopback).
APT=()
if [ ! -x /usr/bin/chromium ]; then APT+=(chromium fonts-dejavu-core); fi
# Node.js and npm for the official Node `openai` client test (tests/test_openai.py npm-installs the
# client itself, outside the repository, when missing)
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then APT+=(nodejs npm); fi
for bin in radosgw ceph-mon ceph-osd; do
  if ! command -v "$bin" >/dev/null; then APT+=(radosgw ceph-mon ceph-osd); break; fi
done
# the seeds' bash recipe (openssl, curl) and the docs' Node sample run as their readers run them
for pkg in openssl:openssl curl:curl node:nodejs; do
  if ! command -v "${pkg%%:*}" >/dev/null; then APT+=("${pkg#*:}"); fi
done
if [ ${#APT[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${APT[@]}"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ "${EASEL_TEST_POSTGRES:-1}" != "0" ] && [ $# -eq 0 ]; then
  if pg_isready -h 127.0.0.1 -q 2>/dev/null; then
    EASEL_TEST_POSTGRES=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
      tests/test_postgres.py tests/test_hygiene.py tests/test_runs.py tests/test_live.py \
      -k "not flux and not compile"
  elif [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ] || [ "${CI:-}" = "yes" ]; then
    echo "PostgreSQL is missing and CI=true requires it: nothing listens on 127.0.0.1:5432" >&2
    exit 1
  else
    echo "PostgreSQL is not listening on 127.0.0.1:5432: PostgreSQL pass skipped" >&2
  fi
fi
