"""deploy/nginx.conf as it is, made runnable on this machine (for tests/test_deploy.py and
bench/department.py): the compose service names replaced by local addresses, its pid file and
temp directories in a scratch directory, a port of our choosing."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


def upstream_servers(text: str) -> set[str]:
    """The ``server`` entries of the config's ``upstream nbia_proxy`` block."""
    block = re.search(r"upstream nbia_proxy \{(.*?)\}", text, re.S)
    assert block is not None, "deploy/nginx.conf has no upstream nbia_proxy block"
    return set(re.findall(r"^\s*server\s+(\S+)", block.group(1), re.M))


def local_nginx_conf(directory: Path, servers: list[str], port: int) -> Path:
    """A copy of deploy/nginx.conf in ``directory`` sending to ``servers`` (host:port, as
    many as the config has), listening on 127.0.0.1:``port``; nothing else changed."""
    text = NGINX_CONF.read_text()
    for name, server in zip(sorted(upstream_servers(text)), servers, strict=True):
        text = text.replace(f"server {name} ", f"server {server} ")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp + "\n", 1)
    user = pwd.getpwuid(os.getuid()).pw_name  # started by root, workers would be nobody
    text = f"pid {directory / 'nginx.pid'};\nuser {user};\n" + text
    conf = directory / "nginx.conf"
    conf.write_text(text)
    return conf
