"""A throw-away PostgreSQL database per test (local server at 127.0.0.1:5432, trust auth)."""
from __future__ import annotations

import os
import secrets

import services

ADMIN = "host=127.0.0.1 user=postgres dbname=postgres"


def create_database() -> tuple[str, callable]:
    """Create a fresh database; return its SQLAlchemy URL and a function that drops it.
    Skips the test when PostgreSQL or psycopg is not available (fails it in CI: :mod:`services`)."""
    psycopg = services.import_or_missing("psycopg", "PostgreSQL")
    try:
        admin = psycopg.connect(ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:
        services.missing("PostgreSQL", f"not reachable on 127.0.0.1: {exc}")
    name = f"easel_t{os.getpid()}_{secrets.token_hex(4)}"
    admin.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        try:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            admin.close()

    return f"postgresql+psycopg://postgres@127.0.0.1/{name}", drop
