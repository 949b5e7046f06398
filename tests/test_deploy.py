"""The recipes in ``deploy/`` work as written: the systemd unit (the example settings file is
tested in ``tests/test_docs.py``), the compose file (``docker-compose config`` and its topology),
its nginx config (run by nginx in front of two stand-in replicas) and the Kubernetes manifests
(against the Kubernetes schemas that kubernetes-validate ships, offline)."""

from __future__ import annotations

import copy
import http.client
import http.server
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.cli import build_parser
from proxy.config import ENV_PREFIX, Settings, load_settings
from proxy.server import UNWIND_SECONDS
from tests.deploy_nginx import NGINX_CONF, local_nginx_conf, upstream_servers

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


# --- deploy/compose.yaml, deploy/nginx.conf, deploy/k8s/ -----------------------------------------

DEPLOY = UNIT.parent
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY.parent / "Dockerfile"
#: The Kubernetes version whose schemas (shipped by kubernetes-validate, offline) are checked.
K8S_VERSION = "1.30"
#: Parts of a variable's name that say its value is a secret (then it must come from a file).
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


def _tool(name: str) -> str:
    """The tool's path; in CI (which installs it, .ci/run) a missing tool fails, else skips."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"needs {name} (Debian package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _longest_stop() -> float:
    """The longest a gateway on its defaults takes to stop: the grace for transfers in
    flight, their unwind, then the cleanup's deadline."""
    defaults = Settings()
    return defaults.shutdown_grace_seconds + UNWIND_SECONDS + defaults.shutdown_cleanup_seconds


def _seconds(duration: str) -> float:
    assert duration.endswith("s") and duration[:-1].isdigit(), duration
    return float(duration[:-1])


def _gateways(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return {name: s for name, s in services.items() if name.startswith("gateway")}


def _compose_config(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("docker-compose"), "-f", str(directory / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=directory,
    )


def test_docker_compose_accepts_the_compose_file() -> None:
    """``docker-compose config -q`` (schema, anchors, depends_on conditions) passes."""
    checked = _compose_config(DEPLOY)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("    image: postgres", "    imag: postgres"),  # an unknown key
        ("condition: service_completed_successfully", "condition: service_done"),
        ("  migrate:\n", "  migrate:\n    restart: [no]\n"),  # a wrong type
    ],
)
def test_docker_compose_refuses_a_broken_copy(tmp_path: Path, old: str, new: str) -> None:
    """The check above can fail: a copy with one mistake is refused."""
    text = COMPOSE.read_text()
    assert old in text
    (tmp_path / "compose.yaml").write_text(text.replace(old, new, 1))
    assert _compose_config(tmp_path).returncode != 0


