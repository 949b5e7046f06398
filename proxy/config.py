"""Settings: every knob of the gateway, read from flags, ``NBIA_PROXY_*`` variables or a TOML file.

Precedence, highest first: command-line flag, environment variable, config file, default.
Nothing is read at import time; :func:`load_settings` builds a fresh :class:`Settings`, or
raises :class:`InvalidSettings` with one line per problem, naming where the bad value came from.
The checks here are pure (values only); what needs the file system or the network is checked by
:mod:`proxy.preflight` when a command starts.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic_settings
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from proxy.client_tokens import read_secret_file

#: NBIA's public guest account; the real server accepts any password for it.
GUEST_USERNAME = "nbia_guest"
ENV_PREFIX = "NBIA_PROXY_"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Path segments of NBIA's own API: a base URL holding one was copied from an API address.
_NBIA_PATH_PARTS = frozenset({"nbia-api", "services", "oauth", "v1", "v2", "v3", "v4"})
_BASE_URL_EXAMPLES = {
    "upstream": "https://services.cancerimagingarchive.net",
    "nlst_upstream": "https://nlst.cancerimagingarchive.net",
}
#: Database URL schemes the gateway runs on (``postgres`` and ``postgresql`` mean psycopg 3).
_DATABASES = {"sqlite": ("", "pysqlite"), "postgresql": ("", "psycopg"), "postgres": ("",)}
_DATABASE_HINT = (
    "use sqlite:///PATH (the default is a file in data_dir) or postgresql://USER@HOST:PORT/DB "
    "(through the psycopg package, which nbia-proxy installs)"
)


class InvalidSettings(ValueError):
    """Settings that cannot be used; :attr:`lines` says what is wrong, one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


