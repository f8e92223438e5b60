"""Polar API client: typed calls, errors classified once at the HTTP edge, rate budget hook."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from worker.config import DEFAULT_POLAR_API_VERSION
from worker.platform import metrics

PAGE_LIMIT = 100
# What every misconfiguration message ends with; `seat-sync status` looks for it.
CHECK_CONFIGURATION = "check POLAR_API_URL and POLAR_API_VERSION"

Lane = Literal["webhook", "reminder", "resync", "interactive"]
M = TypeVar("M", bound=BaseModel)


# --- errors -------------------------------------------------------------------------------


class PolarError(Exception):
    """Base of every classified Polar failure. Messages never contain the token."""

    retryable = False

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error


class RateLimitedError(PolarError):
    """429: the organisation's budget is spent; wait `retry_after` seconds."""

    retryable = True

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"Polar rate limit reached; retry after {retry_after:g}s", status=429)
        self.retry_after = retry_after


class TransientError(PolarError):
    """5xx, network failure or timeout: worth retrying with backoff."""

    retryable = True


class NotFoundError(PolarError):
    """404 `ResourceNotFound`: Polar says the subscription, order or seat does not exist
    (or is not ours). The only answer that means "gone"."""


class PolarMisconfiguredError(PolarError):
    """404 without an error code: Polar's router found no such route, which is what a wrong
    POLAR_API_URL or an unknown or retired POLAR_API_VERSION gets. It says nothing about the
    subscription or order asked for, and lasts until the configuration is fixed."""


class AuthError(PolarError):
    """401/403: bad token, missing scope, or seat-based pricing not enabled."""


class InvalidRequestError(PolarError):
    """400/422: Polar refused the request; `error` holds Polar's error class name."""


# --- typed responses (Polar API 2026-04 and 2026-10: the same shapes) ---------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Member(_Model):
    id: str
    created_at: datetime
    modified_at: datetime | None = None
    customer_id: str
    email: str
    name: str | None = None
    external_id: str | None = None
    role: str


class CustomerSeat(_Model):
    """Polar sends every key; nullable ones default to None so that a stand-in that omits
    them still parses."""

    id: str
    created_at: datetime
    modified_at: datetime | None = None
    subscription_id: str | None = None
    order_id: str | None = None
    status: Literal["pending", "claimed", "revoked"]
    customer_id: str | None = None
    member_id: str | None = None
    member: Member | None = None
    email: str | None = None
    customer_email: str | None = None
    invitation_token_expires_at: datetime | None = None
    claimed_at: datetime | None = None
    revoked_at: datetime | None = None
    seat_metadata: dict[str, Any] | None = None


class SeatsList(_Model):
    seats: list[CustomerSeat]
    available_seats: int
    total_seats: int


class _Price(_Model):
    amount_type: str | None = None


class _PendingUpdate(_Model):
    seats: int | None = None


class Subscription(_Model):
    id: str
    status: str | None = None
    seats: int | None = None
    started_at: datetime | None = None
    prices: list[_Price] = []
    pending_update: _PendingUpdate | None = None

    @property
    def is_seat_based(self) -> bool:
        return self.seats is not None or any(p.amount_type == "seat_based" for p in self.prices)


class Order(_Model):
    id: str
    created_at: datetime | None = None
    seats: int | None = None
    subscription_id: str | None = None
    billing_reason: str | None = None

    @property
    def is_seat_based(self) -> bool:
        """A one-time order with a number of seats. An order of a subscription (its creation,
        a renewal, a seat change) repeats the subscription's seats, which Polar lists under
        the subscription, not under the order."""
        return self.seats is not None and self.subscription_id is None


class _Pagination(_Model):
    total_count: int
    max_page: int


P = TypeVar("P", bound=_Model)


class _Page(_Model, Generic[P]):
    items: list[P]
    pagination: _Pagination


class SeatAssign(BaseModel):
    """Body of POST /v1/customer-seats: one container, one recipient."""

    model_config = ConfigDict(extra="forbid")

    subscription_id: str | None = None
    order_id: str | None = None
    email: str | None = None
    member_id: str | None = None
    external_member_id: str | None = None
    customer_id: str | None = None
    external_customer_id: str | None = None
    metadata: dict[str, Any] | None = None
    immediate_claim: bool = False


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
    ) -> Any:
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
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TransientError(f"{what}: Polar answered with a body that is not JSON") from None

    @staticmethod
    def _parse(model: type[M], data: Any, *, what: str) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequestError(
                f"{what}: unexpected response shape ({exc.error_count()} errors, first: "
                f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']})"
            ) from None

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
        data = await self._request(
            "GET", "/v1/customer-seats", what=what, lane=lane, params=params, sent_at=sent_at
        )
        return self._parse(SeatsList, data, what=what)

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

    async def _pages(
        self,
        path: str,
        sorting: str,
        model: type[_Page[P]],
        noun: str,
        start_page: int,
        lane: Lane,
        filters: dict[str, str] | None = None,
    ) -> AsyncIterator[tuple[int, int, list[P]]]:
        page = start_page
        while True:
            what = f"list {noun} page {page}"
            data = await self._request(
                "GET",
                path,
                what=what,
                lane=lane,
                params={**(filters or {}), "page": page, "limit": PAGE_LIMIT, "sorting": sorting},
            )
            parsed = self._parse(model, data, what=what)
            yield page, parsed.pagination.max_page, parsed.items
            if page >= parsed.pagination.max_page or not parsed.items:
                return
            page += 1

    def iter_subscriptions(
        self, *, start_page: int = 1, lane: Lane = "resync"
    ) -> AsyncIterator[tuple[int, int, list[Subscription]]]:
        """Yield (page, max_page, items) oldest first: sorted by start, pages do not shift
        while new subscriptions are created (Polar's default is newest first)."""
        return self._pages(
            "/v1/subscriptions/",
            "started_at",
            _Page[Subscription],
            "subscriptions",
            start_page,
            lane,
        )

    def iter_orders(
        self, *, start_page: int = 1, lane: Lane = "resync"
    ) -> AsyncIterator[tuple[int, int, list[Order]]]:
        """Yield (page, max_page, items) of one-time orders, oldest first. Orders of
        subscriptions are left out: their seats belong to the subscription."""
        return self._pages(
            "/v1/orders/",
            "created_at",
            _Page[Order],
            "orders",
            start_page,
            lane,
            filters={"product_billing_type": "one_time"},
        )
