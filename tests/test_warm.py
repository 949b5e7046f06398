"""``nbia-proxy warm``, ``warm --check`` and ``cache ls`` against the fake NBIA, on real sockets.

A warm run starts its own gateway (same settings and data dir) unless given ``--gateway``; the
tests then stop the upstream (or set ``offline``) and let tcia-utils, a client nobody here wrote,
list, read and download the cohort through a fresh gateway on the same data dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tcia_utils import nbia

from proxy.accounts.registry import Registry
from proxy.binary import files as binary_files
from proxy.cli import main
from proxy.db import database_url, make_engine, migrate
from proxy.tcia import gateway_url_builder
from proxy.warm import command, plan, progress
from proxy.warm.runner import RateLimit, write_record
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, free_port, make_settings

ROOT = Path(__file__).resolve().parent.parent


def _flags(upstream: FakeServer, data_dir: Path) -> list[str]:
    return [
        "--upstream", upstream.url, "--nlst-upstream", upstream.url, "--data-dir", str(data_dir),
        "--cache-min-free-disk-bytes", "1048576", "--log-level", "warning",
    ]  # fmt: skip


def _warm(
    capsys: pytest.CaptureFixture[str], upstream: FakeServer, data_dir: Path, *args: str
) -> tuple[int, str]:
    """``nbia-proxy warm ARGS`` in this process; its exit status and stdout."""
    record = data_dir.parent / "record.json"
    code = main(["warm", *args, "--record", str(record), *_flags(upstream, data_dir)])
    out, err = capsys.readouterr()
    return code, out + err


def _series(upstream: FakeServer, collection: str) -> list[str]:
    return [s.uid for s in upstream.app.dataset.series if s.collection == collection]


def _images(upstream: FakeServer) -> int:
    return len(upstream.app.requests_to("/v4/getImage"))


def _tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _client_view(
    monkeypatch: pytest.MonkeyPatch, base: str, collection: str, uids: list[str], path: Path
) -> dict[str, Any]:
    """What tcia-utils sees of a collection and its series through the gateway at ``base``."""
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(base))
    metadata = nbia.getSeriesList(uids)
    nbia.downloadSeries(uids, input_type="list", path=str(path))
    return {
        "collections": nbia.getCollections(),
        "series": nbia.getSeries(collection=collection),
        "patients": nbia.getPatient(collection=collection),
        "studies": nbia.getStudy(collection=collection),
        "metadata": None if metadata is None else metadata.to_csv(),  # NaN != NaN in dicts
        "files": _tree(path),
    }


def test_warm_collection_then_tcia_utils_works_with_the_upstream_down(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nbia_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    uids = _series(nbia_upstream, "4D-Lung")
    direct = _client_view(monkeypatch, nbia_upstream.url, "4D-Lung", uids, tmp_path / "direct")
    nbia_upstream.app.reset()
    code, out = _warm(capsys, nbia_upstream, tmp_path / "data", "--collection", "4D-Lung")
    assert code == 0, out
    assert f"ready: {len(uids)} series (0 already kept, {len(uids)} fetched" in out
    assert _images(nbia_upstream) == len(uids)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["complete"] and record["cohort"] == {"collection": "4D-Lung"}
    assert [s["series_instance_uid"] for s in record["series"]] == uids

    nbia_upstream.stop()
    settings = make_settings(tmp_path / "data", nbia_upstream.url)
    with GatewayServer(settings) as gateway:
        through = _client_view(monkeypatch, gateway.url, "4D-Lung", uids, tmp_path / "through")
    assert through == direct
    assert sum(name.endswith(".dcm") for name in through["files"]) >= len(uids)
    kept = {s["series_instance_uid"]: s["zips"][0]["sha256"] for s in record["series"]}
    blobs = sorted((tmp_path / "data").rglob("*-*"))
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in blobs if p.is_file()}
    assert set(kept.values()) <= hashes  # the record names the kept files' bytes


def test_a_warm_run_ends_only_once_its_last_zips_are_kept(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nbia_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    """A kept file's commit (its sha256 read back from the disk) ends after the client's last
    byte: the in-process gateway must not be stopped under it, or the run says "ready" for
    zips it did not keep."""
    real_sha256_of = binary_files.sha256_of

    def slow_read_back(path: Path, **options: Any) -> str | None:
        threading.Event().wait(0.5)  # a large file on a slow disk
        return real_sha256_of(path, **options)

    monkeypatch.setattr(binary_files, "sha256_of", slow_read_back)
    uids = _series(nbia_upstream, "4D-Lung")
    code, out = _warm(capsys, nbia_upstream, tmp_path / "data", "--collection", "4D-Lung")
    assert code == 0, out
    assert "not kept" not in out
    record = json.loads((tmp_path / "record.json").read_text())
    kept = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "data").rglob("*-*") if p.is_file()}
    assert len(record["series"]) == len(uids)
    assert len([name for name in kept if len(name) == 64]) == len(uids)


def _manifest(path: Path, uids: list[str]) -> Path:
    header = (
        "downloadServerUrl=https://services.cancerimagingarchive.net/nbia-download/servlet/"
        "DownloadServlet\nincludeAnnotation=false\nnoOfrRetry=4\n"
        "databasketId=manifest-1523866570303.tcia\nmanifestVersion=3.0\nListOfSeriesToDownload=\n"
    )
    path.write_text(header + "".join(uid + "\n" for uid in uids))
    return path


def test_warm_manifest_twice_fetches_nothing_the_second_time_and_serves_offline(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nbia_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    uids = _series(nbia_upstream, "TCGA-KIRC")[:2] + _series(nbia_upstream, "Soft-tissue-Sarcoma")
    manifest = _manifest(tmp_path / "cohort.tcia", uids)
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(nbia_upstream.url))
    nbia.downloadSeries(str(manifest), input_type="manifest", path=str(tmp_path / "direct"))
    kirc_direct = nbia.getSeries(collection="TCGA-KIRC")
    nbia_upstream.app.reset()

    code, out = _warm(capsys, nbia_upstream, tmp_path / "data", "--manifest", str(manifest))
    assert code == 0, out
    assert _images(nbia_upstream) == len(uids)
    upstream_requests = len(nbia_upstream.app.requests)
    code, out = _warm(capsys, nbia_upstream, tmp_path / "data", "--manifest", str(manifest))
    assert code == 0, out
    assert f"ready: {len(uids)} series ({len(uids)} already kept, 0 fetched" in out
    assert _images(nbia_upstream) == len(uids)  # no image request the second time
    assert len(nbia_upstream.app.requests) == upstream_requests  # nor anything else
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["cohort"]["manifest"]["text"] == manifest.read_text()
    assert set(record["collections"]) == {"TCGA-KIRC", "Soft-tissue-Sarcoma"}

    settings = make_settings(tmp_path / "data", nbia_upstream.url, offline=True)
    with GatewayServer(settings) as gateway:
        monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gateway.url))
        nbia.downloadSeries(str(manifest), input_type="manifest", path=str(tmp_path / "through"))
        assert nbia.getSeries(collection="TCGA-KIRC") == kirc_direct
    assert _tree(tmp_path / "through") == _tree(tmp_path / "direct")
    assert _images(nbia_upstream) == len(uids)


def test_failed_series_are_summed_up_and_the_check_tells_the_truth(
    capsys: pytest.CaptureFixture[str], nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    # One at a time, so the first two zips, those NBIA cuts short, are the first two series'
    # in the order getSeries lists them (the record's order).
    nbia_upstream.app.close_zip_after(1, times=2)
    code, out = _warm(
        capsys, nbia_upstream, tmp_path / "data", "--collection", "Soft-tissue-Sarcoma",
        "--concurrency", "1",
    )  # fmt: skip
    record = json.loads((tmp_path / "record.json").read_text())
    uids = [s["series_instance_uid"] for s in record["series"]]
    assert sorted(uids) == sorted(_series(nbia_upstream, "Soft-tissue-Sarcoma"))
    (broken, second), fine = uids[:2], uids[2:]
    assert code == 1, out
    assert "failed: 2\n" in out and f"  {broken}: the download was cut off" in out
    assert f"  {second}: " in out and not record["complete"]
    assert f"ready: {len(fine)} series" in out
    assert "everything is ready" not in out

    flags = ["--collection", "Soft-tissue-Sarcoma", *_flags(nbia_upstream, tmp_path / "data")]
    assert main(["warm", "--check", *flags]) == 1
    out = capsys.readouterr().out
    assert f"{len(fine)} of {len(uids)} series ready" in out
    assert any(line.startswith("MISSING") and broken in line for line in out.splitlines())
    assert main(["cache", "ls", "--json", *flags]) == 0
    listed = {s["uid"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(uids)
    assert not listed[broken]["ready"] and listed[broken]["missing_variants"] == ["tcia-utils"]
    assert not listed[second]["ready"]
    assert all(listed[uid]["ready"] and listed[uid]["zips"][0]["validation"] for uid in fine)

    nbia_upstream.app.reset()
    code, out = _warm(
        capsys, nbia_upstream, tmp_path / "data", "--collection", "Soft-tissue-Sarcoma"
    )
    assert code == 0, out
    assert _images(nbia_upstream) == 2  # only the two that failed
    assert main(["warm", "--check", *flags]) == 0
    assert "you can go offline" in capsys.readouterr().out


def test_max_rate_is_honoured(
    capsys: pytest.CaptureFixture[str], nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    rate = 1_000_000
    started = time.monotonic()
    code, out = _warm(
        capsys, nbia_upstream, tmp_path / "data", "--collection", "4D-Lung", "--max-rate", str(rate)
    )
    elapsed = time.monotonic() - started
    assert code == 0, out
    fetched = json.loads((tmp_path / "record.json").read_text())["total_bytes"]
    assert fetched > 4_000_000
    assert elapsed >= fetched / rate * 0.8  # a lower bound only


def _start(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxy", "warm", *args], cwd=ROOT, **kwargs)


def test_an_interrupted_warm_stops_cleanly_and_resumes(
    capsys: pytest.CaptureFixture[str], nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    uids = _series(nbia_upstream, "4D-Lung")
    nbia_upstream.app.slow(seconds_between_chunks=0.2, path_contains="getImage")
    args = ["--collection", "4D-Lung", "--concurrency", "1", "--record", str(tmp_path / "r.json")]
    process = _start([*args, *_flags(nbia_upstream, tmp_path / "data")], stdout=subprocess.PIPE)
    assert process.stdout is not None
    lines = []
    while line := process.stdout.readline().decode():
        lines.append(line)
        if " fetched " in line:
            process.send_signal(signal.SIGINT)
            break
    rest = process.stdout.read().decode()
    assert process.wait(timeout=60) == 130, "".join(lines) + rest
    assert "\r" not in rest and "\x1b" not in rest  # a pipe gets plain lines
    assert "stopped: run the same command again" in rest
    assert "skipped: " in rest and "skipped: 0" not in rest
    first = _images(nbia_upstream)
    assert first < len(uids)

    nbia_upstream.app.slow()
    nbia_upstream.app.reset()
    code, out = _warm(capsys, nbia_upstream, tmp_path / "data", *args[:2])
    assert code == 0, out
    assert " kept " in out  # what the first run finished is not fetched again
    assert _images(nbia_upstream) <= len(uids) - 1


def test_progress_on_a_terminal_is_one_redrawn_line(
    nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    main_fd, child_fd = pty.openpty()
    args = ["--collection", "Soft-tissue-Sarcoma", "--record", str(tmp_path / "r.json")]
    process = _start([*args, *_flags(nbia_upstream, tmp_path / "data")], stdout=child_fd)
    os.close(child_fd)
    output = b""
    while True:
        ready, _, _ = select.select([main_fd], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main_fd)
    assert process.wait(timeout=60) == 0
    text = output.decode()
    assert "\r\x1b[K[" in text and " series  " in text and "ETA" in text
    total = len(_series(nbia_upstream, "Soft-tissue-Sarcoma"))
    assert f"{total}/{total} series" in text
    assert "everything is ready for offline use" in text


def test_warm_through_a_running_gateway(
    capsys: pytest.CaptureFixture[str], nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    uids = _series(nbia_upstream, "TCGA-KIRC")
    with GatewayServer(make_settings(tmp_path / "data", nbia_upstream.url)) as gateway:
        for _ in range(2):
            code = main(
                ["warm", "--gateway", gateway.url, "--series", *uids, "--record",
                 str(tmp_path / "r.json")]
            )  # fmt: skip
            assert code == 0, capsys.readouterr()
        assert _images(nbia_upstream) == len(uids)
    assert f"({len(uids)} already kept, 0 fetched" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--manifest", "/nonexistent/cohort.tcia"],
            "--manifest /nonexistent/cohort.tcia: no such",
        ),
        (["--series", "1.2.3", "--gateway", "ftp://x"], "--gateway takes the gateway's URL"),
        (["--modality", "CT"], "--modality and --body-part filter a --collection"),
        ([], "say what to warm"),
        # {nobody}: a URL no gateway answers at; {dir}: the test's directory; {notes}: a text
        # file that is not a manifest. The first two are refused before the gateway is asked.
        (
            ["--series", "1.2,1.3", "--gateway", "{nobody}"],
            "--series '1.2,1.3' is not a series UID",
        ),
        (["--series", "1.2.3", "--gateway", "{nobody}", "--record", "{dir}"], "is a directory"),
        (["--series", "1.2.3", "--gateway", "{nobody}"], "no gateway answers at {nobody}"),
        (["--manifest", "{notes}"], "{notes} is not an NBIA manifest"),
    ],
)
def test_a_mistake_on_the_command_line_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("1.2.3\n")
    places = {"nobody": f"http://127.0.0.1:{free_port()}", "dir": tmp_path, "notes": notes}
    args = [arg.format(**places) for arg in args]
    assert main(["warm", *args, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**places) in err, err


@pytest.mark.parametrize(
    "command", [["warm", "--series", "1.2.3", "--gateway"], ["cache", "stats", "--from"]]
)
def test_a_gateway_url_with_a_password_is_refused_without_showing_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    url = f"http://lab:s3cret-pw@127.0.0.1:{free_port()}"
    assert main([*command, url, "--data-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "s3cret-pw" not in out + err, err
    assert err.count("\n") == 1 and "without a user name or password" in err, err
    assert not list(tmp_path.glob("nbia-warm-*.json"))


def test_manifest_parsing() -> None:
    body = (
        "downloadServerUrl=x\nincludeAnnotation=false\nnoOfrRetry=4\ndatabasketId=m.tcia\n"
        "manifestVersion=3.0\nListOfSeriesToDownload=\n1.2\n1.3\n\n1.2\n"
    )
    assert plan.parse_manifest(body) == ["1.2", "1.3"]
    with pytest.raises(plan.ManifestError):
        plan.parse_manifest("1.2\n1.3\n")


def test_cohort_files_saved_on_windows_are_read(tmp_path: Path) -> None:
    """A byte order mark and CRLF line ends (Notepad's UTF-8) change nothing."""
    manifest = tmp_path / "cohort.tcia"
    manifest.write_bytes(b"\xef\xbb\xbfdownloadServerUrl=x\r\nListOfSeriesToDownload=\r\n1.2\r\n")
    series = tmp_path / "series.txt"
    series.write_bytes(b"\xef\xbb\xbf1.3\r\n  # a note\r\n1.4\r\n")
    args = argparse.Namespace(cohort_manifest=manifest, cohort_series_file=series)
    assert command.cohort_of(args)[1] == ["1.2", "1.3", "1.4"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"1.2.3\n1.2.4,1.2.5\n", "line 2: '1.2.4,1.2.5' is not a series UID"),
        (b"1.2.3 1.2.4\n", "line 1: '1.2.3 1.2.4' is not a series UID"),
        (b"\x00\x01\x02garbage\n", "line 1: "),
        (b"9" * 500 + b"\n", "...' is not a series UID"),
        (b"\xff\xfe1\x002\x00", "not UTF-8 text"),
    ],
)
def test_a_series_file_of_garbage_is_refused_naming_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "series.txt"
    path.write_bytes(content)
    gateway = f"http://127.0.0.1:{free_port()}"  # never reached: the file is refused first
    args = ["warm", "--series-file", str(path), "--gateway", gateway, "--data-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "no gateway answers" not in err, err


def test_a_huge_cohort_file_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = f"http://127.0.0.1:{free_port()}"
    base = ["warm", "--gateway", gateway, "--data-dir", str(tmp_path)]
    monkeypatch.setattr(command, "MAX_COHORT_FILE_BYTES", 1000)
    path = tmp_path / "huge.tcia"
    path.write_bytes(b"downloadServerUrl=x\nListOfSeriesToDownload=\n" + b"1.2\n" * 1000)
    assert main([*base, "--manifest", str(path)]) == 2
    assert "is larger than" in capsys.readouterr().err


def test_the_record_is_not_written_through_a_link_planted_at_its_part_name(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    record = tmp_path / "nbia-warm-x.json"
    (tmp_path / "nbia-warm-x.json.part").symlink_to(victim)
    write_record(record, {"series": []})
    assert victim.read_text() == "keep me\n"
    assert json.loads(record.read_text()) == {"series": []} and not record.is_symlink()
    write_record(record, {"series": [1]})  # again, over the first
    assert json.loads(record.read_text()) == {"series": [1]}


def test_a_key_file_others_can_read_is_warned_about(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = tmp_path / "key"
    key.write_text("lab-key\n")
    gateway = f"http://127.0.0.1:{free_port()}"
    args = ["warm", "--series", "1.2.3", "--gateway", gateway, "--key-file", str(key)]
    key.chmod(0o644)
    assert main([*args, "--data-dir", str(tmp_path)]) == 2  # no gateway there
    err = capsys.readouterr().err
    assert "can be read by every user" in err and "lab-key" not in err, err
    key.chmod(0o600)
    assert main([*args, "--data-dir", str(tmp_path)]) == 2
    assert "can be read by every user" not in capsys.readouterr().err


def test_plan_mirrors_tcia_utils_requests() -> None:
    images = plan.image_requests(["1.2"], ["tcia-utils", "md5"])
    assert [r.describe() for r in images] == [
        "getImage?NewFileNames=Yes&SeriesInstanceUID=1.2",
        "getImageWithMD5Hash?SeriesInstanceUID=1.2",
    ]
    batches = [r for r in plan.metadata_requests([str(i) for i in range(10_001)]) if r.form]
    assert [len(r.form[0][1].split(",")) for r in batches] == [10_000, 1]


def test_progress_line() -> None:
    state = progress.State(total=4, started=0.0, ready=1, kept=1, expected_bytes=4000)
    state.done_bytes, state.fetched_bytes = 2000, 2000
    line = progress.bar_line(state, now=2.0, width=8)
    assert line.startswith("[####----] 2/4 series")
    assert "2.0 KB" in line and "1.0 KB/s" in line and "ETA 2s" in line


def test_rate_limit_spaces_chunks_by_the_rate() -> None:
    now = [0.0]
    limit = RateLimit(1000.0, clock=lambda: now[0])
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return False

    for _ in range(3):
        limit.take(500, Stop())
    assert waits == [0.5, 1.0, 1.5]  # no time passed: each chunk waits for its slot


def test_the_fake_bulk_collection_streams_valid_zips() -> None:
    """The bench's collection: zips made image by image as they are sent, the same bytes as a
    zip written to a file, and listed with their sizes."""
    import io
    import zipfile

    from tests.fake_nbia import FakeNBIA
    from tests.fake_nbia.dicom import ZipLayout

    fake = FakeNBIA(bulk_series=3, bulk_series_bytes=2 * 1024 * 1024)
    bulk = [s for s in fake.dataset.series if s.collection == "Bulk-CT"]
    assert len(bulk) == 3 and len({s.uid for s in bulk}) == 3
    layout = ZipLayout(new_names=True)
    streamed = fake.images.zip_for(bulk[0].uid, layout)
    assert not isinstance(streamed, bytes | Path)
    pieces = list(streamed.pieces(64 * 1024))
    assert max(len(p) for p in pieces) <= 64 * 1024
    data = b"".join(pieces)
    whole = io.BytesIO()
    fake.images._write_zip(bulk[0], layout, whole, None)
    assert data == whole.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = [n for n in archive.namelist() if n.endswith(".dcm")]
    size, count = fake.images.series_size(bulk[0].uid)
    assert count == len(names) == 4 and size > 2_000_000


def _lab_user(data_dir: Path) -> str:
    """A lab's accounts database in ``data_dir`` with one user, alice; her API key."""
    url = database_url(None, data_dir)
    migrate(url)
    engine = make_engine(url)
    try:
        return Registry(engine).add("alice")
    finally:
        engine.dispose()


def test_a_gateway_with_lab_accounts_takes_the_key_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nbia_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "lab"
    key = _lab_user(data_dir)
    settings = make_settings(data_dir, nbia_upstream.url, access="accounts")
    uids = _series(nbia_upstream, "TCGA-KIRC")[:1]
    args = ["warm", "--series", *uids, "--record", str(tmp_path / "r.json")]
    monkeypatch.delenv("NBIA_PROXY_API_KEY", raising=False)
    with GatewayServer(settings) as gateway:
        assert main([*args, "--gateway", gateway.url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "NBIA_PROXY_API_KEY" in err, err
        monkeypatch.setenv("NBIA_PROXY_API_KEY", key)
        assert main([*args, "--gateway", gateway.url]) == 0, capsys.readouterr()
    assert key not in (tmp_path / "r.json").read_text()
    assert _images(nbia_upstream) == 1


def test_warm_nlst_goes_through_the_nlst_mount(
    capsys: pytest.CaptureFixture[str],
    nbia_upstream: FakeServer,
    nlst_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    flags = _flags(nbia_upstream, tmp_path / "data")
    flags[flags.index("--nlst-upstream") + 1] = nlst_upstream.url
    args = ["warm", "--nlst", "--collection", "NLST", "--record", str(tmp_path / "r.json")]
    for _ in range(2):
        assert main([*args, *flags]) == 0, capsys.readouterr()
    count = len(_series(nlst_upstream, "NLST"))
    assert f"({count} already kept, 0 fetched" in capsys.readouterr().out
    assert _images(nlst_upstream) == count and _images(nbia_upstream) == 0


def test_a_gateway_that_keeps_no_zips_is_said_so(
    capsys: pytest.CaptureFixture[str], nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    uid = _series(nbia_upstream, "TCGA-KIRC")[0]
    flags = [*_flags(nbia_upstream, tmp_path / "data"), "--no-binary-cache-enabled"]
    assert main(["warm", "--series", uid, *flags]) == 2
    assert "series cache, which is off here" in capsys.readouterr().err
    settings = make_settings(tmp_path / "data", nbia_upstream.url, binary_cache_enabled=False)
    with GatewayServer(settings) as gateway:
        args = ["warm", "--series", uid, "--gateway", gateway.url]
        assert main([*args, "--record", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert f"  {uid}: the gateway does not keep this zip (X-Cache: BYPASS)" in out, out


def test_the_lab_users_request_rate_is_waited_out(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nbia_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    """A gateway that answers 429 past the user's rate: warm waits (Retry-After) and goes on."""
    data_dir = tmp_path / "lab"
    monkeypatch.setenv("NBIA_PROXY_API_KEY", _lab_user(data_dir))
    settings = make_settings(
        data_dir, nbia_upstream.url, access="accounts", user_rate_per_second=2.0
    )
    uids = _series(nbia_upstream, "TCGA-KIRC")
    with GatewayServer(settings) as gateway:
        args = ["warm", "--series", *uids, "--gateway", gateway.url]
        code = main([*args, "--record", str(tmp_path / "r.json")])
        out = capsys.readouterr().out
        assert code == 0, out
        refused = [line for line in gateway.audit_lines() if line.get("status") == 429]
    assert refused, "the rate was never reached: the test shows nothing"
    assert _images(nbia_upstream) == len(uids)
