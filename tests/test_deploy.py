"""The recipes in ``deploy/`` work as written: the systemd unit (the example settings file is
tested in ``tests/test_docs.py``)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.cli import build_parser

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "nbia-proxy.service"
INSTALLED = "/opt/nbia-proxy/venv/bin/nbia-proxy"


def _unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; systemd allows repeated keys, so no dict."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def test_the_unit_runs_commands_the_cli_accepts() -> None:
    commands = [
        value
        for section, key, value in _unit_entries(UNIT.read_text())
        if section == "Service" and key in ("ExecStart", "ExecStartPre", "ExecReload")
    ]
    assert commands, "the unit starts something"
    for command in commands:
        program, *arguments = shlex.split(command)
        assert program == INSTALLED, "the unit runs the installed nbia-proxy"
        build_parser().parse_args(arguments)  # exits (fails the test) on an unknown flag


def test_the_unit_runs_as_a_service_user_in_its_own_state_directory() -> None:
    service = {key: value for section, key, value in _unit_entries(UNIT.read_text())
               if section == "Service"}  # fmt: skip
    assert service.get("User") not in (None, "", "root", "0")
    assert service.get("StateDirectory") == "nbia-proxy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with the installed command stood in for by a script (it checks
    that the command exists); any warning, such as an unknown key, fails the test."""
    stand_in = tmp_path / "nbia-proxy"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(stand_in)))
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr
