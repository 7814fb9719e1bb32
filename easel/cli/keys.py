"""``easel projects rotate-key``: re-encrypt the projects' API secrets with a new operator key
(:mod:`easel.store.secretbox`; the procedure is in docs/configuration.md, "API secrets at rest")."""
from __future__ import annotations

from dataclasses import dataclass

from cryptography.fernet import Fernet

from easel.config import Settings
from easel.store import SecretBox, SecretKeyError, Store
from easel.store.secretbox import write_key_file


@dataclass
class Rotation:
    """What :func:`rotate_key` did: ``projects`` re-encrypted, with the first key of ``source``;
    ``dropped`` old keys removed from the key file."""

    projects: int
    source: str
    dropped: int = 0


def rotate_key(settings: Settings, new: bool = False, drop_old: bool = False) -> Rotation:
    """Re-encrypt every project's API secret with the first operator key.

    ``new``: first put a freshly generated key first in the key file (the old keys stay, so a
    running API process opens secrets with any of them, and re-reads the file when one does not
    open). ``drop_old``: afterwards, keep only the first key in the key file. Both need the key
    file: with ``EASEL_SECRET_KEY`` the operator puts the new key first in it on every process
    (a key to use is in the error message), runs this, then removes the old key.

    Raises:
        SecretKeyError: ``new``/``drop_old`` with ``EASEL_SECRET_KEY``, or a secret that opens
            with none of the keys (nothing is changed then).
    """
    box = SecretBox.for_settings(settings.core)
    if (new or drop_old) and box.key_file is None:
        raise SecretKeyError("the key comes from EASEL_SECRET_KEY: put a new key first in it on every process "
                             f"(e.g. {Fernet.generate_key().decode()}), restart them, run `easel projects "
                             "rotate-key` without --new, then remove the old key from EASEL_SECRET_KEY")
    if new:
        old = [k for k in box.key_file.read_text().splitlines() if k.strip()]
        write_key_file(box.key_file, [Fernet.generate_key().decode(), *old])
        box = SecretBox.for_settings(settings.core)
    store = Store(settings.core.database_url, secrets=box)
    try:
        store.migrate()
        count = store.rotate_secrets()
    finally:
        store.engine.dispose()
    dropped = 0
    if drop_old:
        keys = [k for k in box.key_file.read_text().splitlines() if k.strip()]
        write_key_file(box.key_file, keys[:1])
        dropped = len(keys) - 1
    return Rotation(count, box.source, dropped)
