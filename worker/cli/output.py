"""How commands print: the one `--format` option, and rows as a table for people or JSON,
NL-JSON or CSV for scripts (every key, unlike the table)."""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    ndjson = "ndjson"


def _format_option(help_text: str) -> Any:
    return typer.Option("--format", help=help_text)


# `fmt: Format = OutputFormat.table` on every command that prints rows.
Format = Annotated[OutputFormat, _format_option("table, json, csv or ndjson.")]
# A command that prints one document (a seat, the status): a table, or else JSON.
DocumentFormat = Annotated[OutputFormat, _format_option("table or json.")]

# The nested `member` object flattened into CSV columns, as the seat table stores it.
_MEMBER_KEYS = ("created_at", "modified_at", "customer_id", "email", "name", "external_id", "role")


def say(text: str) -> None:
    """One line of plain text on stdout (no markup, no highlighting: data is printed as is)."""
    out.print(text, markup=False, highlight=False)


def warn(text: str) -> None:
    """One line for the person at the terminal, on stderr (stdout stays parseable)."""
    err.print(text, markup=False, highlight=False)


def cell(value: Any) -> Text:
    """A value as a table cell, literally (a bracket in the data is not markup): empty for
    None, UTC seconds for times, sorted JSON for dicts."""
    if value is None:
        return Text("")
    if isinstance(value, datetime):
        return Text(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, dict):
        return Text(json.dumps(value, sort_keys=True))
    return Text(str(value))


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key == "member":
            for mk in _MEMBER_KEYS:
                flat[f"member_{mk}"] = value.get(mk) if isinstance(value, dict) else None
        elif isinstance(value, dict):
            flat[key] = json.dumps(value, sort_keys=True)
        else:
            flat[key] = value
    return flat


def emit_rows(
    rows: list[dict[str, Any]], fmt: OutputFormat, *, columns: Sequence[str], title: str
) -> None:
    """Rows as a table of `columns` on a terminal; JSON (a list), NL-JSON or CSV for scripts."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.ndjson:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    elif fmt is OutputFormat.csv:
        flat = [_flatten(r) for r in rows]
        fields: list[str] = list(flat[0].keys()) if flat else list(columns)
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in flat:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    else:
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*(cell(row.get(c)) for c in columns))
        out.print(table)


def emit_document(
    document: dict[str, Any], fmt: OutputFormat, *, as_table: Callable[[], None]
) -> None:
    """One document: `as_table()` prints it for people; any other format prints JSON."""
    if fmt is OutputFormat.table:
        as_table()
    else:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
