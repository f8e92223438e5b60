"""Polar API client: typed calls, errors classified once at the HTTP edge, rate budget hook."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from worker.config import DEFAULT_POLAR_API_VERSION
from worker.platform import metrics
from worker.polar.errors import (
    CHECK_CONFIGURATION,
    AuthError,
    InvalidRequestError,
    Lane,
    NotFoundError,
    PolarError,
    PolarMisconfiguredError,
    RateLimitedError,
    TransientError,
)
from worker.polar.schemas import (
    CustomerSeat,
    Order,
    Page,
    PolarModel,
    SeatAssign,
    SeatsList,
    Subscription,
)

PAGE_LIMIT = 100
M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=PolarModel)


# --- rate budget hook ---------------------------------------------------------------------


class Budget(Protocol):
    """Shared request budget; worker/polar/budget.py is the Redis implementation."""

    async def acquire(self, lane: Lane) -> None: ...

    async def pause(self, seconds: float) -> None: ...


# --- client -------------------------------------------------------------------------------


def _polar_message(response: httpx.Response) -> tuple[str | None, str]:
    """(Polar error class, human detail) from any of Polar's error body shapes."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, response.text[:200].strip()
    if not isinstance(body, dict):
        return None, str(body)[:200]
    error = body.get("error")
    detail = body.get("detail", body.get("error_description", ""))
    if isinstance(detail, list):  # 422 validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
            for d in detail
            if isinstance(d, dict)
        )
    return (str(error) if error is not None else None), str(detail)


_SCOPE_RE = re.compile(r'scope="([^"]+)"')


def classify(response: httpx.Response, *, what: str) -> PolarError:
    """Turn a non-2xx response into exactly one PolarError subclass."""
    status = response.status_code
    error, detail = _polar_message(response)
    if status == 429:
        raw = response.headers.get("retry-after", "")
        try:
            retry_after = max(float(raw), 1.0)
        except ValueError:
            retry_after = 60.0
        return RateLimitedError(retry_after)
    if status >= 500:
        return TransientError(f"{what}: Polar answered {status}", status=status, error=error)
    if status == 401:
        return AuthError(
            f"{what}: Polar rejected the access token (401 {error or 'Unauthorized'}); "
            "check POLAR_ACCESS_TOKEN",
            status=status,
            error=error,
        )
    if status == 403:
        if error == "FeatureNotEnabled":
            message = (
                f"{what}: seat-based pricing is not enabled for this organization "
                "(403 FeatureNotEnabled)"
            )
        elif error == "insufficient_scope":
            scope_match = _SCOPE_RE.search(response.headers.get("www-authenticate", ""))
            needed = scope_match.group(1) if scope_match else _needed_scope(what)
            message = f"{what}: the access token lacks the scope {needed} (403 insufficient_scope)"
        else:
            message = f"{what}: not permitted (403 {error or ''} {detail})".strip()
        return AuthError(message, status=status, error=error)
    if status == 404 and error is None:
        return PolarMisconfiguredError(
            f"{what}: Polar answered 404 without an error code for {_request_line(response)}: "
            + CHECK_CONFIGURATION,
            status=status,
        )
    if status == 404 and error == "ResourceNotFound":
        return NotFoundError(
            f"{what}: not found (404 ResourceNotFound)", status=status, error=error
        )
    return InvalidRequestError(
        f"{what}: Polar refused the request ({status} {error or ''}: {detail})",
        status=status,
        error=error,
    )


def _request_line(response: httpx.Response) -> str:
    """`GET https://host/path (Polar-Version v)`: no query, no credentials."""
    try:
        request = response.request
    except RuntimeError:  # a response built by hand
        return "the request"
    url = request.url
    port = f":{url.port}" if url.port is not None else ""
    version = request.headers.get("polar-version", "none")
    return f"{request.method} {url.scheme}://{url.host}{port}{url.path} (Polar-Version {version})"


def _needed_scope(what: str) -> str:
    if what.startswith("list seats"):
        return "customer_seats:read"
    if what.startswith(("resend", "revoke", "assign")):
        return "customer_seats:write"
    if what.startswith("list subscriptions"):
        return "subscriptions:read"
    if what.startswith("list orders"):
        return "orders:read"
    return "an unknown scope"