class Settings(BaseSettings):
    """The gateway's configuration. Field names map to ``NBIA_PROXY_<NAME>`` variables."""

    model_config = SettingsConfigDict(env_prefix="NBIA_PROXY_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    access: Literal["open", "accounts"] = Field(
        "open",
        description="open: no accounts (loopback only unless allow_remote_open); accounts: "
        "every NBIA path needs a lab credential and /_proxy/ an admin.",
    )
    accounts_refresh_seconds: float = Field(
        5.0, gt=0, description="How often lab accounts and ended sessions are re-read."
    )
    login_free_failures: int = Field(
        5, ge=0, description="Wrong credentials allowed per address before lockouts start."
    )
    login_lockout_max_seconds: float = Field(
        60.0,
        ge=0,
        description="Longest lockout of an address (1 s, doubling per further failure; 0: never).",
    )
    user_rate_per_second: float = Field(
        0.0, ge=0, description="Requests per second per lab user, accounts mode (0: no limit)."
    )
    user_max_downloads: int = Field(
        0,
        ge=0,
        description="Binary downloads at once per lab user, more wait their turn (0: no limit).",
    )
    max_header_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest request line plus headers accepted (431 beyond)."
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest a connection may take to send a complete request head (then 408 "
        "and closed; a connection that sends nothing is closed).",
    )
    max_connections_per_client: int = Field(
        256,
        ge=0,
        description="Open connections per client address, per process; more are answered 503 "
        "and closed at once (0: no limit; trusted proxies are exempt).",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks (comma-separated, e.g. 10.0.0.5,10.1.0.0/16) whose "
        "X-Forwarded-For is believed (default: none).",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM or Ctrl-C, how long transfers in flight may go on before they "
        "are aborted; a second signal stops at once.",
    )
    shutdown_cleanup_seconds: float = Field(
        8.0,
        ge=0,
        description="After the grace, how long closing the clients and flushing the caches "
        "may take; a stop still stuck past it logs what each thread is doing and exits (status "
        "1) rather than hang (0: wait for ever).",
    )
    allow_remote_open: bool = Field(
        False,
        description="Listen beyond loopback although no lab accounts protect the gateway "
        "(open mode): anyone who can reach it uses the service account.",
    )
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    upstream: str = Field(
        "https://services.cancerimagingarchive.net",
        description="Base URL of the main NBIA server (mounted at /).",
    )
    nlst_upstream: str = Field(
        "https://nlst.cancerimagingarchive.net",
        description="Base URL of the NLST server (mounted at /nlst/).",
    )
    data_dir: Path = Field(
        Path("nbia-proxy-data"), description="Where the gateway keeps its database and files."
    )
    username: str = Field(GUEST_USERNAME, description="Service account for the main upstream.")
    password: SecretStr = Field(SecretStr(""), description="Service account password.")
    password_file: Path | None = Field(
        None, description="File holding the service account password (wins over `password`)."
    )
    nlst_username: str | None = Field(
        None, description="Service account for NLST (default: the main account)."
    )
    nlst_password: SecretStr | None = Field(
        None, description="NLST password (default: the main password)."
    )
    nlst_password_file: Path | None = Field(
        None, description="File holding the NLST password (wins over `nlst_password`)."
    )
    client_id: str = Field("nbia", description="OAuth client_id sent with the password grant.")
    token_on_v4: bool = Field(
        False, description="Also send the service token on v4 requests (v4 works anonymously)."
    )
    token_refresh_margin_seconds: float = Field(
        60.0, ge=0, description="Refresh the service token this long before it expires."
    )
    token_secret_file: Path | None = Field(
        None,
        description="File holding the secret that signs gateway tokens (at least 32 "
        "characters; shared by the replicas); without it the secret is kept in the database.",
    )
    client_token_lifetime_seconds: int = Field(
        7200, gt=0, description="Lifetime of tokens the gateway issues to its own clients."
    )
    connect_timeout_seconds: float = Field(10.0, gt=0, description="Upstream connect timeout.")
    read_timeout_seconds: float = Field(
        120.0, gt=0, description="Longest wait for the next upstream byte."
    )
    max_upstream_connections: int = Field(
        100, gt=0, description="Connection pool size per upstream."
    )
    max_request_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest request body accepted from a client."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    audit_log: str | None = Field(
        None,
        description="Audit log file, one line per request (`-`: stderr; empty: off; default: "
        "audit.log in the data dir); reopened on SIGHUP.",
    )
    audit_format: Literal["json", "combined"] = Field(
        "json", description="Audit line format: json, or combined (nginx's, for log tools)."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token that opens /metrics (for Prometheus; besides an admin's "
        "credentials in accounts mode; required in open mode once set).",
    )
    metrics_token_file: Path | None = Field(
        None, description="File holding the metrics_token (wins over `metrics_token`)."
    )
    workers: int = Field(1, ge=1, le=64, description="Gateway worker processes.")
    database_url: str | None = Field(
        None,
        description="Cache database URL (default: SQLite in the data dir; postgresql://... "
        "for several replicas).",
    )
    database_password_file: Path | None = Field(
        None,
        description="File holding the PostgreSQL password, put into database_url (wins over "
        "a password in the URL; e.g. a container secret).",
    )
    auto_migrate: bool = Field(
        True, description="Bring the database schema up to date when the gateway starts."
    )
    cache_enabled: bool = Field(True, description="Cache metadata answers.")
    cache_max_bytes: int = Field(
        1024**3, gt=0, description="Cache size cap; least recently used entries go first."
    )
    cache_memory_bytes: int = Field(
        64 * 1024**2, ge=0, description="Size of the in-process memory tier."
    )
    cache_min_free_disk_bytes: int = Field(
        256 * 1024**2,
        ge=0,
        description="New entries are not written while the SQLite cache's disk has less free "
        "(so that purging still works when it fills up); 0: write until it is full.",
    )
    binary_cache_enabled: bool = Field(
        True, description="Keep binary downloads (series zips, DICOM, JPEG) as files."
    )
    binary_fill_in_background: bool = Field(
        True,
        description="A download the series cache is keeping goes on when its last client "
        "disconnects, so the retry is a hit (bounded by the read timeout and "
        "binary_cache_max_bytes).",
    )
    binary_max_background_fills: int = Field(
        4,
        ge=0,
        description="Fills going on without any client at once, per gateway process; a fill "
        "whose last client leaves beyond it is cancelled and nothing kept (0: every fill stops "
        "with its last client).",
    )
    binary_dir: Path | None = Field(
        None,
        description="Where kept binary downloads live (default: binaries in data_dir); may be "
        "a volume the replicas share.",
    )
    binary_cache_max_bytes: int = Field(
        50 * 1000**3,
        gt=0,
        description="Cap on the kept binaries' total size, lowered at start to what the disk "
        "can hold; least recently used files go first.",
    )
    binary_direct_writes: bool = Field(
        True,
        description="Fills write their files, and read them back for their sha256, past the "
        "page cache (O_DIRECT) where the filesystem allows it, else through it: far less CPU "
        "per GB on virtual machines, and a multi-GB download does not push what is read often "
        "out of the page cache.",
    )
    warm_concurrency: int = Field(
        2,
        ge=1,
        le=32,
        description="Series zips `nbia-proxy warm` downloads at once (modest, so a warm run "
        "never crowds out the lab).",
    )
    warm_max_rate: int = Field(
        0,
        ge=0,
        description="Bytes per second `nbia-proxy warm` fetches at most, over all its "
        "downloads; 0: no limit.",
    )
    cache_ttl: dict[str, float] = Field(
        default_factory=dict,
        description='Lifetimes by endpoint pattern, e.g. {"v4/getSeries": 3600}; '
        "first match wins, before the defaults.",
    )
    cache_negative_ttl_seconds: float = Field(
        60.0, ge=0, description="Lifetime of 400/404 answers (0: never stored)."
    )
    max_cached_body_bytes: int = Field(
        32 * 1024**2,
        gt=0,
        description="Largest metadata answer held in memory and cached (per request); a larger "
        "one is relayed as it arrives and not stored.",
    )
    cache_keep_expired_seconds: float = Field(
        7 * 24 * 3600.0, ge=0, description="How long expired entries are kept before the sweep."
    )
    cache_max_stale_seconds: float = Field(
        3 * 24 * 3600.0,
        ge=0,
        description="When the upstream fails, serve an expired entry up to this long past expiry.",
    )
    cache_stale_while_revalidate_seconds: float = Field(
        0.0,
        ge=0,
        description="Serve an entry this long past expiry while one background refresh runs "
        "(0: off).",
    )
    offline: bool = Field(False, description="Answer only from the cache; misses get 504.")
    request_deadline_seconds: float = Field(
        120.0, gt=0, description="Longest a client waits for the start of an answer."
    )
    upstream_max_concurrency: int = Field(
        32, gt=0, description="Upstream requests in flight at once, per upstream."
    )
    upstream_rate_per_second: float = Field(
        0.0, ge=0, description="Upstream requests started per second, per upstream (0: no limit)."
    )
    upstream_queue_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest wait for an upstream slot before a 503."
    )
    retry_budget_seconds: float = Field(
        60.0, ge=0, description="Total time spent retrying a read after upstream 429/503."
    )
    retry_max_attempts: int = Field(10, ge=0, description="Retries of a read after 429/503.")
    circuit_failure_threshold: int = Field(
        5, gt=0, description="Upstream failures in a row that open the circuit."
    )
    circuit_cooldown_seconds: float = Field(
        4.0,
        gt=0,
        description="Longest pause between probes of an open circuit; after it, one client "
        "request may also go through as a probe.",
    )
    circuit_probe_seconds: float = Field(
        1.0,
        ge=0,
        description="First probe of an open circuit this long after it opens, the pause "
        "doubling up to circuit_cooldown_seconds (0: no probes of the gateway's own).",
    )
    cache_recheck_seconds: float = Field(
        5.0, ge=0, description="Age after which a memory copy is checked against the database."
    )
    database_timeout_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Longest wait for the database on a request's path (a connection from "
        "the pool, a new one, a cache read); past it the database counts as unreachable and "
        "the request is relayed without it.",
    )
    database_retry_seconds: float = Field(
        1.0,
        gt=0,
        le=300,
        description="While the database is unreachable, how long requests go on without "
        "trying it between two attempts.",
    )
    redis_url: str = Field(
        "",
        description="Redis shared by every worker and replica for the upstream limits, user "
        "limits, lockouts, coalescing and the breaker (redis://HOST:PORT/DB, rediss:// for "
        "TLS; empty: each process on its own).",
    )
    redis_prefix: str = Field(
        "nbia-proxy:",
        min_length=1,
        description="Prefix of every key in Redis (one per deployment sharing a Redis).",
    )
    redis_timeout_seconds: float = Field(
        0.25,
        gt=0,
        description="Longest wait for Redis; past it a request goes on with per-process "
        "limits (and Redis is tried again a second later).",
    )
    shared_lease_seconds: float = Field(
        5.0,
        gt=0,
        description="Lease of an upstream slot, a metadata fetch or a series fill held in "
        "Redis, renewed while it runs: how long a replica that died blocks the others.",
    )
    update_poll_seconds: float = Field(
        3600.0,
        ge=0,
        description="How often NBIA's update feeds (getUpdatedSeries, NewPatientsInCollection, "
        "NewStudiesInPatientCollection) are asked what changed, to purge it (0: never; needs "
        "the cache).",
    )
    update_forced_poll_seconds: float = Field(
        60.0,
        ge=0,
        description="The least time between two polls of an upstream's update feeds forced "
        "with POST /_proxy/feeds/poll (sooner: 429 with Retry-After; 0: no minimum).",
    )

    @field_validator("upstream", "nlst_upstream")
    @classmethod
    def _check_base_url(cls, value: str, info: ValidationInfo) -> str:
        return checked_base_url(value, _BASE_URL_EXAMPLES[str(info.field_name)])

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str | None) -> str | None:
        if value:
            problem = _database_url_problem(value)
            if problem is not None:
                # Never the URL itself: it may hold a password.
                raise ValueError(f"{problem}: {_DATABASE_HINT}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _supported_redis(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            # Never the URL itself: it may hold a password.
            raise ValueError("use redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix://PATH")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        # A flag or an environment variable gives one string; a TOML file may give a list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted proxy {entry!r} is not an IP address or network (CIDR)"
                ) from None
        return value

    @model_validator(mode="after")
    def _refuse_open_remote(self) -> Settings:
        if not (_is_loopback(self.host) or self.allow_remote_open or self.access == "accounts"):
            raise ValueError(
                f"host {self.host} is not a loopback address and the gateway has no lab "
                "accounts: set access=accounts (NBIA_PROXY_ACCESS=accounts), or "
                "allow_remote_open (NBIA_PROXY_ALLOW_REMOTE_OPEN=true) to expose it anyway"
            )
        return self

    @model_validator(mode="after")
    def _read_password_file(self) -> Settings:
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(
                    f"password_file {self.password_file} cannot be read: {reason}"
                ) from None
            self.password = SecretStr(text)
        return self

    @model_validator(mode="after")
    def _read_nlst_password_file(self) -> Settings:
        if self.nlst_password_file is not None:
            text = _read_secret_text("nlst_password_file", self.nlst_password_file)
            self.nlst_password = SecretStr(text.rstrip("\r\n"))
        return self

    @model_validator(mode="after")
    def _read_database_password_file(self) -> Settings:
        if self.database_password_file is None:
            return self
        if not self.database_url or not self.database_url.lower().startswith("postgres"):
            raise ValueError(
                "database_password_file needs a postgresql:// database_url to put the password in"
            )
        from sqlalchemy.engine import make_url

        text = _read_secret_text("database_password_file", self.database_password_file)
        # URL.set quotes the characters a URL cannot hold as they are (@, :, /, %).
        url = make_url(self.database_url).set(password=text.rstrip("\r\n"))
        self.database_url = url.render_as_string(hide_password=False)
        return self

    @model_validator(mode="after")
    def _read_metrics_token_file(self) -> Settings:
        if self.metrics_token_file is not None:
            try:
                text = self.metrics_token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(
                    f"metrics_token_file {self.metrics_token_file} cannot be read: {reason}"
                ) from None
            self.metrics_token = SecretStr(text)
        if self.metrics_token is not None and not self.metrics_token.get_secret_value():
            self.metrics_token = None  # empty: no token
        return self

    @model_validator(mode="after")
    def _check_token_secret_file(self) -> Settings:
        if self.token_secret_file is not None:
            read_secret_file(self.token_secret_file)  # refused at start, not at the first login
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags arrive as init kwargs; the config file is merged in load_settings, below env.
        return (init_settings, env_settings)


