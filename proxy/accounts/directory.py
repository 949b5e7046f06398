"""The running gateway's view of the lab accounts: a snapshot in memory, reloaded in the
background, so checking a key or a token's account costs a dict lookup and one hash.

Changes made with ``nbia-proxy users`` (in another process, or on another replica) reach every
gateway within ``accounts_refresh_seconds``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from proxy.accounts.keys import key_id_of, key_matches
from proxy.accounts.registry import Registry, UserRecord
from proxy.store_health import StoreHealth

log = logging.getLogger("nbia_proxy.accounts")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    by_name: dict[str, UserRecord] = field(default_factory=dict)
    by_key_id: dict[str, UserRecord] = field(default_factory=dict)


class Directory:
    """Active lab users, by name and by key id; also the login authority for gateway tokens."""

    def __init__(self, registry: Registry, health: StoreHealth | None = None) -> None:
        self.registry = registry
        #: The database's state: while it is unreachable the snapshot stays in force, and a
        #: key it does not hold cannot be told apart from one added since (see Access.check).
        self.health = health if health is not None else StoreHealth()
        self._snapshot = _Snapshot()
        self.version = 0  # moves with every load: answers derived before may be stale

    def load(self) -> None:
        """Read the users again (blocking: call from a thread in a running gateway)."""
        active = [user for user in self.registry.users() if user.active]
        self._snapshot = _Snapshot(
            by_name={user.name: user for user in active},
            by_key_id={user.key_id: user for user in active},
        )
        self.version += 1

    def user_for_key(self, key: str) -> UserRecord | None:
        """The active user whose API key this is, or None."""
        key_id = key_id_of(key)
        user = self._snapshot.by_key_id.get(key_id) if key_id else None
        if user is None:
            return None
        return user if key_matches(key, user.salt, user.key_hash) else None

    def user(self, name: str) -> UserRecord | None:
        """The active user called ``name``, or None."""
        return self._snapshot.by_name.get(name)

    def check_login(self, username: str, password: str) -> str | None:
        """An NBIA-style login: the user name, and the user's API key as password."""
        user = self.user_for_key(password)
        # Compare names only after the key matched: a wrong name with a right key fails too.
        return user.name if user is not None and user.name == username else None

    def still_valid(self, subject: str, issued_at: float) -> bool:
        """A token is void once its user is revoked or has rotated the key since it was issued."""
        user = self._snapshot.by_name.get(subject)
        return user is not None and issued_at >= user.key_changed_at
