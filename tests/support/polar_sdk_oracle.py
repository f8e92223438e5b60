"""Polar's own SDK (`polar-sdk`, import name `polar`) as an independent oracle.

The SDK's output types are generated from Polar's API schema, one module per API version
(`polar.v2026_04`, `polar.v2026_10`, `polar.v2027_01`). A body the simulated Polar serves
or sends must load with `polar.deserialize` into the type Polar documents for it, and
carry exactly that type's keys: a missing required key fails to load, and a key the type
does not have is a difference from the real Polar too (the SDK itself would ignore it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import socket
import types
import typing
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import polar
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SDK_VERSIONS = ("2026-04", "2026-10", "2027-01")


def _module(version: str, part: str) -> ModuleType:
    if version not in SDK_VERSIONS:
        raise ValueError(f"the SDK has no module for API version {version}")
    return importlib.import_module(f"polar.v{version.replace('-', '_')}.{part}")


def sdk_type(version: str, name: str) -> Any:
    """An output type of the SDK for `version`, e.g. `sdk_type("2026-10", "CustomerSeat")`."""
    return getattr(_module(version, "outputs"), name)


def webhooks_module(version: str) -> ModuleType:
    """`polar.v…webhooks`: `validate_event`, `WebhookPayload` and the event types."""
    return _module(version, "webhooks")


def known_event_types(version: str) -> frozenset[str]:
    known: frozenset[str] = webhooks_module(version)._KNOWN_EVENT_TYPES
    return known


def load(data: Any, version: str, name: str) -> Any:
    """Load `data` into the SDK type `name`, or fail with every difference, field by field."""
    target = sdk_type(version, name)
    try:
        loaded = polar.deserialize(data, target)
    except polar.PolarDeserializationError:
        differences = shape_differences(data, target)
        raise AssertionError(
            f"does not load as {version} {name}:\n  " + "\n  ".join(differences)
        ) from None
    extra = [line for line in shape_differences(data, target) if "EXTRA" in line]
    assert not extra, f"keys {version} {name} does not have:\n  " + "\n  ".join(extra)
    return loaded


def load_webhook(body: bytes, version: str) -> Any:
    """Load a webhook envelope into the SDK's payload union, and check `data`'s keys."""
    module = webhooks_module(version)
    envelope = json.loads(body)
    loaded = polar.deserialize(envelope, module.WebhookPayload)
    data_type = typing.get_type_hints(type(loaded))["data"]
    extra = [line for line in shape_differences(envelope["data"], data_type) if "EXTRA" in line]
    assert not extra, "keys the payload type does not have:\n  " + "\n  ".join(extra)
    return loaded


def shape_differences(data: Any, target: Any, path: str = "$") -> list[str]:
    """Every key missing from or foreign to the SDK type, and every value that does not load.

    Unions are resolved to the member `data` loads as (or, failing that, the closest one).
    """
    out: list[str] = []
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in typing.get_args(target):
            return out
        members = [m for m in typing.get_args(target) if m is not type(None)]
        loading = [m for m in members if _loads(data, m)]
        candidates: list[list[str]] = [shape_differences(data, m, path) for m in loading or members]
        if not loading:
            shown = ", ".join(getattr(m, "__name__", str(m)) for m in members)
            out.append(f"{path}: loads as none of {shown}")
        fewest = sorted(candidates, key=lambda found: len(found))
        out.extend(fewest[0] if fewest else [])
        return out
    if origin is list and isinstance(data, list):
        (item_type,) = typing.get_args(target) or (Any,)
        for index, item in enumerate(data):
            out.extend(shape_differences(item, item_type, f"{path}[{index}]"))
        return out
    if isinstance(target, type) and dataclasses.is_dataclass(target):
        if not isinstance(data, dict):
            return [f"{path}: {type(data).__name__} where {target.__name__} is an object"]
        hints = typing.get_type_hints(target)
        names: set[str] = set()
        for field in dataclasses.fields(target):
            names.add(field.name)
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if field.name in data:
                out.extend(
                    shape_differences(data[field.name], hints[field.name], f"{path}.{field.name}")
                )
            else:
                kind = "required" if required else "optional"
                out.append(f"{path}.{field.name}: MISSING ({kind} in {target.__name__})")
        out.extend(
            f"{path}.{key}: EXTRA (not in {target.__name__})" for key in data if key not in names
        )
        return out
    if not _loads(data, target):
        out.append(f"{path}: {data!r:.60} does not load as {target}")
    return out


def _loads(data: Any, target: Any) -> bool:
    try:
        polar.deserialize(data, target)
    except polar.PolarDeserializationError:
        return False
    return True


@dataclasses.dataclass
class WebhookCapture:
    """A webhook endpoint on a loopback port that records every raw delivery attempt.

    `statuses` are answered first, one per attempt, then 202.
    """

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = dataclasses.field(default_factory=list)
    statuses: list[int] = dataclasses.field(default_factory=list)

    async def _handle(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        return Response(status_code=self.statuses.pop(0) if self.statuses else 202)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[WebhookCapture]:
        app = Starlette(routes=[Route("/hook", self._handle, methods=["POST"])])
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None))
        task = asyncio.create_task(server._serve(sockets=[sock]))
        try:
            for _ in range(1000):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.005)
            yield self
        finally:
            server.should_exit = True
            await task
