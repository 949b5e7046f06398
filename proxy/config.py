"""Settings: every knob of the gateway, read from flags, ``NBIA_PROXY_*`` variables or a TOML file.

Precedence, highest first: command-line flag, environment variable, config file, default.
Nothing is read at import time; :func:`load_settings` builds a fresh :class:`Settings`.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

#: NBIA's public guest account; the real server accepts any password for it.
GUEST_USERNAME = "nbia_guest"


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
    client_id: str = Field("nbia", description="OAuth client_id sent with the password grant.")
    token_on_v4: bool = Field(
        False, description="Also send the service token on v4 requests (v4 works anonymously)."
    )
    token_refresh_margin_seconds: float = Field(
        60.0, ge=0, description="Refresh the service token this long before it expires."
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
    workers: int = Field(1, ge=1, le=64, description="Gateway worker processes.")
    database_url: str | None = Field(
        None,
        description="Cache database URL (default: SQLite in the data dir; postgresql://... "
        "for several replicas).",
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
    cache_ttl: dict[str, float] = Field(
        default_factory=dict,
        description='Lifetimes by endpoint pattern, e.g. {"v4/getSeries": 3600}; '
        "first match wins, before the defaults.",
    )
    cache_negative_ttl_seconds: float = Field(
        60.0, ge=0, description="Lifetime of 400/404 answers (0: never stored)."
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
        30.0, gt=0, description="How long an open circuit rests before one probe."
    )
    cache_recheck_seconds: float = Field(
        5.0, ge=0, description="Age after which a memory copy is checked against the database."
    )

    @field_validator("upstream", "nlst_upstream")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("an upstream URL must start with http:// or https://")
        return value.rstrip("/")

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
            text = self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            self.password = SecretStr(text)
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from (in order of strength) ``overrides``, the environment and a TOML file.

    ``overrides`` holds only the flags the user actually gave; ``None`` values are ignored.
    """
    flags = {key: value for key, value in overrides.items() if value is not None}
    file_values = _read_config_file(config_file) if config_file else {}
    env_names = _names_set_in_environment()
    # A file value applies only where neither a flag nor the environment set that field.
    merged = {k: v for k, v in file_values.items() if k not in env_names} | flags
    return Settings(**merged)


def _read_config_file(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    # Accept both a flat file and one with a [nbia-proxy] table.
    table = data.get("nbia-proxy", data)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a table of settings")
    return {key.replace("-", "_"): value for key, value in table.items()}


def _names_set_in_environment() -> set[str]:
    import os

    prefix = "NBIA_PROXY_"
    return {name[len(prefix) :].lower() for name in os.environ if name.upper().startswith(prefix)}
