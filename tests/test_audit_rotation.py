"""logrotate with ``workers > 1``: after the file is moved and the main process gets SIGHUP, the
workers are restarted, flush their lines into the moved file and write the new ones to a fresh
file at the audit log's path; no line is lost or split, in either file.

(tests/test_audit.py checks SIGHUP on a single-worker gateway, which reopens the file itself.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayProcess

S = "/nbia-api/services"


class Workers(GatewayProcess):
    """A gateway with two workers, waited for as long as it takes to start (each worker imports
    the whole gateway: on a loaded machine that takes longer than GatewayProcess's 30 s)."""

    def __enter__(self) -> Workers:
        self.process = subprocess.Popen(self.command)
        while True:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return self
            except httpx.TransportError:
                assert self.process.poll() is None, "the gateway process exited"
                threading.Event().wait(0.1)


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def asked(lines: list[dict[str, Any]]) -> list[str]:
    """The getBodyPartValues collections asked for, in the order logged."""
    return [
        line["query"].removeprefix("Collection=")
        for line in lines
        if line["path"].endswith("/v4/getBodyPartValues")
    ]


# Two workers started, then restarted one by one: minutes on a loaded two-core machine.
@pytest.mark.timeout(900)
def test_sighup_with_two_workers_moves_every_line_to_one_file_or_the_other(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    data = tmp_path / "data"
    log_file, rotated = data / "audit.log", data / "audit.log.1"
    sent: list[str] = []

    def ask(name: str) -> None:
        answer = httpx.get(f"{gateway.url}{S}/v4/getBodyPartValues?Collection={name}", timeout=60)
        assert answer.status_code == 200
        sent.append(name)

    with Workers(nbia_upstream.url, data, "--workers", "2") as gateway:
        for number in range(6):
            ask(f"before{number}")
        while len(asked(lines_of(log_file))) < 6:  # written within a second
            threading.Event().wait(0.05)
        log_file.rename(rotated)  # what logrotate does, then it signals the main process
        os.kill(gateway.pid, signal.SIGHUP)
        number = 0
        # Until a restarted worker has written to the new file (requests answered meanwhile,
        # by old or new workers, must each land in one of the two files).
        while not asked(lines_of(log_file)):
            try:
                ask(f"during{number}")
            except httpx.TransportError:
                pass  # a worker restarting: not answered, so not counted as sent
            number += 1
            threading.Event().wait(0.1)
        ask("after")
    assert gateway.exit_code == 0
    before, after = asked(lines_of(rotated)), asked(lines_of(log_file))
    # Written before the move (two workers' batches: in no particular order between them).
    assert {f"before{n}" for n in range(6)} <= set(before)
    assert after  # the new file is written to
    # A worker not yet restarted goes on writing to the moved file until it is: where a line
    # lands depends on which worker answered, but it lands in one of the two.
    assert sorted(before + after) == sorted(sent)  # none lost, none twice
