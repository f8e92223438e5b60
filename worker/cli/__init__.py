"""The `seat-sync` command: one module per command group; each parses, calls one thing, prints."""

from worker.cli.app import main

__all__ = ["main"]
