"""Alembic migrations: an empty database reaches head on both backends and matches the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from proxy.cli import main as cli_main
from proxy.db import SCHEMA_HEAD, alembic_config, is_current, make_engine, migrate
from proxy.schema import all_tables
from tests.databases import BACKENDS, database


@pytest.fixture(params=BACKENDS)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def test_empty_database_to_head_matches_the_models(empty_db: str) -> None:
    migrate(empty_db)
    engine = make_engine(empty_db)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            head = ScriptDirectory.from_config(alembic_config(empty_db)).get_current_head()
            assert context.get_current_revision() == head
            assert compare_metadata(context, all_tables().metadata) == []
        assert {
            "cache_entries",
            "cache_tags",
            "cache_counters",
            "lab_users",
            "gateway_secrets",
            "revoked_sessions",
        } <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_schema_head_constant_matches_the_scripts(empty_db: str) -> None:
    """proxy.db.SCHEMA_HEAD lets a serving process skip loading Alembic; it must be the head."""
    head = ScriptDirectory.from_config(alembic_config(empty_db)).get_current_head()
    assert head == SCHEMA_HEAD
    assert not is_current(empty_db)
    migrate(empty_db)
    assert is_current(empty_db)


def test_migrations_run_twice_and_downgrade_to_nothing(empty_db: str) -> None:
    migrate(empty_db)
    migrate(empty_db)  # a second gateway starting finds nothing to do
    command.downgrade(alembic_config(empty_db), "base")
    engine = make_engine(empty_db)
    try:
        assert "cache_entries" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_migrate_command(empty_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["migrate", "--database-url", empty_db]) == 0
    assert "up to date" in capsys.readouterr().out
    engine = make_engine(empty_db)
    try:
        assert "cache_entries" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_the_table_base_imports_no_table_module() -> None:
    """``proxy.tables`` is imported by every table module: it imports none of them back (the
    complete schema is gathered in ``proxy.schema``), so no import circle runs through it."""
    import ast

    import proxy.tables

    tree = ast.parse(Path(proxy.tables.__file__).read_text())
    imported = [
        name
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    ]
    assert not [name for name in imported if name.startswith("proxy")], imported
