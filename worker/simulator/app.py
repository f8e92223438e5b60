"""The simulated Polar HTTP API (Starlette): real paths, status codes, bodies and edges.

Every `/v1` request passes, in order: request log, per-organization fixed-window rate
limit, `Polar-Version` check, injected faults, injected latency, then the route (auth,
scopes, validation, the seat feature flag, and `SimState`). Bodies are served in the shapes
of the request's `Polar-Version` (without one, the simulator's configured version).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.simulator.state import (
    JSON,
    LIST_LIMIT_DEFAULT,
    SimState,
    SimulatorError,
    SimulatorValidationError,
)
from worker.simulator.versions import API_VERSIONS, DEFAULT_API_VERSION, check_api_version, render

API_VERSION = DEFAULT_API_VERSION
DEFAULT_TOKEN = "polar_oat_simulated"
ALL_SCOPES = frozenset(
    {
        "customer_seats:read",
        "customer_seats:write",
        "subscriptions:read",
        "subscriptions:write",
        "orders:read",
        "members:read",
        "members:write",
    }
)
INVALID_TOKEN_DESCRIPTION = (
    "The access token provided is expired, revoked, malformed, or invalid for other reasons."
)
INSUFFICIENT_SCOPE_DESCRIPTION = (
    "The request requires higher privileges than provided by the access token."
)

FaultKind = Literal["status", "hang", "drop"]


# ---------------------------------------------------------------------- runtime knobs


@dataclass(frozen=True)
class LoggedRequest:
    at: float
    method: str
    path: str
    query: dict[str, str]
    status: int  # 0 when the connection was dropped
    token: str | None


class RequestLog:
    """Every `/v1` request, for counting calls per container and requests per window."""

    def __init__(self) -> None:
        self.entries: list[LoggedRequest] = []

    def record(self, entry: LoggedRequest) -> None:
        self.entries.append(entry)

    def clear(self) -> None:
        self.entries.clear()

    def select(
        self,
        method: str | None = None,
        path_prefix: str | None = None,
        status: int | None = None,
        query: dict[str, str] | None = None,
    ) -> list[LoggedRequest]:
        return [
            e
            for e in self.entries
            if (method is None or e.method == method.upper())
            and (path_prefix is None or e.path.startswith(path_prefix))
            and (status is None or e.status == status)
            and (query is None or all(e.query.get(k) == v for k, v in query.items()))
        ]

    def count(
        self,
        method: str | None = None,
        path_prefix: str | None = None,
        status: int | None = None,
        query: dict[str, str] | None = None,
    ) -> int:
        return len(self.select(method, path_prefix, status, query))

    def requests_per_window(self, window_s: float) -> list[int]:
        """Counts in consecutive fixed windows starting at the first request."""
        if not self.entries:
            return []
        start = self.entries[0].at
        counts: list[int] = []
        for entry in self.entries:
            index = int((entry.at - start) // window_s)
            while len(counts) <= index:
                counts.append(0)
            counts[index] += 1
        return counts

    def max_in_any_window(self, window_s: float) -> int:
        """The most requests in any sliding window of `window_s` seconds."""
        times = sorted(e.at for e in self.entries)
        best = 0
        low = 0
        for high, at in enumerate(times):
            while at - times[low] >= window_s:
                low += 1
            best = max(best, high - low + 1)
        return best


class RateLimiter:
    """Polar's limiter: one fixed window per organization, started by its first request."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._window_start: float | None = None
        self._count = 0

    def configure(self, limit: int | None = None, window: float | None = None) -> None:
        if limit is not None:
            self.limit = limit
        if window is not None:
            self.window = window
        self.reset()

    def reset(self) -> None:
        self._window_start = None
        self._count = 0

    def hit(self) -> bool:
        now = self.clock()
        if self._window_start is None or now - self._window_start >= self.window:
            self._window_start = now
            self._count = 0
        self._count += 1
        return self._count <= self.limit

    @property
    def retry_after(self) -> int:
        return max(1, round(self.window))


