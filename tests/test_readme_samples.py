"""The README's code samples keep working.

* Python blocks run against gateways in front of the fake NBIA, with tcia-utils 3.3.5: a block
  that uses the name ``key`` (a lab user's API key, as the README says) runs against a gateway
  in accounts mode with alice's key, the others against an open one. Each block's last line is
  an expression whose value must be truthy (tcia-utils logs a failure and returns None; a
  ``requests`` response is falsy on an error status), and the upstream must have been reached.
* Shell blocks: every ``nbia-proxy`` command parses with the real parser into valid settings,
  and those that do not start a server run, in README order, in a scratch directory (``--from``
  against a gateway in accounts mode, whose admin key is in ``~/.nbia-admin-key``); every ``curl``
  uses only flags this test knows, saves with ``-o`` only together with ``-f``, and names a path
  the gateway routes: its own endpoints (which are called, and must answer 2xx) or a catalogued
  NBIA endpoint with that method.
* Every ``nbia.<function>(`` the README mentions exists in tcia-utils.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.routing import APIRoute
from tcia_utils import nbia

from proxy import endpoints
from proxy.accounts.registry import Registry
from proxy.cli import build_parser, settings_from_args, with_default_command
from proxy.control import purge_filters
from proxy.db import database_url, make_engine, migrate
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The gateway address the README's samples use; the tests swap in their own.
DOCUMENTED = "http://127.0.0.1:8080"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
#: Commands in shell blocks that are not the gateway's (installing, building, testing).
ASSIGN = r"[A-Z_]+=.*"  # a variable set for one command: NAME=value command ...
OTHER_TOOLS = {"python3", "pip", "docker", "bash"}
#: The commands of "Running for a department": tests/test_deploy.py checks them against deploy/.
OTHER_TOOLS |= {"docker-compose", "kubectl", "openssl", "touch", "sudo"}


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def shell_commands() -> list[list[str]]:
    """Each simple command of the bash blocks, as words, ``VAR=value`` prefixes dropped."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words: list[str] = []
            for word in [*shlex.split(line, comments=True), "&&"]:
                if word not in ("&&", "||", ";", "|"):
                    words.append(word)
                    continue
                while words and re.fullmatch(ASSIGN, words[0]):
                    words.pop(0)
                if words:
                    found.append(words)
                words = []
    return found


def nbia_proxy_commands() -> list[list[str]]:
    return [words for words in shell_commands() if Path(words[0]).name == "nbia-proxy"]


def curl_commands() -> list[list[str]]:
    return [words for words in shell_commands() if words[0] == "curl"]


def test_the_readme_has_samples_of_every_kind() -> None:
    """The extraction finds what the README shows (else the tests below would check nothing)."""
    assert len(blocks("python")) >= 3
    assert len(nbia_proxy_commands()) >= 10
    assert len(curl_commands()) >= 9
    tools = {Path(words[0]).name for words in shell_commands()}
    assert tools <= OTHER_TOOLS | {"curl", "nbia-proxy"}, tools


# --- Python -------------------------------------------------------------------------------------


def free_names(tree: ast.Module) -> set[str]:
    assigned = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    used = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    return used - assigned - imported - set(dir(builtins))


@dataclass
class Lab:
    """A gateway in accounts mode with a member (alice) and an admin (root)."""

    gateway: GatewayServer
    keys: dict[str, str]


@pytest.fixture
def lab(tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer) -> Iterator[Lab]:
    data_dir = tmp_path / "lab"
    migrate(database_url(None, data_dir))
    engine = make_engine(database_url(None, data_dir))
    registry = Registry(engine)
    keys = {"alice": registry.add("alice"), "root": registry.add("root", admin=True)}
    engine.dispose()
    settings = make_settings(data_dir, nbia_upstream.url, nlst_upstream.url, access="accounts")
    with GatewayServer(settings) as server:
        yield Lab(server, keys)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_sample_runs_through_the_gateway(
    index: int,
    monkeypatch: pytest.MonkeyPatch,
    gateway: GatewayServer,
    lab: Lab,
    nbia_upstream: FakeServer,
) -> None:
    # use_gateway swaps these module attributes: restored after the test.
    monkeypatch.setattr(nbia, "setApiUrl", nbia.setApiUrl)
    monkeypatch.setattr(nbia, "requests", nbia.requests)
    tree = ast.parse(blocks("python")[index])
    names = free_names(tree)
    assert names <= {"key"}, f"the sample uses names it does not define: {names}"
    target = lab.gateway if "key" in names else gateway
    source = ast.unparse(tree).replace(DOCUMENTED, target.url)
    *body, last = ast.parse(source).body
    assert isinstance(last, ast.Expr), "a sample ends with the call whose answer it shows"
    namespace: dict[str, object] = {"key": lab.keys["alice"]}
    exec(compile(ast.Module(body, type_ignores=[]), "README.md", "exec"), namespace)
    result = eval(compile(ast.Expression(last.value), "README.md", "eval"), namespace)
    assert result, f"the sample's last call gave {result!r}"
    assert nbia_upstream.app.requests, "the sample never reached the upstream"


