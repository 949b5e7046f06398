"""The accounts' tables (migrated by ``migrations/versions/0002_accounts.py``)."""

from __future__ import annotations

from sqlalchemy import Boolean, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from proxy.tables import Base


class LabUser(Base):
    """A lab member: the salted hash of their API key, never the key itself."""

    __tablename__ = "lab_users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), unique=True)  # the key's public prefix
    salt: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    key_changed_at: Mapped[float] = mapped_column(Float)  # tokens issued before are void
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class GatewaySecret(Base):
    """Values shared by every replica: the deployment id, and the secret that signs gateway
    tokens unless a ``token_secret_file`` holds it."""

    __tablename__ = "gateway_secrets"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class RevokedSession(Base):
    """A gateway token session ended by logout or refresh, until its tokens would expire."""

    __tablename__ = "revoked_sessions"

    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