@dataclass
class FaultRule:
    """Fail matching `/v1` requests: an HTTP status, a hang, or a dropped connection."""

    path_contains: str
    kind: FaultKind = "status"
    status: int = 500
    body: str | JSON | None = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = 1  # None: every matching request
    probability: float = 1.0
    method: str | None = None
    hang_seconds: float = 30.0
    fired: int = 0

    def matches(self, method: str, path_and_query: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_contains in path_and_query


@dataclass
class ListHold:
    """Holds seat-list responses so a test can change state while a fetch is in flight.

    `snapshot="before"` computes the response before the hold (the client gets stale
    data, the point of an in-flight test); `"after"` computes it when the hold ends.
    """

    seconds: float
    snapshot: Literal["before", "after"] = "before"
    times: int | None = None
    container_id: str | None = None
    held: int = 0
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def applies(self, query: dict[str, str]) -> bool:
        if self.released.is_set() or (self.times is not None and self.held >= self.times):
            return False
        return self.container_id is None or self.container_id in query.values()

    def release(self) -> None:
        self.released.set()

    async def wait_entered(self, max_wait: float = 5.0) -> None:
        """Wait until a held list request took its snapshot and is being held."""
        await asyncio.wait_for(self.entered.wait(), max_wait)


class ApiRuntime:
    """Tokens, rate limit, faults, latency and the request log of one simulator."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        rate_limit: int = 500,
        rate_window: float = 60.0,
        latency: float = 0.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        api_version: str = DEFAULT_API_VERSION,
    ) -> None:
        self.tokens: dict[str, frozenset[str]] = {token: ALL_SCOPES}
        # Served to a request that sends no `Polar-Version` (Polar serves its default).
        self.api_version = check_api_version(api_version)
        self.clock = clock
        self.limiter = RateLimiter(rate_limit, rate_window, clock)
        self.log = RequestLog()
        self.faults: list[FaultRule] = []
        self.latency = latency
        self.path_latency: dict[str, float] = {}
        self.hold: ListHold | None = None
        self.rng = random.Random(seed)
        self.closing = asyncio.Event()

    def add_token(self, token: str, scopes: set[str] | frozenset[str] | None = None) -> None:
        self.tokens[token] = frozenset(ALL_SCOPES if scopes is None else scopes)

    def add_fault(
        self,
        path_contains: str,
        kind: FaultKind = "status",
        *,
        status: int = 500,
        body: str | JSON | None = None,
        headers: dict[str, str] | None = None,
        times: int | None = 1,
        probability: float = 1.0,
        method: str | None = None,
        hang_seconds: float = 30.0,
    ) -> FaultRule:
        rule = FaultRule(
            path_contains,
            kind,
            status,
            body,
            dict(headers or {}),
            times,
            probability,
            method,
            hang_seconds,
        )
        self.faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_latency(self, seconds: float, path_contains: str | None = None) -> None:
        """Fixed delay for every `/v1` request, or extra delay for matching paths."""
        if path_contains is None:
            self.latency = seconds
        elif seconds > 0:
            self.path_latency[path_contains] = seconds
        else:
            self.path_latency.pop(path_contains, None)

    def hold_list_seats(
        self,
        seconds: float,
        snapshot: Literal["before", "after"] = "before",
        *,
        times: int | None = None,
        container_id: str | None = None,
    ) -> ListHold:
        self.hold = ListHold(seconds, snapshot, times, container_id)
        return self.hold

    def release_hold(self) -> None:
        if self.hold is not None:
            self.hold.release()
            self.hold = None

    async def sleep(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Sleep that ends early when the simulator stops (or `until` is set)."""
        if seconds <= 0:
            return
        waiters = [asyncio.ensure_future(self.closing.wait())]
        if until is not None:
            waiters.append(asyncio.ensure_future(until.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def pick_fault(self, method: str, path_and_query: str) -> FaultRule | None:
        for rule in self.faults:
            if rule.matches(method, path_and_query) and self.rng.random() < rule.probability:
                rule.fired += 1
                return rule
        return None


# ---------------------------------------------------------------------- /v1 pipeline


def _default_fault_body(status: int) -> str:
    if status == 500:
        return "Internal Server Error"
    return f"error code: {status}"


class _V1Gate:
    """ASGI wrapper doing what happens before Polar's routes see a `/v1` request."""

    def __init__(self, app: ASGIApp, runtime: ApiRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith("/v1"):
            await self.app(scope, receive, send)
            return
        runtime = self.runtime
        request = Request(scope)
        status_holder = [0]

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = int(message["status"])
            await send(message)

        try:
            await self._handle(scope, receive, logged_send, request)
        finally:
            auth = request.headers.get("authorization", "")
            runtime.log.record(
                LoggedRequest(
                    at=runtime.clock(),
                    method=request.method,
                    path=request.url.path,
                    query=dict(request.query_params),
                    status=0 if scope.get("sim.dropped") else status_holder[0],
                    token=auth.removeprefix("Bearer ").strip() or None,
                )
            )

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request: Request) -> None:
        runtime = self.runtime
        if not runtime.limiter.hit():
            await Response(b"", 429, headers={"retry-after": str(runtime.limiter.retry_after)})(
                scope, receive, send
            )
            return
        version = request.headers.get("polar-version")
        if version is not None and version not in API_VERSIONS:
            # What Polar answers for a version it does not serve: no `error` key.
            await JSONResponse({"detail": "Not Found"}, 404)(scope, receive, send)
            return
        target = request.url.path + ("?" + request.url.query if request.url.query else "")
        fault = runtime.pick_fault(request.method, target)
        if fault is not None:
            if fault.kind == "drop":
                # Headers promise a body that never comes; the server then closes the socket.
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"64"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"seats":', "more_body": True})
                scope["sim.dropped"] = True
                return  # uvicorn closes the connection on an unfinished response
            if fault.kind == "hang":
                await runtime.sleep(fault.hang_seconds)
            body = fault.body if fault.body is not None else _default_fault_body(fault.status)
            response: Response
            if isinstance(body, dict):
                response = JSONResponse(body, fault.status, headers=fault.headers)
            else:
                response = Response(
                    body, fault.status, headers=fault.headers, media_type="text/plain"
                )
            await response(scope, receive, send)
            return
        delay = runtime.latency + sum(
            seconds for part, seconds in runtime.path_latency.items() if part in target
        )
        await runtime.sleep(delay)
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- validation


def _validation_errors(exc: ValidationError, prefix: str) -> list[JSON]:
    errors: list[JSON] = []
    for error in exc.errors(include_url=False):
        item: JSON = {
            "type": error["type"],
            "loc": [prefix, *error["loc"]],
            "msg": error["msg"],
            "input": error["input"],
        }
        if "ctx" in error:
            item["ctx"] = {
                k: v if isinstance(v, int | float | str) else str(v)
                for k, v in error["ctx"].items()
            }
        errors.append(item)
    return errors


class SeatAssignBody(BaseModel):
    """`SeatAssign` as Polar validates it before the service sees it."""

    model_config = ConfigDict(extra="ignore")

    subscription_id: uuid.UUID | None = None
    checkout_id: uuid.UUID | None = None
    order_id: uuid.UUID | None = None
    email: str | None = None
    external_customer_id: str | None = None
    customer_id: uuid.UUID | None = None
    external_member_id: str | None = None
    member_id: uuid.UUID | None = None
    metadata: dict[str, Any] | None = None
    immediate_claim: bool = False

    @model_validator(mode="after")
    def _check(self) -> SeatAssignBody:
        sources = [self.subscription_id, self.checkout_id, self.order_id]
        if sum(1 for source in sources if source is not None) != 1:
            raise ValueError(
                "Exactly one of subscription_id, checkout_id, or order_id must be provided"
            )
        if self.email is not None:
            local, _, domain = self.email.partition("@")
            if not local or "." not in domain:
                raise ValueError(f"value is not a valid email address: {self.email}")
        if self.metadata is not None:
            if len(self.metadata) > 10:
                raise ValueError("Metadata cannot have more than 10 keys")
            if len(json.dumps(self.metadata)) > 1024:
                raise ValueError("Metadata size cannot exceed 1KB")
        return self


class SeatListQuery(BaseModel):
    subscription_id: uuid.UUID | None = None
    order_id: uuid.UUID | None = None


class PageQuery(BaseModel):
    page: int = Field(1, gt=0)
    limit: int = Field(LIST_LIMIT_DEFAULT, gt=0)


class ClaimBody(BaseModel):
    invitation_token: str


def _parse_id(value: str, name: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise SimulatorValidationError(
            [
                {
                    "type": "uuid_parsing",
                    "loc": ["path", name],
                    "msg": "Input should be a valid UUID, invalid character: expected an "
                    "optional prefix of `urn:uuid:` followed by [0-9a-fA-F-], found "
                    f"`{value[:1]}` at 1",
                    "input": value,
                    "ctx": {"error": "invalid character"},
                }
            ]
        ) from None


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimulatorValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", getattr(exc, "pos", 0)],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": str(exc)},
                }
            ]
        ) from None


