"""The settings a command runs with: read from the environment, logging configured from them.

A bad value raises ConfigError naming the variable; the app prints it as one line (exit 2).
"""

from __future__ import annotations

from worker.config import Settings, load_settings
from worker.platform import logs


def settings_from_env() -> Settings:
    settings = load_settings()
    logs.configure(log_format=settings.log_format, level=settings.log_level)
    return settings
