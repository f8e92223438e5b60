"""How commands print: the `--format` and `--columns` options, and rows as a plain table for
people (never truncated) or JSON, NL-JSON or CSV for scripts (every key, unlike the table).

Plain text written to stdout, no terminal library: a read command loads nothing it does not
need. Commands that draw progress bars ask `console()` for rich's, loaded then.
"""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console


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
# `columns: Columns = None`: the table's columns, instead of the command's default ones.
Columns = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="Table columns, comma-separated: any JSON key (member_* for the member's), or "
        "seat, scope, email, claimed, expires, holder. JSON, NDJSON and CSV keep every key.",
    ),
]

# The nested `member` object flattened into CSV columns, as the seat table stores it.
_MEMBER_KEYS = ("created_at", "modified_at", "customer_id", "email", "name", "external_id", "role")
SHORT_ID = 8

_rich: dict[bool, Console] = {}


def console(*, stderr: bool = False) -> Console:
    """rich's console, for the commands that draw progress or the demo (loaded on demand)."""
    if stderr not in _rich:
        from rich.console import Console

        _rich[stderr] = Console(stderr=stderr)
    return _rich[stderr]


def say(text: str) -> None:
    """Lines of plain text on stdout (data is printed as is)."""
    sys.stdout.write(text + "\n")


def warn(text: str) -> None:
    """One line for the person at the terminal, on stderr (stdout stays parseable)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------- cells


def _minutes(value: Any) -> str:
    text = cell(value)
    return text[:16]


def cell(value: Any) -> str:
    """A value as a table cell: empty for None, UTC to the second for times (given as
    datetimes or ISO text), sorted JSON for dicts, one line always."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    if len(text) >= 19 and text[4] == "-" and text[10] == "T" and text[13] == ":":
        return text[:10] + " " + text[11:19]  # an ISO timestamp, in UTC
    return " ".join(text.split()) if "\n" in text else text


def _short(value: Any) -> str:
    return "" if value is None else str(value)[:SHORT_ID]


def _arrow(old: Any, new: Any) -> str:
    """`old -> new`, or the one value when it did not change."""
    return f"{old or '-'}" if old == new else f"{old or '-'} -> {new or '-'}"


def _scope(row: Mapping[str, Any]) -> str | None:
    if row.get("scope_id") is not None:
        kind = "sub" if row.get("scope_kind") == "subscription" else row.get("scope_kind") or ""
        return f"{kind} {_short(row['scope_id'])}".strip()
    if row.get("subscription_id") is not None:
        return f"sub {_short(row['subscription_id'])}"
    if row.get("order_id") is not None:
        return f"order {_short(row['order_id'])}"
    return None


# Table-only columns worked out from a row; None when the row has nothing to show there.
DERIVED: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "seat": lambda r: _short(r.get("seat_id", r.get("id"))),
    "scope": _scope,
    # The seat's address: `email`, or `customer_email` without Polar's member model.
    "email": lambda r: (
        cell(r.get("email") or r.get("customer_email")) if "customer_email" in r else None
    ),
    "claimed": lambda r: _minutes(r["claimed_at"]) if "claimed_at" in r else None,
    # Only a pending invitation expires; Polar keeps the date after a claim or revoke.
    "expires": lambda r: (
        (_minutes(r["invitation_token_expires_at"]) if r.get("status") == "pending" else "")
        if "invitation_token_expires_at" in r
        else None
    ),
    "status": lambda r: _arrow(r["old_status"], r["new_status"]) if "old_status" in r else None,
    "holder": lambda r: _arrow(r["old_email"], r["new_email"]) if "old_email" in r else None,
}


def flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with the nested member as member_* keys and other objects as JSON text."""
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


def table_cell(row: Mapping[str, Any], column: str) -> str:
    derive = DERIVED.get(column)
    if derive is not None:
        value = derive(row)
        if value is not None:
            return value
    return cell(flatten(row).get(column) if column.startswith("member_") else row.get(column))


def chosen_columns(given: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """The table's columns: `--columns a,b,c`, or the command's default."""
    if given is None:
        return tuple(default)
    picked = tuple(c.strip() for c in given.split(",") if c.strip())
    if not picked:
        raise UsageError("--columns needs at least one column name")
    return picked


def check_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        return
    known = set(flatten(rows[0])) | set(rows[0]) | set(DERIVED)
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UsageError(
            f"no column {', '.join(unknown)}; columns: {', '.join(sorted(known - {'member'}))}"
        )


def table_lines(headers: Sequence[str], cells: Iterable[Sequence[str]]) -> list[str]:
    """A plain table: columns as wide as their widest cell, two spaces apart, nothing cut."""
    body = [list(r) for r in cells]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)]


def print_table(
    headers: Sequence[str], cells: Iterable[Sequence[str]], *, title: str | None = None
) -> None:
    lines = table_lines(headers, cells)
    sys.stdout.write("\n".join(([title] if title else []) + lines) + "\n")


def emit_rows(
    rows: list[dict[str, Any]],
    fmt: OutputFormat,
    *,
    columns: Sequence[str],
    title: str,
    keys: Sequence[str] | None = None,
) -> None:
    """Rows as a table of `columns` for people; JSON (a list), NL-JSON or CSV for scripts
    (`keys`: the CSV header when there is no row to take it from)."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.ndjson:
        sys.stdout.writelines(json.dumps(row, default=str) + "\n" for row in rows)
    elif fmt is OutputFormat.csv:
        flat = [flatten(r) for r in rows]
        fields: list[str] = list(flat[0].keys()) if flat else list(keys or columns)
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in flat:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    else:
        check_columns(rows, columns)
        print_table(columns, ([table_cell(r, c) for c in columns] for r in rows), title=title)


# Starting widths of the streamed table's columns: typical cells fit, so it rarely shifts.
STREAM_WIDTHS = {"observed_at": 19, "status": 18, "change": 8, "holder": 40}


class RowStream:
    """Rows printed as they come (`changes --follow`): a table whose columns widen as
    needed, NL-JSON, CSV with one header, or a JSON list closed by `close()`."""

    def __init__(self, fmt: OutputFormat, columns: Sequence[str], keys: Sequence[str]) -> None:
        self.fmt = fmt
        self.columns = list(columns)
        self.widths = [max(len(c), STREAM_WIDTHS.get(c, SHORT_ID)) for c in columns]
        self.keys = list(keys)
        self.count = 0
        self._csv = csv.DictWriter(sys.stdout, fieldnames=self.keys, extrasaction="ignore")

    def start(self) -> None:
        if self.fmt is OutputFormat.table:
            self._line(self.columns)
        elif self.fmt is OutputFormat.csv:
            self._csv.writeheader()
        elif self.fmt is OutputFormat.json:
            sys.stdout.write("[")
        sys.stdout.flush()

    def _line(self, values: Sequence[str]) -> None:
        self.widths = [max(w, len(v)) for w, v in zip(self.widths, values, strict=True)]
        sys.stdout.write(
            "  ".join(v.ljust(w) for v, w in zip(values, self.widths, strict=True)).rstrip() + "\n"
        )

    def write(self, row: Mapping[str, Any]) -> None:
        if self.fmt is OutputFormat.table:
            self._line([table_cell(row, c) for c in self.columns])
        elif self.fmt is OutputFormat.csv:
            self._csv.writerow({k: "" if v is None else v for k, v in row.items()})
        elif self.fmt is OutputFormat.json:
            sys.stdout.write(("," if self.count else "") + "\n" + json.dumps(dict(row), indent=2))
        else:
            sys.stdout.write(json.dumps(dict(row)) + "\n")
        self.count += 1

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        if self.fmt is OutputFormat.json:
            sys.stdout.write("\n]\n" if self.count else "]\n")
        sys.stdout.flush()


def emit_document(
    document: dict[str, Any], fmt: OutputFormat, *, as_table: Callable[[], None]
) -> None:
    """One document: `as_table()` prints it for people; any other format prints JSON."""
    if fmt is OutputFormat.table:
        as_table()
    else:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
