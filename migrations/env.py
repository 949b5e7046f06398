"""Alembic environment: runs migrations on the URL given by proxy.db.alembic_config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from proxy.db import make_engine
from proxy.schema import all_tables

target_metadata = all_tables().metadata


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Replicas starting together take turns; the later ones find nothing to do.
                connection.execute(text("SELECT pg_advisory_xact_lock(7239001)"))
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `nbia-proxy migrate`")
run_migrations_online()