def _read_secret_text(name: str, path: Path) -> str:
    """The text of the secret file that setting ``name`` names, or a ValueError saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{name} {path} cannot be read: {reason}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def checked_base_url(value: str, example: str) -> str:
    """``value`` without a trailing slash, if it can be an NBIA server's base URL.

    The gateway appends NBIA's own paths (``/nbia-api/services/v4/...``), so a URL that already
    holds one of them, a query, a fragment or credentials is a mistake; a plain prefix (NBIA
    behind a reverse proxy, another gateway's ``/nlst`` mount) is not.
    """
    hint = f"give the server's base URL without /nbia-api, e.g. {example}"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"not a URL: {hint}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must start with http:// or https://, e.g. {example}")
    if parts.username is not None or parts.password is not None:
        # Not echoed: the service account is username and password (or password_file).
        raise ValueError("must not hold a user name or password: set username and password")
    if not parts.hostname:
        raise ValueError(f"has no host: {hint}")
    if "?" in value or "#" in value:
        raise ValueError(f"must not have a query or fragment: {hint}")
    if _NBIA_PATH_PARTS & {part.lower() for part in parts.path.split("/")}:
        raise ValueError(hint)
    return value.rstrip("/")


def _database_url_problem(url: str) -> str | None:
    scheme, separator, _ = url.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(\+[A-Za-z0-9_]+)?", scheme):
        return "not a database URL"
    backend, _, driver = scheme.lower().partition("+")
    if backend not in _DATABASES:
        return f"{backend} databases are not supported"
    if driver not in _DATABASES[backend]:
        return f"the {driver} driver is not supported"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:  # parsed here, not first at start-up: a bad port was a stack trace there
        make_url(url).port  # noqa: B018 -- make_url checks the port is a number
    except (ArgumentError, ValueError):
        return "not a database URL (a port that is not a number, or no host part)"
    return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from (in order of strength) ``overrides``, the environment and a TOML file.

    ``overrides`` holds only the flags the user actually gave; ``None`` values are ignored.
    Raises :class:`InvalidSettings`, whose lines name each bad setting and where it came from.
    """
    flags = {key: value for key, value in overrides.items() if value is not None}
    file_values = _read_config_file(config_file) if config_file else {}
    env_names = _names_set_in_environment()
    # A file value applies only where neither a flag nor the environment set that field.
    from_file = {k: v for k, v in file_values.items() if k not in env_names}
    try:
        return Settings(**(from_file | flags))
    except ValidationError as exc:
        # Where each value came from, for the message (a flag needs no reminder).
        sources = dict.fromkeys(from_file, f" in {config_file}")
        sources |= {name: f" in {ENV_PREFIX}{name.upper()}" for name in env_names}
        sources |= dict.fromkeys(flags, "")
        raise InvalidSettings([_explain(error, sources) for error in exc.errors()]) from None
    except pydantic_settings.SettingsError as exc:
        # Raised for a variable that is not JSON where JSON is expected (e.g. cache_ttl).
        found = re.search(r'field "(\w+)"', str(exc))
        name = found.group(1) if found else "?"
        raise InvalidSettings(
            [f"invalid setting {name} in {ENV_PREFIX}{name.upper()}: not valid JSON"]
        ) from None


def _explain(error: Any, sources: dict[str, str]) -> str:
    """One line for one validation error, without pydantic's prefixes and without the value."""
    name = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "extra_forbidden":
        guess = difflib.get_close_matches(name, list(Settings.model_fields), n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        return f"unknown setting {name}{sources.get(name, '')}{hint}"
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if not name:
        return message  # a check across settings: its message names them
    return f"invalid setting {name}{sources.get(name, '')}: {message}"


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise InvalidSettings([f"config file {path} does not exist"]) from None
    except OSError as exc:
        raise InvalidSettings([f"config file {path} cannot be read: {exc.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidSettings([f"config file {path} is not valid TOML: {exc}"]) from None
    # Accept both a flat file and one with a [nbia-proxy] table.
    table = data.get("nbia-proxy", data)
    if not isinstance(table, dict):
        raise InvalidSettings([f"config file {path}: [nbia-proxy] must be a table of settings"])
    return {key.replace("-", "_"): value for key, value in table.items()}


def _names_set_in_environment() -> set[str]:
    return {
        name[len(ENV_PREFIX) :].lower()
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
    }


def unknown_variables(environ: Mapping[str, str], others: Collection[str]) -> list[str]:
    """A warning for each ``NBIA_PROXY_*`` variable that is neither a setting nor in ``others``
    (the command's own variables), with the likeliest setting it was meant to be.
    ``NBIA_PROXY_TEST_*`` belongs to the test suite (``tests/databases.py``)."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | set(others)
    warnings = []
    for variable in sorted(name.upper() for name in environ):
        if variable.startswith(ENV_PREFIX + "TEST_"):
            continue
        if variable.startswith(ENV_PREFIX) and variable not in known:
            guess = difflib.get_close_matches(variable, sorted(known), n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            warnings.append(f"{variable} is not a setting and is ignored{hint}")
    return warnings
