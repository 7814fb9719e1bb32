"""Projects (tenants: API key, sealed API secret, auth mode) and the signature nonces they used."""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import Nonce, Project
from .rows import ProjectRow
from .secretbox import SecretBox

NONCE_SWEEP_SECONDS = 60.0  # how often a strict-nonce check also deletes the expired nonces
_PROJECT_BY_KEY = select(*Project.__table__.c).where(Project.apikey == bindparam("key"))
_PROJECT_BY_ID = select(*Project.__table__.c).where(Project.id == bindparam("id"))


def hash_apikey(apikey: str) -> str:
    """How an API key is stored: ``sha256:<hex>`` (a key is 128 random bits, so no salt or slow
    hash is needed). The API secret is not hashed: Wiro's signature is an HMAC keyed with it."""
    return "sha256:" + hashlib.sha256(apikey.encode("utf-8", "surrogatepass")).hexdigest()



class Projects:
    """The projects and nonces of the database ``db``."""

    def __init__(self, db: Database):
        self.db = db
        self._nonces_swept = 0.0

    def create_project(self, name: str, auth_mode: str = "signature", nonce_policy: str = "lenient") -> Project:
        """Create a project. The API key is stored only as its hash (:func:`hash_apikey`); the
        returned (detached) object carries the plaintext key, the only time it is available.

        Raises:
            ValueError: ``auth_mode`` not ``signature``/``apikey`` or ``nonce_policy`` not ``lenient``/``strict``.
        """
        if auth_mode not in ("signature", "apikey"):
            raise ValueError("auth_mode must be 'signature' or 'apikey'")
        if nonce_policy not in ("lenient", "strict"):
            raise ValueError("nonce_policy must be 'lenient' or 'strict'")
        apikey, apisecret = secrets.token_hex(16), secrets.token_hex(24)
        p = Project(name=name, apikey=hash_apikey(apikey), apisecret=self.db.box().seal(apisecret),
                    auth_mode=auth_mode, nonce_policy=nonce_policy, created_at=self.db.clock.now())
        with self.db.session() as s:
            s.add(p)
        p.apikey, p.apisecret = apikey, apisecret  # detached: not written back
        return p

    def set_nonce_policy(self, apikey: str, nonce_policy: str) -> ProjectRow | None:
        """Change the nonce policy of the project with ``apikey``; the project as
        :meth:`project_by_key` reads it, or None if there is none.

        Raises:
            ValueError: ``nonce_policy`` not ``lenient``/``strict``."""
        if nonce_policy not in ("lenient", "strict"):
            raise ValueError("nonce_policy must be 'lenient' or 'strict'")
        with self.db.session() as s:
            s.execute(update(Project).where(Project.apikey == hash_apikey(apikey)).values(nonce_policy=nonce_policy))
        return self.project_by_key(apikey)

    def project_by_key(self, apikey: str) -> ProjectRow | None:
        """The project whose API key is ``apikey`` (looked up by hash), or None (a read-only
        :class:`ProjectRow`; ``apikey`` is the stored hash, ``apisecret``
        the secret, opened).

        Raises:
            SecretKeyError: the secret does not open with this store's key."""
        rows = self.db.rows(_PROJECT_BY_KEY, {"key": hash_apikey(apikey)})
        return self._opened(rows[0]) if rows else None

    def project_by_id(self, project_id: int) -> ProjectRow | None:
        """The project with this id, or None (as :meth:`project_by_key` returns it)."""
        rows = self.db.rows(_PROJECT_BY_ID, {"id": project_id})
        return self._opened(rows[0]) if rows else None

    def _opened(self, row: Row) -> ProjectRow:
        stored = row.apisecret
        return ProjectRow(**{**row._asdict(), "apisecret": self.db.box().open(stored) if SecretBox.sealed(stored)
                             else stored})

    def use_nonce(self, project_id: int, nonce: str, retention_seconds: float) -> bool:
        """Record ``nonce`` for the project; False if it was already used (a replay). Nonces older
        than ``retention_seconds`` are deleted at most once a minute (not on every check)."""
        now = self.db.clock.now()
        try:
            with self.db.write() as conn:
                if now - self._nonces_swept > NONCE_SWEEP_SECONDS:
                    conn.execute(delete(Nonce).where(Nonce.created_at < now - retention_seconds))
                    self._nonces_swept = now
                conn.execute(insert(Nonce), {"project_id": project_id, "nonce": nonce, "created_at": now})
            return True
        except IntegrityError:
            return False

