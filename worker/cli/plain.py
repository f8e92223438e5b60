"""Plain parameter values, converted without pydantic.

typer (0.2x and later) converts each parameter of the command it runs through a pydantic
TypeAdapter, built on first use: importing pydantic and building the adapters costs about
100 ms, as much as the rest of a read of the mirror. Every parameter of `seat-sync` is
plain (str, int, float, bool, a StrEnum, a list of str), and is converted here the way
typer does, before typer would build an adapter; any other parameter is left to typer.
On a typer without that lazy slot (older releases convert through click) this does nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, get_args, get_origin

import typer

Convert = Callable[[Any, Any], Any]

_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off", ""})


def _text(value: Any, param: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flag(value: Any, param: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise typer.BadParameter(f"{value!r} is not a valid boolean.", param=param)


def _number(kind: type[int] | type[float], low: Any, high: Any) -> Convert:
    noun = "integer" if kind is int else "number"

    def convert(value: Any, param: Any) -> int | float:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a valid {noun}.", param=param) from None
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = " and ".join(
                text
                for text in (
                    f">= {low}" if low is not None else "",
                    f"<= {high}" if high is not None else "",
                )
                if text
            )
            raise typer.BadParameter(f"{value} must be {bounds}.", param=param)
        return number

    return convert


def _choice(kind: type[enum.Enum], case_sensitive: bool) -> Convert:
    def fold(text: str) -> str:
        return text if case_sensitive else text.casefold()

    def convert(value: Any, param: Any) -> enum.Enum:
        if isinstance(value, kind):
            return value
        for member in kind:
            if fold(str(member.value)) == fold(str(value)):
                return member
        listed = ", ".join(repr(str(m.value)) for m in kind)
        raise typer.BadParameter(f"{value!r} is not one of {listed}.", param=param)

    return convert


def _converter(annotation: Any, info: Any) -> Convert | None:
    """How a value of `annotation` is converted, or None when typer should do it."""
    if getattr(info, "parser", None) is not None or getattr(info, "clamp", False):
        return None
    if annotation is str:
        return _text
    if annotation is bool:
        return _flag
    if annotation is int or annotation is float:
        return _number(annotation, getattr(info, "min", None), getattr(info, "max", None))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _choice(annotation, bool(getattr(info, "case_sensitive", True)))
    if get_origin(annotation) is list and get_args(annotation) == (str,):
        return _text
    return None


class PlainValue:
    """typer's runtime conversion of one parameter (its `coerce` contract)."""

    def __init__(self, convert: Convert) -> None:
        self._convert = convert

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        many = bool(getattr(param, "multiple", False)) or getattr(param, "nargs", 1) == -1
        if value is None:
            return () if many else None
        if many:
            if isinstance(value, str):
                raise typer.BadParameter("Value must be an iterable.", param=param)
            return [self._convert(item, param) for item in value]
        return self._convert(value, param)


def install(params: Sequence[Any]) -> None:
    """Give each plain parameter of a command its conversion, before typer builds one."""
    for param in params:
        if getattr(param, "_runtime_param", "absent") is not None:
            continue  # not typer's lazy slot, or already built
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or getattr(descriptor, "file_annotation", None) is not None:
            continue
        convert = _converter(descriptor.annotation, descriptor.parameter_info)
        if convert is not None:
            param._runtime_param = PlainValue(convert)
