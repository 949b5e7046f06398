"""API keys: how they are made, and how a presented key is checked against its stored hash.

A key reads ``nbk_<key id>_<secret>``. The key id is public (it finds the user's row without
trying every hash); the secret is 256 random bits. Only ``sha256(salt + key)`` is stored. A
slow password hash (scrypt, argon2) protects guessable passwords; these keys are random and
long, so a fast hash is as safe and keeps authentication cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_PREFIX = "nbk_"
_KEY = re.compile(r"nbk_([a-z0-9]{12})_[A-Za-z0-9_-]{43}")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key (shown once) and what is stored about it."""

    key: str
    key_id: str
    salt: str
    key_hash: str


def issue_key() -> IssuedKey:
    """A fresh random key with its id, salt and hash."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    salt = secrets.token_hex(16)
    return IssuedKey(key=key, key_id=key_id, salt=salt, key_hash=hash_key(key, salt))


def hash_key(key: str, salt: str) -> str:
    """The stored form of ``key``."""
    return hashlib.sha256(salt.encode() + key.encode("utf-8", "replace")).hexdigest()


def key_id_of(candidate: str) -> str | None:
    """The key id of something shaped like a key, else None."""
    match = _KEY.fullmatch(candidate)
    return match.group(1) if match else None


def key_matches(candidate: str, salt: str, key_hash: str) -> bool:
    """Whether ``candidate`` is the key behind ``key_hash``, compared in constant time."""
    return hmac.compare_digest(hash_key(candidate, salt), key_hash)