def test_every_tcia_utils_function_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bnbia\.(\w+)\(", README.read_text()))
    assert named, "the README shows tcia-utils calls"
    missing = {name for name in named if not callable(getattr(nbia, name, None))}
    assert not missing, f"tcia-utils {nbia.__name__} has no {missing}"


# --- nbia-proxy ---------------------------------------------------------------------------------


@pytest.fixture
def no_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("NBIA_PROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("no_environment")
@pytest.mark.parametrize("words", nbia_proxy_commands(), ids=" ".join)
def test_nbia_proxy_sample_parses_into_valid_settings(words: list[str]) -> None:
    args = build_parser().parse_args(with_default_command(words[1:]))
    settings_from_args(args)


def test_nbia_proxy_samples_run(tmp_path: Path, lab: Lab, nbia_upstream: FakeServer) -> None:
    """All but ``serve``, in README order, in one scratch directory (its default data dir),
    with the fake NBIA as upstream, alice's key in ``~/.nbia-key`` and a manifest of two of
    the fake's series in ``cohort.tcia`` (for ``warm``)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".nbia-admin-key").write_text(lab.keys["root"] + "\n")
    (home / ".nbia-key").write_text(lab.keys["alice"] + "\n")
    cohort = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "TCGA-KIRC"]
    (tmp_path / "cohort.tcia").write_text(
        "downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/"
        "DownloadServlet\nincludeAnnotation=false\nnoOfrRetry=4\n"
        "databasketId=manifest-1.tcia\nmanifestVersion=3.0\nListOfSeriesToDownload=\n"
        + "".join(uid + "\n" for uid in cohort[:2])
    )
    bin_dir = tmp_path / ".venv" / "bin"  # the README says .venv/bin/nbia-proxy, or nbia-proxy
    bin_dir.mkdir(parents=True)
    (bin_dir / "nbia-proxy").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m proxy "$@"\n')
    (bin_dir / "nbia-proxy").chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("NBIA_PROXY_")}
    environment |= {"HOME": str(home), "PATH": f"{bin_dir}:{environment['PATH']}",
                    "PYTHONPATH": str(ROOT), "NBIA_PROXY_UPSTREAM": nbia_upstream.url,
                    "NBIA_PROXY_NLST_UPSTREAM": nbia_upstream.url}  # fmt: skip
    ran = 0
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = [w for w in shlex.split(line, comments=True) if not re.fullmatch(ASSIGN, w)]
            if not words or Path(words[0]).name != "nbia-proxy" or "&&" in words:
                continue
            if with_default_command(words[1:])[0] == "serve":
                continue  # starts a server (checked by the parse test above)
            done = subprocess.run(
                ["bash", "-c", line.replace(DOCUMENTED, lab.gateway.url)],
                cwd=tmp_path,
                env=environment,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (line, done.stderr)
            assert done.stdout.strip(), line
            ran += 1
    assert ran >= 8


# --- curl ---------------------------------------------------------------------------------------


def curl_parser() -> argparse.ArgumentParser:
    """The curl flags the README may use (another one must be added here, knowingly)."""
    parser = argparse.ArgumentParser(prog="curl", add_help=False, exit_on_error=False)
    parser.add_argument("-f", "--fail", action="store_true")
    parser.add_argument("-o", "--output")
    parser.add_argument("-X", "--request")
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("-d", "--data", action="append", default=[])
    parser.add_argument("url")
    return parser


def gateway_routes(gateway: GatewayServer) -> set[tuple[str, str]]:
    """(method, path) of the gateway's own endpoints, from its control app."""
    return {
        (method, route.path)
        for route in gateway.app.control_app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }


@pytest.fixture
def gateway(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> Iterator[GatewayServer]:
    """conftest's gateway with the update feeds on, as by default: the README polls them."""
    settings = make_settings(
        tmp_path, nbia_upstream.url, nlst_upstream.url, update_poll_seconds=3600
    )
    with GatewayServer(settings) as server:
        yield server


@pytest.mark.parametrize("words", curl_commands(), ids=" ".join)
def test_curl_sample_is_routed_and_safe(words: list[str], gateway: GatewayServer) -> None:
    curl = curl_parser().parse_args(words[1:])
    assert curl.output is None or curl.fail, "curl -o without -f saves an error as the file"
    method = curl.request or ("POST" if curl.data else "GET")
    url = urlsplit(curl.url)
    assert f"{url.scheme}://{url.netloc}" == DOCUMENTED
    path = url.path
    if path.startswith("/nlst/nbia-api/"):
        path = path.removeprefix("/nlst")
    if path in endpoints.TOKEN_PATHS or (method, path) in gateway_routes(gateway):
        # The gateway answers these itself: call it as the sample does.
        if path == "/_proxy/cache" and method == "DELETE":
            purge_filters(httpx.URL(curl.url).params.multi_items())
        answer = httpx.request(
            method,
            gateway.url + path + (f"?{url.query}" if url.query else ""),
            content="&".join(curl.data) or None,
            headers=dict(h.split(": ", 1) for h in curl.header)
            | ({"Content-Type": "application/x-www-form-urlencoded"} if curl.data else {}),
        )
        assert answer.is_success, (words, answer.status_code, answer.text)
        return
    endpoint = endpoints.lookup(path)
    assert endpoint is not None, f"{path} is no NBIA endpoint the gateway knows"
    assert method in endpoint.methods