def test_compose_runs_migrations_once_before_two_replicas_on_one_database() -> None:
    """PostgreSQL with a volume and a health check; a one-shot migrate service (a command the
    CLI accepts) after it; two replicas of the repository's image after that, on the same
    database, Redis and series-cache volume (at their binary_dir)."""
    compose = _compose()
    services = compose["services"]
    db = services["db"]
    assert db["healthcheck"]["test"] and any(
        ":/var/lib/postgresql/data" in v for v in db["volumes"]
    )
    migrate = services["migrate"]
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    program, *arguments = migrate["command"]
    assert program == "nbia-proxy"
    assert build_parser().parse_args(arguments).command == "migrate"
    gateways = _gateways(compose)
    assert len(gateways) == 2
    for gateway in gateways.values():
        assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert gateway["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert (DEPLOY / gateway["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
        environment = gateway["environment"]
        assert environment["NBIA_PROXY_AUTO_MIGRATE"] == "false"
        assert "@db:" in environment["NBIA_PROXY_DATABASE_URL"]
        assert "redis://redis:" in environment["NBIA_PROXY_REDIS_URL"]
        assert f"series-cache:{environment['NBIA_PROXY_BINARY_DIR']}" in gateway["volumes"]
        # Docker kills a container still running after its stop period: a stuck stop must have
        # logged why by then.
        assert _seconds(gateway["stop_grace_period"]) > _longest_stop()
    assert migrate["environment"] == next(iter(gateways.values()))["environment"]
    assert "series-cache" in compose["volumes"] and "pgdata" in compose["volumes"]


def _secret_names(environment: dict[str, str]) -> list[str]:
    return [
        name
        for name in environment
        if any(word in name.upper() for word in SECRET_WORDS) and not name.endswith("_FILE")
    ]


def test_compose_secrets_are_files_not_environment_values() -> None:
    """No service has a secret in its environment (nor a password in a URL): each *_FILE names
    /run/secrets/NAME of a compose secret that the service mounts and that is a file."""
    compose = _compose()
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        assert _secret_names(environment) == [], f"{name} has a secret in its environment"
        for variable, value in environment.items():
            assert not re.search(r"://[^/@]*:[^/@]*@", str(value)), f"{variable}: a password"
            if variable.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert value == f"/run/secrets/{secret}", f"{name}: {variable} is no secret"
                assert secret in service["secrets"], f"{name} does not mount {secret}"
                assert "file" in compose["secrets"][secret]


def _settings_from(environment: dict[str, str], secrets_at: str, tmp_path: Path) -> Settings:
    """Settings as a replica reads them from ``environment``, its secret files (mounted at
    ``secrets_at``) stood in for by files in ``tmp_path``, a data dir there too."""
    variables = {}
    for variable, value in environment.items():
        name = variable.removeprefix(ENV_PREFIX).lower()
        assert variable.startswith(ENV_PREFIX), variable
        assert name in Settings.model_fields, f"{variable}: unknown"
        if value.startswith(secrets_at):
            stand_in = tmp_path / value.removeprefix(secrets_at).strip("/")
            stand_in.write_text("x" * 64 if name == "token_secret_file" else "secret-value\n")
            value = str(stand_in)
        variables[name] = value
    variables["data_dir"] = str(tmp_path / "data")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.upper().startswith(ENV_PREFIX):
                patch.delenv(name)
        for name, value in variables.items():
            patch.setenv(ENV_PREFIX + name.upper(), value)
        return load_settings()


def test_the_compose_settings_are_valid(tmp_path: Path) -> None:
    """The replicas' environment is settings the gateway accepts (with the image's own), the
    database password read from its secret file, nginx's fixed address among trusted_proxies."""
    compose = _compose()
    environment = dict(next(iter(_gateways(compose).values()))["environment"])
    settings = _settings_from(environment, "/run/secrets", tmp_path)
    assert settings.access == "accounts"
    assert settings.database_url and ":secret-value@db:5432/" in settings.database_url
    nginx = ipaddress.ip_address(
        compose["services"]["nginx"]["networks"]["backend"]["ipv4_address"]
    )
    assert any(nginx in ipaddress.ip_network(entry) for entry in settings.trusted_proxies)
    subnet = compose["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    assert nginx in ipaddress.ip_network(subnet)


def test_nginx_sends_to_every_replica_of_the_compose_file() -> None:
    compose = _compose()
    port = Settings().port  # the image's NBIA_PROXY_PORT (8080) is the default port
    expected = {f"{name}:{port}" for name in _gateways(compose)}
    assert upstream_servers(NGINX_CONF.read_text()) == expected
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in compose["services"]["nginx"]["volumes"]


def test_the_image_makes_the_shared_volume_s_mount_point_for_its_user() -> None:
    """A new named volume takes the owner of its mount point in the image: binary_dir's must be
    the gateway user's, or the replicas could not write the series cache."""
    text = DOCKERFILE.read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    user = re.search(r"^USER (\S+)", final_stage, re.M)
    assert user is not None
    binary_dir = next(iter(_gateways(_compose()).values()))["environment"]["NBIA_PROXY_BINARY_DIR"]
    assert re.search(rf"mkdir [^&]*{re.escape(binary_dir)}\b", final_stage)
    assert re.search(
        rf"chown {re.escape(user.group(1))} [^&]*{re.escape(binary_dir)}\b", final_stage
    )


def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    conf = local_nginx_conf(tmp_path, ["127.0.0.1:9", "127.0.0.1:10"], _free_port())
    checked = subprocess.run(
        [_tool("nginx"), "-t", "-q", "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Replica(http.server.BaseHTTPRequestHandler):
    """Stands in for a gateway: records X-Forwarded-For; /zip sends a first chunk and waits
    until the client has it before it ends the answer (as a series zip streams)."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[int, str]]
    first_chunk_arrived: threading.Event
    waited_in_vain: list[bool]

    def do_GET(self) -> None:  # noqa: N802 -- the http.server interface
        self.seen.append((self.server.server_address[1], self.headers.get("X-Forwarded-For", "")))
        if self.path != "/zip":
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", "8")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04")
        self.wfile.flush()
        # Generous: only a buffering nginx makes it wait at all (then the test fails).
        self.waited_in_vain.append(not self.first_chunk_arrived.wait(30))
        self.wfile.write(b"rest")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_nginx_streams_zips_and_appends_the_client_address(tmp_path: Path) -> None:
    """deploy/nginx.conf itself in front of two stand-in replicas: requests reach both, the
    address nginx sees is appended to X-Forwarded-For (the gateway takes the rightmost
    untrusted one, so a client cannot pick its own), and a zip's first bytes reach the client
    while the replica still sends (proxy_buffering off)."""
    nginx = _tool("nginx")
    arrived = threading.Event()
    handler = type(
        "Replica", (_Replica,), {"seen": [], "first_chunk_arrived": arrived, "waited_in_vain": []}
    )
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port = _free_port()
    addresses = [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    conf = local_nginx_conf(tmp_path, addresses, port)
    process = subprocess.Popen(
        [nginx, "-c", str(conf), "-e", str(tmp_path / "error.log"), "-g", "daemon off;"]
    )
    try:
        _wait_for_port(port, process)
        for _ in range(6):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("GET", "/x", headers={"X-Forwarded-For": "203.0.113.9"})
            assert connection.getresponse().read() == b"ok"
            connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/zip")
        answer = connection.getresponse()
        first = answer.read(4)
        arrived.set()
        assert first + answer.read() == b"PK\x03\x04rest"
        connection.close()
    finally:
        arrived.set()
        process.terminate()
        process.wait(timeout=30)
        for server in servers:
            server.shutdown()
            server.server_close()
    seen = handler.seen
    assert {port for port, _ in seen} == {s.server_address[1] for s in servers}
    assert all(xff == "203.0.113.9, 127.0.0.1" for _, xff in seen[:6])
    assert handler.waited_in_vain == [False], "nginx held the zip's first bytes back"


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        assert process.poll() is None, "nginx stopped"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail("nginx did not listen")


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def _manifest(kind: str) -> dict[str, Any]:
    (document,) = [d for _, d in _manifests() if d["kind"] == kind]
    return document


@pytest.mark.parametrize(
    "document", [d for _, d in _manifests()], ids=[f"{n}:{d['kind']}" for n, d in _manifests()]
)
def test_the_kubernetes_manifests_validate(document: dict[str, Any]) -> None:
    """Each manifest against the Kubernetes schemas (strict: no unknown field), offline."""
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "mistake",
    ["unknown field", "wrong type", "missing field"],
)
def test_a_broken_manifest_is_refused(mistake: str) -> None:
    """The check above can fail: a copy of the Deployment with one mistake is refused."""
    document = copy.deepcopy(_manifest("Deployment"))
    container = document["spec"]["template"]["spec"]["containers"][0]
    if mistake == "unknown field":
        container["readinesProbe"] = container.pop("readinessProbe")
    elif mistake == "wrong type":
        container["ports"][0]["containerPort"] = "eighty"
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def _container(kind: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _manifest(kind)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_the_deployment_probes_runs_unprivileged_and_writes_only_to_volumes() -> None:
    """Readiness on /readyz, liveness on /healthz; non-root, read-only root file system, and
    every place the gateway writes (data_dir, binary_dir, /tmp) a mounted volume; the series
    cache on the ReadWriteMany claim; requests and a memory limit set."""
    deployment = _manifest("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container("Deployment")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    config = _manifest("ConfigMap")["data"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    image_env = re.search(r"NBIA_PROXY_DATA_DIR=(\S+)", DOCKERFILE.read_text())
    assert image_env is not None, "the image sets its data dir"
    data_dir = config.get("NBIA_PROXY_DATA_DIR", image_env.group(1))
    for path in (data_dir, config["NBIA_PROXY_BINARY_DIR"], "/tmp"):
        assert path in mounts, f"{path} is not a volume: the root file system is read-only"
    assert config["NBIA_PROXY_AUDIT_LOG"] == "-"
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[config["NBIA_PROXY_BINARY_DIR"]]]["persistentVolumeClaim"]
    pvc = _manifest("PersistentVolumeClaim")
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert deployment["spec"]["replicas"] >= 2
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > _longest_stop()


def test_the_kubernetes_settings_are_valid_and_secrets_are_files(tmp_path: Path) -> None:
    """The ConfigMap is settings the gateway accepts; no secret in it; each *_FILE names a key
    of the Secret where the Deployment and the Job mount it."""
    config = _manifest("ConfigMap")["data"]
    assert _secret_names(config) == []
    secret_keys = set(_manifest("Secret")["stringData"])
    for kind in ("Deployment", "Job"):
        container = _container(kind)
        assert {"configMapRef": {"name": "nbia-proxy"}} in container["envFrom"]
        assert "env" not in container, "settings live in the ConfigMap"
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
        pod = _manifest(kind)["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
        assert volume["secret"]["secretName"] == _manifest("Secret")["metadata"]["name"]
        for variable, value in config.items():
            if variable.endswith("_FILE"):
                assert value.startswith(mount["mountPath"] + "/")
                assert value.removeprefix(mount["mountPath"] + "/") in secret_keys
    settings = _settings_from(config, "/run/secrets/nbia-proxy", tmp_path)
    assert settings.auto_migrate is False and settings.access == "accounts"
    assert settings.trusted_proxies, "the ingress controller's X-Forwarded-For is believed"


def test_the_migration_job_runs_the_migrate_command_of_the_same_image() -> None:
    job = _container("Job")
    program, *arguments = job["command"]
    assert program == "nbia-proxy"
    assert build_parser().parse_args(arguments).command == "migrate"
    assert job["image"] == _container("Deployment")["image"]
    assert _manifest("Job")["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_service_and_the_network_policy_select_the_gateway_pods() -> None:
    labels = _manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _manifest("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container("Deployment")["ports"]}
    assert service["ports"][0]["targetPort"] in ports
    policy = _manifest("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == set(ports.values())


def _department_commands() -> list[list[str]]:
    """The shell commands of the README's "Running for a department", as words."""
    text = (DEPLOY.parent / "README.md").read_text()
    section = text.split("\n## Running for a department\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S):
        commands += [shlex.split(line) for line in block.splitlines() if line.strip()]
    return commands


def test_the_readme_commands_match_the_deploy_files() -> None:
    """Each command of "Running for a department" names what deploy/ has: the secret files the
    compose file mounts (every one made), its services and nbia-proxy commands the CLI accepts,
    the manifests, the Job, and the Secret's keys."""
    commands = _department_commands()
    compose = _compose()
    wanted_files = {str(Path(s["file"])) for s in compose["secrets"].values()}  # secrets/...
    made: set[str] = set()
    names = {d["kind"]: d["metadata"]["name"] for _, d in _manifests()}
    secret_keys = set(_manifest("Secret")["stringData"])
    tools = set()
    for words in commands:
        if words[0] == "sudo":
            words = words[1:]
        tool = words[0]
        tools.add(tool)
        if tool == "openssl":
            assert words[-2] == ">"
            made.add(words[-1])
        elif tool == "touch":
            made.update(words[1:])
        elif tool == "chown":
            user = re.search(r"^USER (\S+)", DOCKERFILE.read_text(), re.M)
            assert user is not None and words[1] == user.group(1), "the gateway's user"
            assert set(words[2:]) == {f"deploy/{f}" for f in wanted_files}, "all made the user's"
        elif tool == "docker-compose":
            assert words[words.index("-f") + 1] == "deploy/compose.yaml"
            if "run" in words:
                service = words[words.index("--rm") + 1]
                assert service in compose["services"]
                if len(words) > words.index(service) + 1:
                    assert words[words.index(service) + 1] == "nbia-proxy"
                    build_parser().parse_args(words[words.index(service) + 2 :])
        elif tool == "kubectl":
            if words[1] == "apply":
                for i, word in enumerate(words):
                    if word == "-f":
                        assert (DEPLOY.parent / words[i + 1]).is_file(), words[i + 1]
            elif words[1] == "wait":
                assert f"job/{names['Job']}" in words
            elif words[1:4] == ["create", "secret", "generic"]:
                assert words[4] == names["Secret"]
                keys = {w.removeprefix("--from-file=") for w in words[5:]}
                assert keys == secret_keys
        else:
            pytest.fail(f"the README runs {tool}, which this test does not check")
    assert {"openssl", "touch", "chown", "docker-compose", "kubectl"} <= tools
    assert {f"deploy/{f}" for f in wanted_files} == made, "every secret file is made"
    applied = {w for words in commands if words[:2] == ["kubectl", "apply"] for w in words[2:]}
    manifests = {f"deploy/k8s/{p.name}" for p in K8S.glob("*.yaml")} - {
        "deploy/k8s/secret.example.yaml"
    }
    assert manifests <= applied, "every manifest is applied"