# ---------------------------------------------------------------------- auth


class _RejectedError(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _authorize(runtime: ApiRuntime, request: Request, accepted: frozenset[str]) -> None:
    """Polar's auth: missing token, unknown token, or none of the accepted scopes."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _RejectedError(JSONResponse({"error": "Unauthorized", "detail": "Unauthorized"}, 401))
    scopes = runtime.tokens.get(token.strip())
    if scopes is None:
        raise _RejectedError(
            JSONResponse(
                {"error": "invalid_token", "error_description": INVALID_TOKEN_DESCRIPTION},
                401,
                headers={
                    "www-authenticate": 'Bearer realm="polar", error="invalid_token", '
                    f'error_description="{INVALID_TOKEN_DESCRIPTION}"'
                },
            )
        )
    if not scopes & accepted:
        wanted = " ".join(sorted(accepted))
        raise _RejectedError(
            JSONResponse(
                {
                    "error": "insufficient_scope",
                    "error_description": INSUFFICIENT_SCOPE_DESCRIPTION,
                },
                403,
                headers={
                    "www-authenticate": 'Bearer realm="polar", error="insufficient_scope", '
                    f'error_description="{INSUFFICIENT_SCOPE_DESCRIPTION}", scope="{wanted}"'
                },
            )
        )


Handler = Callable[[Request], Awaitable[Any]]


def _endpoint(
    runtime: ApiRuntime, scopes: frozenset[str] | None, handler: Handler
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            if scopes is not None:
                _authorize(runtime, request, scopes)
            result = await handler(request)
        except _RejectedError as rejected:
            return rejected.response
        except SimulatorError as error:
            return JSONResponse(error.body(), error.status_code)
        if isinstance(result, Response):
            return result
        version = request.headers.get("polar-version") or runtime.api_version
        return JSONResponse(render(result, version), 200)

    return endpoint


# ---------------------------------------------------------------------- routes


def v1_routes(state: SimState, runtime: ApiRuntime) -> list[BaseRoute]:
    seats_read = frozenset({"customer_seats:read"})
    seats_write = frozenset({"customer_seats:write"})
    subs_read = frozenset({"subscriptions:read", "subscriptions:write"})
    orders_read = frozenset({"orders:read"})

    async def list_seats(request: Request) -> JSON:
        try:
            query = SeatListQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise SimulatorValidationError(_validation_errors(exc, "query")) from None
        state_query = {
            "subscription_id": str(query.subscription_id) if query.subscription_id else None,
            "order_id": str(query.order_id) if query.order_id else None,
        }
        if query.subscription_id is not None:
            state_query["order_id"] = None
        hold = runtime.hold
        if hold is None or not hold.applies(dict(request.query_params)):
            return state.list_seats(**state_query)
        hold.held += 1
        result: JSON | None = None
        if hold.snapshot == "before":
            result = state.list_seats(**state_query)
        hold.entered.set()
        await runtime.sleep(hold.seconds, until=hold.released)
        return result if result is not None else state.list_seats(**state_query)

    async def assign(request: Request) -> JSON:
        try:
            body = SeatAssignBody.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise SimulatorValidationError(_validation_errors(exc, "body")) from None
        if body.checkout_id is not None:
            raise SimulatorError(404, "ResourceNotFound", "Checkout not found")

        def text(value: uuid.UUID | None) -> str | None:
            return str(value) if value is not None else None

        return state.assign(
            subscription_id=text(body.subscription_id),
            order_id=text(body.order_id),
            email=body.email,
            member_id=text(body.member_id),
            external_member_id=body.external_member_id,
            customer_id=text(body.customer_id),
            external_customer_id=body.external_customer_id,
            metadata=body.metadata,
            immediate_claim=body.immediate_claim,
        )

    async def revoke(request: Request) -> JSON:
        return state.revoke(_parse_id(request.path_params["seat_id"], "seat_id"))

    async def resend(request: Request) -> JSON:
        return state.resend(_parse_id(request.path_params["seat_id"], "seat_id"))

    async def claim_info(request: Request) -> JSON:
        return state.claim_info(request.path_params["token"])

    async def claim(request: Request) -> JSON:
        try:
            body = ClaimBody.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise SimulatorValidationError(_validation_errors(exc, "body")) from None
        seat = state.claim_by_token(body.invitation_token)
        return {"seat": seat, "customer_session_token": "polar_cst_" + uuid.uuid4().hex}

    def page_args(request: Request) -> tuple[int, int, list[str] | None]:
        try:
            query = PageQuery.model_validate(
                {k: v for k, v in request.query_params.items() if k in {"page", "limit"}}
            )
        except ValidationError as exc:
            raise SimulatorValidationError(_validation_errors(exc, "query")) from None
        return query.page, query.limit, request.query_params.getlist("sorting") or None

    async def list_subscriptions(request: Request) -> JSON:
        page, limit, sorting = page_args(request)
        return state.list_subscriptions(page=page, limit=limit, sorting=sorting)

    async def get_subscription(request: Request) -> JSON:
        return state.get_subscription(_parse_id(request.path_params["id"], "id"))

    async def list_orders(request: Request) -> JSON:
        page, limit, sorting = page_args(request)
        return state.list_orders(
            page=page,
            limit=limit,
            sorting=sorting,
            product_billing_type=request.query_params.getlist("product_billing_type") or None,
        )

    async def get_order(request: Request) -> JSON:
        return state.get_order(_parse_id(request.path_params["id"], "id"))

    def route(path: str, method: str, scopes: frozenset[str] | None, handler: Handler) -> Route:
        return Route(path, _endpoint(runtime, scopes, handler), methods=[method])

    return [
        route("/v1/customer-seats", "GET", seats_read, list_seats),
        route("/v1/customer-seats", "POST", seats_write, assign),
        route("/v1/customer-seats/claim/{token}", "GET", None, claim_info),
        route("/v1/customer-seats/claim", "POST", None, claim),
        route("/v1/customer-seats/{seat_id}", "DELETE", seats_write, revoke),
        route("/v1/customer-seats/{seat_id}/resend", "POST", seats_write, resend),
        route("/v1/subscriptions/", "GET", subs_read, list_subscriptions),
        route("/v1/subscriptions/{id}", "GET", subs_read, get_subscription),
        route("/v1/orders/", "GET", orders_read, list_orders),
        route("/v1/orders/{id}", "GET", orders_read, get_order),
    ]


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "Not Found"}, 404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "Method Not Allowed"}, 405)


def build_app(
    state: SimState, runtime: ApiRuntime, extra_routes: list[BaseRoute] | None = None
) -> ASGIApp:
    """The ASGI app: `/v1` API behind the gate, plus any control routes."""
    app = Starlette(
        routes=[*v1_routes(state, runtime), *(extra_routes or [])],
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )
    return _V1Gate(app, runtime)


__all__ = [
    "ALL_SCOPES",
    "API_VERSION",
    "DEFAULT_TOKEN",
    "ApiRuntime",
    "FaultRule",
    "ListHold",
    "LoggedRequest",
    "RateLimiter",
    "RequestLog",
    "build_app",
]
