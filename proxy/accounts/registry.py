"""Lab users in the database: add, list, revoke, rotate; plus the shared token secret and the
deployment id.

Synchronous SQLAlchemy Core, used by the ``nbia-proxy users`` commands and (from a thread) by a
running gateway's :class:`~proxy.accounts.directory.Directory`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from proxy.accounts.keys import issue_key
from proxy.accounts.tables import GatewaySecret, LabUser, RevokedSession
from proxy.errors import AccountError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN_SECRET = "token-signing"
_DEPLOYMENT = "deployment"


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user row as the gateway needs it (the key itself is never stored)."""

    name: str
    key_id: str
    salt: str
    key_hash: str
    admin: bool
    created_at: float
    key_changed_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Registry:
    """The ``lab_users``, ``gateway_secrets`` and ``revoked_sessions`` tables."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def add(self, name: str, *, admin: bool = False) -> str:
        """Create ``name`` and return its key (the only time it is shown)."""
        if not _NAME.fullmatch(name):
            raise AccountError(
                "a user name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a "
                "letter or digit"
            )
        issued = issue_key()
        now = self.clock()
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(LabUser).values(
                        name=name,
                        key_id=issued.key_id,
                        salt=issued.salt,
                        key_hash=issued.key_hash,
                        admin=admin,
                        created_at=now,
                        key_changed_at=now,
                        revoked_at=None,
                    )
                )
        except IntegrityError as exc:
            raise AccountError(f"user {name} already exists") from exc
        return issued.key

    def rotate(self, name: str) -> str:
        """Give ``name`` a new key (reinstating a revoked user); the old key and every token
        issued before stop working."""
        issued = issue_key()
        with self.engine.begin() as connection:
            changed = connection.execute(
                update(LabUser)
                .where(LabUser.name == name)
                .values(
                    key_id=issued.key_id,
                    salt=issued.salt,
                    key_hash=issued.key_hash,
                    key_changed_at=self.clock(),
                    revoked_at=None,
                )
            ).rowcount
        if not changed:
            raise AccountError(f"no user named {name}")
        return issued.key

    def revoke(self, name: str) -> None:
        """Lock ``name`` out: its key and tokens stop working (the row is kept for audit)."""
        with self.engine.begin() as connection:
            changed = connection.execute(
                update(LabUser).where(LabUser.name == name).values(revoked_at=self.clock())
            ).rowcount
        if not changed:
            raise AccountError(f"no user named {name}")

    def users(self) -> list[UserRecord]:
        """Every user, revoked ones included, by name."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(LabUser.__table__).order_by(LabUser.name)).all()
        return [
            UserRecord(
                name=row.name,
                key_id=row.key_id,
                salt=row.salt,
                key_hash=row.key_hash,
                admin=bool(row.admin),
                created_at=row.created_at,
                key_changed_at=row.key_changed_at,
                revoked_at=row.revoked_at,
            )
            for row in rows
        ]

    def token_secret(self) -> bytes:
        """The secret that signs gateway tokens, created on first use, the same for replicas
        (not used when a ``token_secret_file`` is set)."""
        return bytes.fromhex(self._shared(_TOKEN_SECRET, secrets.token_hex(32)))

    def deployment_id(self) -> str:
        """A random id of this database's deployment, created on first use (not a secret: it
        keeps tokens of one deployment out of another that reuses the same secret file)."""
        return self._shared(_DEPLOYMENT, secrets.token_hex(16))

    def _shared(self, name: str, fresh: str) -> str:
        """The value stored under ``name``, storing ``fresh`` if there is none yet."""
        query = select(GatewaySecret.value).where(GatewaySecret.name == name)
        with self.engine.connect() as connection:
            found = connection.execute(query).scalar()
        if found is not None:
            return found
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(GatewaySecret).values(name=name, value=fresh))
        except IntegrityError:
            pass  # another replica created it first: use theirs
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def end_session(self, session_id: str, expires_at: float) -> None:
        """Record an ended token session so that every replica refuses its tokens."""
        try:
            with self.engine.begin() as connection:
                # Rows whose tokens have expired anyway are dropped on the way.
                connection.execute(
                    delete(RevokedSession).where(RevokedSession.expires_at <= self.clock())
                )
                connection.execute(
                    insert(RevokedSession).values(session_id=session_id, expires_at=expires_at)
                )
        except IntegrityError:
            pass  # already ended

    def ended_sessions(self) -> dict[str, float]:
        """Ended sessions whose tokens have not expired yet (a read only: it runs often)."""
        query = select(RevokedSession.session_id, RevokedSession.expires_at).where(
            RevokedSession.expires_at > self.clock()
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return {row.session_id: row.expires_at for row in rows}
