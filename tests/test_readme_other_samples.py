"""The README's samples that tests/test_readme_samples.py does not run: the JSON audit line, the
Prometheus scrape configuration (YAML), and the ``python3 -c`` line that reads the warm record.

* The audit line sample has exactly the fields, in the order and of the types, of a line the
  gateway writes.
* The scrape configuration parses, and what Prometheus sends from it (``Authorization: Bearer``
  with the ``credentials_file``'s text, surrounding white space dropped) opens ``/metrics`` of a
  gateway whose ``metrics_token_file`` is that file, which refuses a scrape without it.
* The ``python3 -c`` line prints the series of a record ``nbia-proxy warm`` wrote.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.audit import AuditLog
from proxy.cli import main
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings
from tests.test_readme_samples import DOCUMENTED, blocks

ROOT = Path(__file__).resolve().parent.parent


def shell_lines_running(program: str) -> list[str]:
    """The shell lines that run ``program -c`` (a one-liner of the README's own)."""
    return [
        line
        for block in blocks("bash")
        for line in block.splitlines()
        if line.strip().startswith(program + " -c ")
    ]


def test_the_readme_has_these_samples() -> None:
    assert len(blocks("json")) == 1 and len(blocks("yaml")) == 1
    assert len(shell_lines_running("python3")) == 1


def test_the_audit_line_sample_is_a_line_the_gateway_writes(tmp_path: Path) -> None:
    (sample,) = blocks("json")
    documented: dict[str, Any] = json.loads(sample)
    log = AuditLog(tmp_path / "audit.log")
    log.record(
        user="alice",
        client="10.0.0.7",
        method="GET",
        path="/nbia-api/services/v4/getSeries",
        query="Collection=TCGA-KIRC",
        status=200,
        cache="HIT",
        size=5120,
        started=0.0,
    )
    log.close()
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    written: dict[str, Any] = json.loads(line)
    assert list(documented) == list(written)
    for name, value in written.items():
        assert type(documented[name]) is type(value), name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", documented["time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", written["time"])
    assert documented["cache"] in {"HIT", "MISS", "STALE", "BYPASS", "JOINED", "-"}
    assert documented["outcome"] in {"ok", "aborted", "abandoned"}


def test_the_scrape_configuration_opens_metrics_with_the_token_file(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    (sample,) = blocks("yaml")
    config = yaml.safe_load(sample)
    (job,) = config["scrape_configs"]
    authorization = job["authorization"]
    # Prometheus's authorization type defaults to Bearer; the README names none.
    assert authorization.get("type", "Bearer") == "Bearer"
    (target,) = job["static_configs"][0]["targets"]
    assert f"http://{target}".replace("gateway", "127.0.0.1") == DOCUMENTED
    assert job.get("metrics_path", "/metrics") == "/metrics"
    token_file = tmp_path / Path(authorization["credentials_file"]).name
    token_file.write_text("scrape-token-7731\n")  # as `openssl rand -hex` or an editor leaves it
    settings = make_settings(tmp_path / "data", nbia_upstream.url, metrics_token_file=token_file)
    with GatewayServer(settings) as gw:
        sent = {"Authorization": "Bearer " + token_file.read_text().strip()}
        scraped = httpx.get(gw.url + "/metrics", headers=sent, timeout=60)
        assert scraped.status_code == 200 and "nbia_proxy_" in scraped.text
        assert httpx.get(gw.url + "/metrics", timeout=60).status_code in (401, 403)


def test_the_line_that_reads_the_warm_record_prints_its_series(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (line,) = shell_lines_running("python3")
    monkeypatch.chdir(tmp_path)
    flags = ["--upstream", nbia_upstream.url, "--nlst-upstream", nbia_upstream.url]
    flags += ["--data-dir", str(tmp_path / "data"), "--cache-min-free-disk-bytes", "1048576"]
    assert main(["warm", "--collection", "4D-Lung", *flags]) == 0  # as the README runs it
    capsys.readouterr()
    record = json.loads((tmp_path / "nbia-warm-4D-Lung.json").read_text())
    ran = subprocess.run(
        ["bash", "-c", line.replace("python3 ", f"{sys.executable} ", 1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    expected = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"]
    assert ran.stdout.split() == [s["series_instance_uid"] for s in record["series"]]
    assert sorted(ran.stdout.split()) == sorted(expected)