class PolarClient:
    """One httpx.AsyncClient per process; every call spends from the shared budget first."""

    def __init__(
        self,
        base_url: str,
        token: SecretStr,
        *,
        timeout: float = 15.0,
        budget: Budget | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        api_version: str = DEFAULT_POLAR_API_VERSION,
    ) -> None:
        self._token = token
        self._budget = budget
        self.calls = 0
        self.api_version = api_version
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            headers={"Polar-Version": api_version, "User-Agent": "polar-seat-sync/0.1"},
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> PolarClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        lane: Lane,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        sent_at: list[datetime] | None = None,
        raw: bool = False,
    ) -> Any:
        """Spend from the budget, send, turn every answer but a 2xx into an error; the
        decoded JSON, or with `raw` the body's bytes."""
        if self._budget is not None:
            await self._budget.acquire(lane)
        if sent_at is not None:
            # After the budget wait: the moment the request leaves, which is what a
            # fetch's freshness must be measured from.
            sent_at.append(datetime.now(UTC))
        self.calls += 1
        try:
            response = await self._http.request(
                method,
                path,
                params=params,
                json=body,
                headers={"Authorization": f"Bearer {self._token.get_secret_value()}"},
            )
        except httpx.TimeoutException as exc:
            metrics.observe_polar_status("timeout")
            raise TransientError(f"{what}: Polar timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            metrics.observe_polar_status("network")
            raise TransientError(f"{what}: network error ({type(exc).__name__})") from None
        metrics.observe_polar_status(response.status_code)
        if response.status_code == 429 and self._budget is not None:
            error = classify(response, what=what)
            assert isinstance(error, RateLimitedError)
            await self._budget.pause(error.retry_after)
            raise error
        if not 200 <= response.status_code < 300:
            error = classify(response, what=what)
            if isinstance(error, PolarMisconfiguredError):
                metrics.POLAR_MISCONFIGURED.inc()
            raise error
        if raw:
            return response.content
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TransientError(f"{what}: Polar answered with a body that is not JSON") from None

    @staticmethod
    def _parse(model: type[M], data: Any, *, what: str) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _unexpected_shape(exc, what=what) from None

    async def list_seats(
        self,
        *,
        subscription_id: str | None = None,
        order_id: str | None = None,
        lane: Lane = "webhook",
        sent_at: list[datetime] | None = None,
    ) -> SeatsList:
        if (subscription_id is None) == (order_id is None):
            raise ValueError("give exactly one of subscription_id and order_id")
        params = (
            {"subscription_id": subscription_id}
            if subscription_id is not None
            else {"order_id": order_id}
        )
        what = (
            f"list seats of subscription {subscription_id}"
            if subscription_id is not None
            else f"list seats of order {order_id}"
        )
        body = await self._request(
            "GET",
            "/v1/customer-seats",
            what=what,
            lane=lane,
            params=params,
            sent_at=sent_at,
            raw=True,
        )
        # Parsed from the bytes (no intermediate dicts), whose digest the list keeps.
        try:
            return SeatsList.from_body(body)
        except ValidationError as exc:
            if any(error["type"] == "json_invalid" for error in exc.errors()):
                raise TransientError(
                    f"{what}: Polar answered with a body that is not JSON"
                ) from None
            raise _unexpected_shape(exc, what=what) from None

    async def list_scope_seats(
        self,
        kind: str,
        scope_id: str,
        *,
        lane: Lane = "webhook",
        sent_at: list[datetime] | None = None,
    ) -> SeatsList:
        """`sent_at` receives the time the request left, after any wait for the budget."""
        if kind == "subscription":
            return await self.list_seats(subscription_id=scope_id, lane=lane, sent_at=sent_at)
        if kind == "order":
            return await self.list_seats(order_id=scope_id, lane=lane, sent_at=sent_at)
        raise ValueError(f"unknown scope kind {kind!r}")

    async def resend(self, seat_id: str, *, lane: Lane = "reminder") -> CustomerSeat:
        what = f"resend invitation of seat {seat_id}"
        data = await self._request(
            "POST", f"/v1/customer-seats/{seat_id}/resend", what=what, lane=lane
        )
        return self._parse(CustomerSeat, data, what=what)

    async def revoke(self, seat_id: str, *, lane: Lane = "reminder") -> CustomerSeat:
        what = f"revoke seat {seat_id}"
        data = await self._request("DELETE", f"/v1/customer-seats/{seat_id}", what=what, lane=lane)
        return self._parse(CustomerSeat, data, what=what)

    async def assign(self, request: SeatAssign, *, lane: Lane = "reminder") -> CustomerSeat:
        what = "assign seat"
        body = request.model_dump(exclude_none=True)
        data = await self._request("POST", "/v1/customer-seats", what=what, lane=lane, body=body)
        return self._parse(CustomerSeat, data, what=what)

    async def _page(
        self,
        path: str,
        model: type[Page[P]],
        *,
        noun: str,
        page: int,
        sorting: str,
        lane: Lane,
        filters: dict[str, str] | None = None,
    ) -> Page[P]:
        what = f"list {noun} page {page}"
        data = await self._request(
            "GET",
            path,
            what=what,
            lane=lane,
            params={**(filters or {}), "page": page, "limit": PAGE_LIMIT, "sorting": sorting},
        )
        return self._parse(model, data, what=what)

    async def subscriptions_page(self, page: int, *, lane: Lane = "resync") -> Page[Subscription]:
        """One page of subscriptions, oldest first: sorted by start, pages do not shift while
        new subscriptions are created (Polar's default is newest first)."""
        return await self._page(
            "/v1/subscriptions/",
            Page[Subscription],
            noun="subscriptions",
            page=page,
            sorting="started_at",
            lane=lane,
        )

    async def orders_page(self, page: int, *, lane: Lane = "resync") -> Page[Order]:
        """One page of one-time orders, oldest first. Orders of subscriptions are left out:
        their seats belong to the subscription."""
        return await self._page(
            "/v1/orders/",
            Page[Order],
            noun="orders",
            page=page,
            sorting="created_at",
            lane=lane,
            filters={"product_billing_type": "one_time"},
        )


def _unexpected_shape(exc: ValidationError, *, what: str) -> InvalidRequestError:
    first = exc.errors()[0]
    return InvalidRequestError(
        f"{what}: unexpected response shape ({exc.error_count()} errors, first: "
        f"{first['loc']} {first['msg']})"
    )
