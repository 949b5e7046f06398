"""The one start-up line says what is in effect for settings other than the defaults: where the
kept binaries are (binary_dir may be a shared volume away from the data dir), offline, workers,
accounts, the audit log's place and format, and never a password (database or Redis).

tests/test_audit.py checks the line a running gateway logs with the default settings.
"""

from __future__ import annotations

from pathlib import Path

from proxy.app import create_app, describe
from tests.gateway_server import make_settings

UPSTREAM = "http://127.0.0.1:9"


def line_for(tmp_path: Path, **settings: object) -> str:
    configured = make_settings(tmp_path / "data", UPSTREAM, **settings)
    gateway = create_app(configured)
    return describe(configured, gateway.upstreams, gateway.audit)


def test_the_line_names_a_binary_dir_away_from_the_data_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared-volume" / "binaries"
    line = line_for(tmp_path, binary_dir=shared)
    assert f"series cache {shared.resolve()};" in line
    assert f"data dir {(tmp_path / 'data').resolve()};" in line


def test_the_default_binaries_are_in_the_data_dir_and_off_is_said(tmp_path: Path) -> None:
    binaries = (tmp_path / "data" / "binaries").resolve()
    assert f"series cache {binaries};" in line_for(tmp_path)
    assert "series cache off;" in line_for(tmp_path, binary_cache_enabled=False)
    assert "series cache off;" in line_for(tmp_path, cache_enabled=False)


def test_the_line_says_what_other_settings_are_in_effect_without_passwords(
    tmp_path: Path,
) -> None:
    audit = tmp_path / "logs" / "nbia-audit.log"
    line = line_for(
        tmp_path,
        offline=True,
        workers=3,
        audit_log=str(audit),
        audit_format="combined",
        database_url="postgresql+psycopg://lab:DB-PW-3391@db.example.org:5432/nbia",
        redis_url="redis://:REDIS-PW-5512@redis.example.org:6379/0",
    )
    for expected in (
        f"nbia {UPSTREAM} at /",
        "offline on;",
        "workers 3;",
        f"audit log {audit} (combined);",
        "database postgresql+psycopg://lab:***@db.example.org:5432/nbia;",
        "shared store redis redis.example.org, prefix nbia-proxy:",
    ):
        assert expected in line, (expected, line)
    assert "DB-PW-3391" not in line and "REDIS-PW-5512" not in line
    assert "audit log off;" in line_for(tmp_path, audit_log="")
    assert "audit log stderr (json);" in line_for(tmp_path, audit_log="-")
