"""Control of the series cache: purge, stats and verify, over HTTP and from the command line.

A real gateway on a socket keeps downloads from the fake NBIA; the command line runs as a user
runs it (``python -m proxy``) on the same data dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.binary.files import MARKER
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, cache_stats, request_line, send_raw
from tests.test_failsafe_cli import assert_one_line, run_cli

S = "/nbia-api/services"


def _series(fake: FakeServer, collection: str) -> str:
    return next(s.uid for s in fake.app.dataset.series if s.collection == collection)


def _zip(uid: str) -> str:
    return f"{S}/v4/getImage?SeriesInstanceUID={uid}"


def get(server: GatewayServer, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=60)


def kept_files(server: GatewayServer) -> list[Path]:
    root = server.settings.data_dir / "binaries"
    return [
        p for p in root.rglob("*") if p.is_file() and p.name[0] != "." and ".part-" not in p.name
    ]


def binaries(server: GatewayServer) -> dict[str, Any]:
    return cache_stats(server, "binaries")


def keep(server: GatewayServer, uid: str) -> bytes:
    """Download a series and wait until its file is kept."""
    before = binaries(server)["files"]
    answer = get(server, _zip(uid))
    assert answer.status_code == 200
    for _ in range(200):
        if binaries(server)["files"] > before:
            return answer.content
        httpx.get(server.url + "/healthz")
    pytest.fail("the download was not kept")


def purge(server: GatewayServer, query: str) -> dict[str, Any]:
    status, _, body = send_raw(server.url, request_line("DELETE", "/_proxy/cache" + query))
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


def lung_and_kirc(server: GatewayServer, fake: FakeServer) -> tuple[str, str]:
    """Keep a 4D-Lung and a TCGA-KIRC series; their UIDs."""
    lung, kirc = _series(fake, "4D-Lung"), _series(fake, "TCGA-KIRC")
    keep(server, lung)
    keep(server, kirc)
    return lung, kirc


def assert_purged_only(server: GatewayServer, purged: str, kept: str) -> None:
    """The series ``purged`` is fetched anew, ``kept`` is still answered from its file."""
    assert get(server, _zip(purged)).headers["x-cache"] == "MISS"
    assert get(server, _zip(kept)).headers["x-cache"] == "HIT"


def cli(server: GatewayServer, *args: str) -> dict[str, Any]:
    done = run_cli(*args, "--data-dir", str(server.settings.data_dir), cwd=server.settings.data_dir)
    assert (done.status, done.err) == (0, ""), done.err
    answer: dict[str, Any] = json.loads(done.out)
    return answer


# --- stats --------------------------------------------------------------------------------------


def test_stats_show_kept_files_hits_and_bytes_from_disk(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream, "4D-Lung")
    assert binaries(gw)["files"] == 0
    body = keep(gw, uid)
    again = get(gw, _zip(uid))
    assert again.headers["x-cache"] == "HIT"
    section = binaries(gw)
    assert (section["files"], section["bytes"]) == (1, len(body))
    assert (section["hits"], section["bytes_from_disk"]) == (1, len(body))
    assert section["fills_in_progress"] == 0
    assert section["fills_kept"] == 1
    assert section["validation_failures"] == {}
    assert section["max_bytes"] > 0


def test_stats_count_validation_failures_by_reason(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream, "4D-Lung")
    nbia_upstream.app.close_zip_after(1, times=1)
    with pytest.raises(httpx.HTTPError):
        get(gw, f"{S}/v4/getImageWithMD5Hash?SeriesInstanceUID={uid}")
    section = binaries(gw)
    assert section["files"] == 0
    assert sum(section["validation_failures"].values()) == 1
    assert gw.app.series is not None
    assert section["validation_failures"] == dict(gw.app.series.fills.counters.failures)


def test_cli_stats_show_kept_files(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    body = keep(gw, _series(nbia_upstream, "4D-Lung"))
    section = cli(gw, "cache", "stats")["binaries"]
    assert (section["files"], section["bytes"]) == (1, len(body))
    assert "hits" not in section  # a command has no running process to count them


# --- purge --------------------------------------------------------------------------------------


def test_purge_by_series_removes_its_kept_file(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream, "4D-Lung")
    other = _series(nbia_upstream, "TCGA-KIRC")
    body = keep(gw, uid)
    keep(gw, other)
    answer = purge(gw, f"?series={uid}")
    assert (answer["purged_files"], answer["purged_file_bytes"]) == (1, len(body))
    assert binaries(gw)["files"] == 1
    assert len(kept_files(gw)) == 1
    assert_purged_only(gw, uid, other)


def test_purge_everything_removes_every_kept_file(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    lung_and_kirc(gw, nbia_upstream)
    assert purge(gw, "?all=true")["purged_files"] == 2
    assert kept_files(gw) == []
    assert binaries(gw)["files"] == 0


def test_purge_by_path_removes_the_matching_kept_files(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    keep(gw, _series(nbia_upstream, "4D-Lung"))
    assert purge(gw, "?path=v4/getSeries")["purged_files"] == 0
    assert purge(gw, "?path=v4/getImage")["purged_files"] == 1
    assert kept_files(gw) == []


def test_purge_by_collection_finds_series_through_the_cached_getseries(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    lung, kirc = lung_and_kirc(gw, nbia_upstream)
    assert get(gw, f"{S}/v4/getSeries?Collection=4D-Lung").status_code == 200
    asked = len(nbia_upstream.app.requests_to("/v4/getSeries"))
    answer = purge(gw, "?collection=4D-Lung")
    assert (answer["purged_files"], answer["files_of_unknown_collection"]) == (1, 1)
    # The other file's collection is unknown, so 4D-Lung's list was asked again: from the
    # metadata cache (read before the purge drops it), not from TCIA.
    assert len(nbia_upstream.app.requests_to("/v4/getSeries")) == asked
    assert_purged_only(gw, lung, kirc)


def test_purge_by_collection_asks_getseries_when_it_has_not_seen_the_collection(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    lung, kirc = lung_and_kirc(gw, nbia_upstream)
    assert nbia_upstream.app.requests_to("/v4/getSeries") == []
    answer = purge(gw, "?collection=4D-Lung")
    assert (answer["purged_files"], answer["files_of_unknown_collection"]) == (1, 1)
    assert any(
        "Collection=4D-Lung" in r.query for r in nbia_upstream.app.requests_to("/v4/getSeries")
    )
    assert_purged_only(gw, lung, kirc)
    # With every kept file's collection known, a purge asks nothing.
    assert get(gw, f"{S}/v4/getSeries?Collection=TCGA-KIRC").status_code == 200
    assert get(gw, f"{S}/v4/getSeries?Collection=4D-Lung").status_code == 200
    before = len(nbia_upstream.app.requests_to("/v4/getSeries"))
    again = purge(gw, "?collection=TCGA-KIRC")
    assert (again["purged_files"], again["files_of_unknown_collection"]) == (1, 0)
    assert len(nbia_upstream.app.requests_to("/v4/getSeries")) == before


def test_purge_by_collection_with_the_upstream_down_counts_the_files_it_cannot_place(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    keep(gw, _series(nbia_upstream, "4D-Lung"))
    nbia_upstream.stop()
    answer = purge(gw, "?collection=4D-Lung")
    assert (answer["purged_files"], answer["files_of_unknown_collection"]) == (0, 1)
    assert len(kept_files(gw)) == 1


def test_cli_purge_removes_kept_files(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    lung, _ = lung_and_kirc(gw, nbia_upstream)
    assert get(gw, f"{S}/v4/getSeries?Collection=TCGA-KIRC").status_code == 200
    assert gw.app.cache is not None
    gw.app.cache.writer.flush()
    answer = cli(gw, "cache", "purge", "--collection", "TCGA-KIRC")
    assert (answer["purged_files"], answer["files_of_unknown_collection"]) == (1, 1)
    assert cli(gw, "cache", "purge", "--series", lung)["purged_files"] == 1
    assert kept_files(gw) == []


# --- verify -------------------------------------------------------------------------------------


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash tells
    path.write_bytes(bytes(data))


def test_cli_verify_removes_damaged_and_missing_files(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    lung = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"]
    for uid in (*lung[:2], _series(nbia_upstream, "TCGA-KIRC")):
        keep(gw, uid)
    files = kept_files(gw)
    assert len(files) == 3
    _damage(files[0])
    files[1].unlink()
    answer = cli(gw, "cache", "verify")
    assert answer == {"checked": 3, "damaged": 1, "missing": 1, "removed": 2}
    assert kept_files(gw) == [files[2]]
    assert binaries(gw)["files"] == 1
    assert cli(gw, "cache", "verify") == {"checked": 1, "damaged": 0, "missing": 0, "removed": 0}


def test_cli_verify_of_a_collection_checks_only_its_files(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    lung = _series(nbia_upstream, "4D-Lung")
    keep(gw, lung)
    keep(gw, _series(nbia_upstream, "TCGA-KIRC"))
    assert get(gw, f"{S}/v4/getSeries?Collection=4D-Lung").status_code == 200
    assert gw.app.cache is not None
    gw.app.cache.writer.flush()
    for path in kept_files(gw):
        _damage(path)
    answer = cli(gw, "cache", "verify", "--collection", "4D-Lung")
    assert answer == {"checked": 1, "damaged": 1, "missing": 0, "removed": 1}
    assert binaries(gw)["files"] == 1
    assert get(gw, _zip(lung)).headers["x-cache"] == "MISS"


def test_cli_verify_mistakes_are_one_line(
    gw: GatewayServer, nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    data = str(gw.settings.data_dir)
    assert cli(gw, "cache", "verify")["checked"] == 0  # nothing kept: nothing to refuse
    keep(gw, _series(nbia_upstream, "4D-Lung"))
    empty = run_cli("cache", "verify", "--collection", "", "--data-dir", data, cwd=tmp_path)
    assert_one_line(empty, 2, "--collection", "empty")
    off = run_cli(
        "cache",
        "verify",
        "--data-dir",
        data,
        cwd=tmp_path,
        env={"NBIA_PROXY_BINARY_CACHE_ENABLED": "false"},
    )
    assert_one_line(off, 2, "binary_cache_enabled")
    (gw.settings.data_dir / "binaries" / MARKER).unlink()
    unmounted = run_cli("cache", "verify", "--data-dir", data, cwd=tmp_path)
    assert_one_line(unmounted, 2, MARKER, "mounted")
    assert len(kept_files(gw)) == 1  # nothing removed
