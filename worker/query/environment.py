"""The few settings a read needs, read from the environment without loading pydantic.

`worker.config.Settings` stays the one definition of every setting: its names, defaults,
rules and messages. Building it costs ~200 ms of imports (pydantic-settings), most of what a
read of the mirror may take, so the read commands (`seats`, `seat`, `scopes`, `history`,
`status`, `changes`) read their few variables here instead, as a fast path:

- the same names (the fields of `ReadSettings` are fields of `Settings`, so a function that
  takes a `MirrorConfig` takes either; mypy checks it);
- a value is taken here only when it is plainly valid by `Settings`' own rules (a whole
  number, a known scheme, ...); anything else, valid or not, is handed to `Settings`
  (`load_settings()`), which decides, and whose one-line message names the variable.

So the fast path never accepts what `Settings` refuses, and never refuses what it accepts;
`tests/test_cli.py` checks both on each variable and default.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

# The values `worker.config` gives these settings (tests pin that they agree).
DEFAULT_SQLITE_FILE = "seat-sync.db"
POLAR_API_VERSIONS = ("2026-10", "2026-04")
DEFAULTS = {
    "polar_api_url": "https://api.polar.sh",
    "polar_api_version": POLAR_API_VERSIONS[0],
    "data_dir": ".seat-sync",
    "polar_requests_per_minute": "400",
    "polar_rate_window_seconds": "60",
}
DATABASE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgres", "postgresql", "postgresql+asyncpg")
_WHOLE = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_TRUE = ("1", "true", "yes", "on", "t", "y")
_FALSE = ("0", "false", "no", "off", "f", "n")


class MirrorConfig(Protocol):
    """What a read of the mirror uses; `Settings` and `ReadSettings` both provide it."""

    @property
    def database_url(self) -> str: ...
    @property
    def redis_url(self) -> str | None: ...
    @property
    def data_dir(self) -> Path: ...
    @property
    def polar_api_url(self) -> str: ...
    @property
    def polar_api_version(self) -> str: ...
    @property
    def polar_requests_per_minute(self) -> int: ...
    @property
    def polar_rate_window_seconds(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class ReadSettings:
    """The settings of a read command, named and valued as in `Settings`."""

    database_url: str
    redis_url: str | None
    data_dir: Path
    polar_api_url: str
    polar_api_version: str
    polar_requests_per_minute: int
    polar_rate_window_seconds: float


class _NotPlainError(Exception):
    """A value this fast path does not take on itself; `Settings` decides."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _database_url(raw: str | None) -> str:
    value = (raw or "").strip()
    if not value:
        return f"sqlite+aiosqlite:///{Path.cwd() / DEFAULT_SQLITE_FILE}"
    if value.split("://", 1)[0].lower() not in DATABASE_SCHEMES:
        raise _NotPlainError
    return value


def _redis_url(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise _NotPlainError
    return raw.strip()


def _api_url(raw: str | None, allow_insecure: str | None) -> str:
    value = (raw if raw is not None else DEFAULTS["polar_api_url"]).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _NotPlainError
    if parts.scheme != "https" and not _is_loopback(parts.hostname):
        flag = (allow_insecure or "false").strip().lower()
        if flag not in _TRUE:
            raise _NotPlainError
    return value


def _api_version(raw: str | None) -> str:
    value = (raw if raw is not None else DEFAULTS["polar_api_version"]).strip()
    if value not in POLAR_API_VERSIONS:
        raise _NotPlainError
    return value


def _positive(raw: str | None, default: str, pattern: re.Pattern[str]) -> str:
    value = raw if raw is not None else default
    if pattern.fullmatch(value) is None or float(value) <= 0:
        raise _NotPlainError
    return value


def _plain_bool(raw: str | None) -> None:
    if raw is not None and raw.strip().lower() not in _TRUE + _FALSE:
        raise _NotPlainError


def read_settings() -> MirrorConfig:
    """The read settings from the environment (names case-insensitive, as in `Settings`).
    Raises `worker.config.ConfigError` naming the variable when a value is invalid."""
    env = {k.lower(): v for k, v in os.environ.items()}
    try:
        _plain_bool(env.get("polar_allow_insecure_url"))
        return ReadSettings(
            database_url=_database_url(env.get("database_url")),
            redis_url=_redis_url(env.get("redis_url")),
            data_dir=Path(env.get("data_dir", DEFAULTS["data_dir"])),
            polar_api_url=_api_url(env.get("polar_api_url"), env.get("polar_allow_insecure_url")),
            polar_api_version=_api_version(env.get("polar_api_version")),
            polar_requests_per_minute=int(
                _positive(
                    env.get("polar_requests_per_minute"),
                    DEFAULTS["polar_requests_per_minute"],
                    _WHOLE,
                )
            ),
            polar_rate_window_seconds=float(
                _positive(
                    env.get("polar_rate_window_seconds"),
                    DEFAULTS["polar_rate_window_seconds"],
                    _DECIMAL,
                )
            ),
        )
    except _NotPlainError:
        pass
    # Not plainly valid: the one settings class decides (and names the variable if wrong).
    from worker.config import load_settings

    return load_settings()
