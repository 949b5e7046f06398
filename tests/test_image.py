"""The Docker image's recipe, tested without a Docker engine.

``tests/dockerfile_replay.py`` replays the ``Dockerfile`` (its ``COPY`` steps from a clean export
of the repository, its ``pip`` steps in fresh virtual environments), then the image's ``CMD``
runs with the image's ``ENV`` (port and data dir mapped) in front of the fake NBIA: it must start,
migrate, answer ``/healthz``, its own ``HEALTHCHECK`` and an NBIA path.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dockerfile_replay import (
    REPO,
    Stage,
    export_repository,
    image_environment,
    replay,
)
from tests.fake_nbia import FakeServer
from tests.gateway_server import free_port

DOCKERFILE = REPO / "Dockerfile"
# The replayed build installs every dependency twice over: minutes on a busy machine.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Stage:
    """The last stage of the replayed build: what ``docker build`` would produce."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    export_repository(context)
    return replay(DOCKERFILE, context, work / "build")[-1]


def _files_under(directory: Path) -> set[Path]:
    return {path for path in directory.rglob("*") if path.is_file()}


@pytest.fixture
def running_image(image: Stage, nbia_upstream: FakeServer) -> Iterator[tuple[str, Stage]]:
    """The image's CMD, started as the container would start it; yields its base URL."""
    port = free_port()
    env = image_environment(
        image,
        NBIA_PROXY_PORT=str(port),
        NBIA_PROXY_UPSTREAM=nbia_upstream.url,
        NBIA_PROXY_NLST_UPSTREAM=nbia_upstream.url,
    )
    process = subprocess.Popen(
        image.cmd,
        cwd=image.host_path(image.workdir),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"the image's CMD exited with {process.returncode}:\n{output}")
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("the image's CMD did not start listening within 60 s")
                time.sleep(0.1)
        yield url, image
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_image_starts_migrates_and_proxies(
    running_image: tuple[str, Stage], nbia_upstream: FakeServer
) -> None:
    url, image = running_image
    installed = image.python.parent.parent
    before = _files_under(installed)

    health = httpx.get(url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    answer = httpx.get(url + "/nbia-api/services/v4/getCollectionValues", timeout=10)
    assert answer.status_code == 200
    assert (
        answer.json()
        == httpx.get(
            nbia_upstream.url + "/nbia-api/services/v4/getCollectionValues", timeout=10
        ).json()
    )

    data = image.host_path(image.env["NBIA_PROXY_DATA_DIR"])
    assert (data / "nbia-proxy.sqlite3").is_file(), "the database belongs in the data volume"
    # The installed package is never written to at run time (no byte-code, no state).
    assert _files_under(installed) == before


def test_the_image_healthcheck_passes(running_image: tuple[str, Stage]) -> None:
    url, image = running_image
    port = url.rsplit(":", 1)[1]
    env = image_environment(image, NBIA_PROXY_PORT=port)
    check = subprocess.run(image.healthcheck, env=env, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stderr.decode()


def test_the_image_healthcheck_fails_when_nothing_answers(image: Stage) -> None:
    env = image_environment(image, NBIA_PROXY_PORT=str(free_port()))
    check = subprocess.run(image.healthcheck, env=env, capture_output=True, timeout=30)
    assert check.returncode != 0


def test_the_image_is_built_as_production_images_are(image: Stage) -> None:
    # Pinned to a Python minor version and a Debian release (or a digest), never a moving tag.
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image.base)
    assert image.healthcheck, "the image has a HEALTHCHECK"
    assert image.env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert image.env.get("PYTHONUNBUFFERED") == "1"
    uid, _, gid = image.user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "the gateway runs as a numeric non-root user"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert image.exposed == [image.env["NBIA_PROXY_PORT"]]


def test_the_final_stage_installs_no_build_tools() -> None:
    final_stage = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    assert not re.search(r"apt-get|apk |build-essential|gcc|\bmake\b", final_stage)
    assert "--no-index" in final_stage, "the final stage installs only the wheels built before"
