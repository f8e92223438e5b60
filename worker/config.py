"""Settings for every seat-sync process, read from the environment and validated at startup."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_FILE = "seat-sync.db"
# Polar API versions whose seat, subscription, order and error shapes this program reads.
# Polar also serves 2027-01, but its shapes have not been checked against this code.
POLAR_API_VERSIONS = ("2026-10", "2026-04")
DEFAULT_POLAR_API_VERSION = POLAR_API_VERSIONS[0]
DEFAULT_SYNC_QUIET_SECONDS = 0.5
DEFAULT_SYNC_MAX_WAIT_SECONDS = 10.0


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """One place for configuration: environment variables only, secrets as SecretStr."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", validate_default=True
    )

    polar_access_token: SecretStr | None = None
    polar_api_url: str = "https://api.polar.sh"
    # Sent as `Polar-Version` on every request.
    polar_api_version: str = DEFAULT_POLAR_API_VERSION
    polar_webhook_secret: SecretStr | None = None
    polar_allow_insecure_url: bool = False
    polar_timeout_seconds: float = Field(default=15.0, gt=0)
    polar_requests_per_minute: int = Field(default=400, gt=0)
    # The window POLAR_REQUESTS_PER_MINUTE applies to; only tests and benchmarks change it.
    polar_rate_window_seconds: float = Field(default=60.0, gt=0)

    database_url: str = ""
    redis_url: str | None = None
    data_dir: Path = Path(".seat-sync")

    sync_max_tries: int = Field(default=8, ge=1)
    # The first retry of a failed Polar call waits 1-2 times this (see worker.polar.retry).
    sync_retry_base_seconds: float = Field(default=1.0, gt=0)
    # Coalescing of a scope's syncs (worker.queue): a change on a quiet scope syncs at once;
    # later ones share one follow-up, started once the scope has been quiet this long...
    sync_quiet_seconds: float = Field(default=DEFAULT_SYNC_QUIET_SECONDS, ge=0)
    # ...and never later than this after the first change it covers.
    sync_max_wait_seconds: float = Field(default=DEFAULT_SYNC_MAX_WAIT_SECONDS, ge=0)
    resync_interval_minutes: float = Field(default=360, gt=0)
    # Unset: 4, or 1 when DATABASE_URL is SQLite (one writer: overlapping syncs gain little
    # there and keep each other's transactions, and the webhooks waiting on them, open).
    resync_concurrency: int = Field(default=4, ge=1, le=32)
    remind_interval_minutes: float = Field(default=15, gt=0)
    remind_window_hours: float = Field(default=6.0, gt=0)
    # A batch of reminders is spread over up to this many seconds, with jitter.
    remind_spread_seconds: float = Field(default=60.0, ge=0)
    renew_expired_invitations: bool = False
    renew_max_per_recipient: int = Field(default=1, ge=0)

    # Retention (worker.schedule.retention, daily): processed webhook deliveries, finished
    # sync runs, and seat_change only when set (history is the product). At least a day:
    # dedupe needs a delivery's id while Polar may still retry it (~34 minutes).
    webhook_retention_days: float = Field(default=7, ge=1)
    sync_run_retention_days: float = Field(default=30, ge=1)
    seat_change_retention_days: float | None = Field(default=None, ge=1)

    # Prometheus's /metrics, on a port of its own (never the webhook port: that one is
    # public, and the gauges cost database queries). Unset: no metrics endpoint.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Loopback by default: scrapers reach it privately (0.0.0.0 in a container, where the
    # pod or compose network is the boundary).
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    # The gauges read from the database and Redis are refreshed at most once per interval,
    # however often /metrics is scraped.
    metrics_refresh_seconds: float = Field(default=15.0, gt=0)

    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"

    @field_validator("polar_api_url")
    @classmethod
    def _strip_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://api.polar.sh")
        return value

    @field_validator("polar_api_version")
    @classmethod
    def _known_api_version(cls, value: str) -> str:
        value = value.strip()
        if value not in POLAR_API_VERSIONS:
            raise ValueError(
                "must be one of " + ", ".join(POLAR_API_VERSIONS) + " (the versions whose "
                f"shapes this program reads), not {value!r}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return f"sqlite+aiosqlite:///{Path.cwd() / DEFAULT_SQLITE_FILE}"
        scheme = value.split("://", 1)[0].lower()
        if scheme not in {
            "sqlite",
            "sqlite+aiosqlite",
            "postgres",
            "postgresql",
            "postgresql+asyncpg",
        }:
            raise ValueError(
                "must start with sqlite://, sqlite+aiosqlite://, postgres://, "
                "postgresql:// or postgresql+asyncpg://"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _blank_redis_is_unset(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value.strip()

    @field_validator("seat_change_retention_days", mode="before")
    @classmethod
    def _blank_retention_is_unset(cls, value: object) -> object:
        # `SEAT_CHANGE_RETENTION_DAYS=` in an env file: kept for ever, as when unset.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="before")
    @classmethod
    def _blank_resync_concurrency_is_unset(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("resync_concurrency") == "":
            return {k: v for k, v in data.items() if k != "resync_concurrency"}
        return data

    @model_validator(mode="after")
    def _resync_concurrency_for_backend(self) -> Settings:
        if "resync_concurrency" not in self.model_fields_set and self.is_sqlite:
            self.resync_concurrency = 1
        return self

    @model_validator(mode="after")
    def _https_unless_loopback(self) -> Settings:
        parts = urlsplit(self.polar_api_url)
        if (
            parts.scheme != "https"
            and not _is_loopback_host(parts.hostname)
            and not self.polar_allow_insecure_url
        ):
            raise ValueError(
                "POLAR_API_URL must use https unless it points at loopback "
                "(set POLAR_ALLOW_INSECURE_URL=true to override)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def require_token(self) -> SecretStr:
        if self.polar_access_token is None or not self.polar_access_token.get_secret_value():
            raise ConfigError(
                "POLAR_ACCESS_TOKEN is not set: create an organization access token with "
                "customer_seats:read, customer_seats:write, subscriptions:read and orders:read"
            )
        return self.polar_access_token

    def require_webhook_secret(self) -> SecretStr:
        if self.polar_webhook_secret is None or not self.polar_webhook_secret.get_secret_value():
            raise ConfigError(
                "POLAR_WEBHOOK_SECRET is not set: copy the secret Polar shows for the endpoint"
            )
        return self.polar_webhook_secret


def load_settings() -> Settings:
    """Read the environment; on a bad value raise ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
            name = loc[0].upper() if loc else ""
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            problems.append(f"{name}: {msg}" if name else msg)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
