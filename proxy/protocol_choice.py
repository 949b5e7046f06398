"""Which HTTP protocol uvicorn runs: :class:`proxy.hit_protocol.HitProtocol` when the private
uvicorn names it builds on are all there, else uvicorn's own ``httptools`` protocol.

HitProtocol subclasses uvicorn's ``HttpToolsProtocol``, overrides some of its methods, calls
others and reads its per-connection attributes: none of that is uvicorn's public API.
pyproject.toml pins uvicorn to the minor version the tests ran on; this check covers an
install that ignored the pin. What is missing is named in one warning, and the gateway then
serves with uvicorn's plain protocol: every answer (cache hits included) takes the ASGI path,
and the bounds HitProtocol adds (request head size and time, connections per client, the
shutdown grace) are not applied.
"""

from __future__ import annotations

import dis
import functools
import importlib
import logging
import types

log = logging.getLogger("nbia_proxy.server")

HIT_PROTOCOL = "proxy.hit_protocol:HitProtocol"
#: uvicorn's own protocol on the same parser, which HitProtocol extends.
FALLBACK = "httptools"

#: What HitProtocol (and the shortcut's proxy-header reading) uses, per uvicorn module and
#: class: each name is a class attribute (a method) or an attribute the class's code assigns.
NEEDED: dict[str, dict[str, tuple[str, ...]]] = {
    "uvicorn.protocols.http.httptools_impl": {
        "HttpToolsProtocol": (
            # overridden, and called through super()
            "connection_made",
            "connection_lost",
            "data_received",
            "on_message_begin",
            "on_url",
            "on_header",
            "on_headers_complete",
            "on_body",
            "on_message_complete",
            "on_response_complete",
            "shutdown",
            "timeout_keep_alive_handler",
            "_unset_keepalive_if_required",
            # called
            "send_400_response",
            "_should_upgrade",
            "handle_websocket_upgrade",
            "_unsupported_upgrade_warning",
            # read or set
            "app",
            "loop",
            "logger",
            "parser",
            "root_path",
            "server_state",
            "transport",
            "flow",
            "client",
            "scheme",
            "pipeline",
            "cycle",
            "url",
            "headers",
            "expect_100_continue",
            "timeout_keep_alive",
            "timeout_keep_alive_task",
        ),
        "RequestResponseCycle": (
            "response_complete",
            # the zero-copy send (proxy.zerocopy)
            "send",
            "scope",
            "response_started",
            "disconnected",
            "chunked_encoding",
            "expected_content_length",
        ),
    },
    "uvicorn.protocols.http.flow_control": {
        "FlowControl": ("write_paused", "resume_reading", "drain")
    },
    "uvicorn.server": {"ServerState": ("total_requests",)},
    "uvicorn.middleware.proxy_headers": {
        "ProxyHeadersMiddleware": ("app", "trusted_hosts"),
        "_TrustedHosts": ("__contains__", "get_trusted_client_address"),
    },
}


def _assigned(cls: type) -> set[str]:
    """Attribute names the functions defined on ``cls`` assign (``self.x = ...``)."""
    return {
        instruction.argval
        for value in vars(cls).values()
        if isinstance(value, types.FunctionType)
        for instruction in dis.get_instructions(value)
        if instruction.opname == "STORE_ATTR"
    }


def missing_names() -> list[str]:
    """The names of :data:`NEEDED` the installed uvicorn lacks, as ``module.Class.attr``."""
    missing: list[str] = []
    for module_name, classes in NEEDED.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        for class_name, attributes in classes.items():
            cls = getattr(module, class_name, None)
            if not isinstance(cls, type):
                missing.append(f"{module_name}.{class_name}")
                continue
            assigned = set().union(*(_assigned(base) for base in cls.__mro__))
            missing += [
                f"{module_name}.{class_name}.{name}"
                for name in attributes
                if not hasattr(cls, name) and name not in assigned
            ]
    return missing


@functools.cache
def http_protocol() -> str:
    """uvicorn's ``http`` option: HitProtocol, or ``httptools`` (warned once) when it cannot run."""
    missing = missing_names()
    if not missing:
        try:
            importlib.import_module(HIT_PROTOCOL.partition(":")[0])
        except (ImportError, AttributeError) as exc:  # a name the list above does not cover
            missing = [str(exc)]
    if not missing:
        return HIT_PROTOCOL
    import uvicorn

    log.warning(
        "uvicorn %s lacks what the gateway's HTTP protocol builds on (%s): serving with "
        "uvicorn's plain httptools protocol, without the cache-hit shortcut and the "
        "connection bounds; install the uvicorn version pyproject.toml names",
        uvicorn.__version__,
        ", ".join(missing),
    )
    return FALLBACK
