"""Upstream API keys at rest: encrypted with a key the database never sees.

The keys come from ``UPSTREAM_KEY_ENCRYPTION_KEY`` (settings: ``UPSTREAM_KEY_ENCRYPTION_KEYS``), a
comma-separated list of Fernet keys, newest first (``cryptography``'s ``MultiFernet``): the first
encrypts, every one decrypts. Rotation is: put a new key first, run ``manage.py
rotate_upstream_keys`` (re-encrypts every stored key with it), then drop the old one. A database
dump or backup alone therefore reveals no upstream key.

Fernet tokens are authenticated (AES-CBC + HMAC-SHA256), so a tampered or foreign ciphertext is
refused rather than decrypted into garbage. Nothing here logs or formats a plain key.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

GENERATE = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'


class KeyVaultError(Exception):
    """The encryption key is missing, or cannot decrypt what was stored (wrong or rotated away)."""


@lru_cache(maxsize=4)
def _vault(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key) for key in keys])


def _current() -> MultiFernet:
    keys = tuple(settings.UPSTREAM_KEY_ENCRYPTION_KEYS)
    if not keys:
        raise KeyVaultError(f"UPSTREAM_KEY_ENCRYPTION_KEY is not set; generate one with {GENERATE}")
    return _vault(keys)


def configured() -> bool:
    return bool(settings.UPSTREAM_KEY_ENCRYPTION_KEYS)


def encrypt(plain: str) -> str:
    return _current().encrypt(plain.encode()).decode("ascii")


def decrypt(token: str) -> str:
    try:
        return _current().decrypt(token.encode("ascii")).decode()
    except (InvalidToken, UnicodeError):
        raise KeyVaultError(
            "the stored key cannot be decrypted with UPSTREAM_KEY_ENCRYPTION_KEY (a different or rotated-away key)"
        ) from None


def rotate(token: str) -> str:
    """``token`` re-encrypted with the first (newest) key."""
    try:
        return _current().rotate(token.encode("ascii")).decode("ascii")
    except (InvalidToken, UnicodeError):
        raise KeyVaultError("a stored key cannot be decrypted with any key in UPSTREAM_KEY_ENCRYPTION_KEY") from None
