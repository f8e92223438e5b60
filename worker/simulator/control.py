"""The `/_sim/` control API: drive the simulated Polar from another process (demo, e2e).

No auth, loopback clients only, not rate limited and not in the request log. Errors use
the same `{"error", "detail"}` bodies as the API. The webhook secret is never echoed (a
caller may set one, and learns only its kind).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from worker.simulator.app import ApiRuntime
from worker.simulator.state import JSON, SimState, SimulatorError
from worker.simulator.webhooks import WebhookSender

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})

Action = Callable[[Request, JSON], Awaitable[Any]]


def _wrap(action: Action) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if request.client is None or request.client.host not in LOOPBACK:
            return JSONResponse({"error": "NotPermitted", "detail": "Loopback only"}, 403)
        raw = await request.body()
        try:
            body = _loads(raw) if raw else {}
            result = await action(request, body)
        except SimulatorError as error:
            return JSONResponse(error.body(), error.status_code)
        except (KeyError, TypeError, ValueError) as exc:
            return JSONResponse({"error": "BadRequest", "detail": str(exc)}, 400)
        return JSONResponse(result if result is not None else {"ok": True})

    return endpoint


def _loads(raw: bytes) -> JSON:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError("body must be a JSON object")
    return value


def control_routes(state: SimState, runtime: ApiRuntime, sender: WebhookSender) -> list[BaseRoute]:
    def param(request: Request, name: str = "id") -> str:
        return str(request.path_params[name])

    async def create_subscription(request: Request, body: JSON) -> JSON:
        return state.create_subscription(
            seats=body.get("seats", 1),
            status=body.get("status", "active"),
            customer_email=body.get("customer_email"),
            started=body.get("started", True),
            seat_based_price=body.get("seat_based_price"),
            with_order=body.get("with_order"),
        )

    async def create_order(request: Request, body: JSON) -> JSON:
        return state.create_order(
            seats=body.get("seats", 1),
            customer_email=body.get("customer_email"),
            status=body.get("status", "paid"),
        )

    async def assign(request: Request, body: JSON) -> JSON:
        return state.assign(**body)

    async def claim(request: Request, body: JSON) -> JSON:
        return state.claim(param(request))

    async def revoke(request: Request, body: JSON) -> JSON:
        return state.revoke(param(request))

    async def resend(request: Request, body: JSON) -> JSON:
        return state.resend(param(request))

    async def token(request: Request, body: JSON) -> JSON:
        seat_id = param(request)
        return {"invitation_token": state.invitation_token(seat_id)}

    async def subscription_action(request: Request, body: JSON) -> JSON:
        sub_id, action = param(request), param(request, "action")
        if action == "cancel":
            return state.cancel_subscription(sub_id, immediately=body.get("immediately", True))
        if action == "seats":
            return state.set_seat_count(
                sub_id, body["seats"], scheduled=body.get("scheduled", False)
            )
        actions: dict[str, Callable[[str], JSON]] = {
            "uncancel": state.uncancel_subscription,
            "revoke": state.revoke_subscription,
            "pause": state.pause_subscription,
            "resume": state.resume_subscription,
            "past-due": state.mark_past_due,
            "unpaid": state.mark_unpaid,
            "cycle": state.apply_pending_update,
            "order": state.create_subscription_order,
        }
        if action not in actions:
            raise SimulatorError(404, "ResourceNotFound", f"Unknown action {action}")
        return actions[action](sub_id)

    async def member_email(request: Request, body: JSON) -> JSON:
        return state.update_member_email(param(request), body["email"])

    async def customer_email(request: Request, body: JSON) -> JSON:
        return state.update_customer_email(param(request), body["email"])

    async def delete_member(request: Request, body: JSON) -> JSON:
        return state.delete_member(param(request))

    async def faults(request: Request, body: JSON) -> JSON:
        if request.method == "DELETE":
            runtime.clear_faults()
            return {"faults": 0}
        rule = runtime.add_fault(
            body["path_contains"],
            body.get("kind", "status"),
            status=body.get("status", 500),
            body=body.get("body"),
            headers=body.get("headers"),
            times=body.get("times", 1),
            probability=body.get("probability", 1.0),
            method=body.get("method"),
            hang_seconds=body.get("hang_seconds", 30.0),
        )
        return {"faults": len(runtime.faults), "path_contains": rule.path_contains}

    async def latency(request: Request, body: JSON) -> JSON:
        runtime.set_latency(float(body["seconds"]), body.get("path_contains"))
        return {"latency": runtime.latency, "path_latency": runtime.path_latency}

    async def rate_limit(request: Request, body: JSON) -> JSON:
        runtime.limiter.configure(body.get("rate_limit"), body.get("rate_window"))
        return {"rate_limit": runtime.limiter.limit, "rate_window": runtime.limiter.window}

    async def feature(request: Request, body: JSON) -> JSON:
        state.seat_feature_enabled = bool(body["seats_enabled"])
        return {"seats_enabled": state.seat_feature_enabled}

    async def clock(request: Request, body: JSON) -> JSON:
        state.advance(float(body["seconds"]))
        return {"now": state.now().isoformat()}

    async def log(request: Request, body: JSON) -> JSON:
        q = request.query_params
        status = q.get("status")
        window = q.get("window")
        return {
            "count": runtime.log.count(
                q.get("method"), q.get("path_prefix"), int(status) if status else None
            ),
            "total": len(runtime.log.entries),
            "per_window": runtime.log.requests_per_window(float(window)) if window else None,
        }

    async def webhooks_config(request: Request, body: JSON) -> JSON:
        sender.configure(url=body.get("url"), secret=body.get("secret"), kind=body.get("kind"))
        if body.get("enable"):
            sender.enable()
        return {"url": sender.url, "disabled": sender.disabled, "secret_kind": sender.secret_kind}

    async def webhooks_flush(request: Request, body: JSON) -> JSON:
        await sender.flush(float(body.get("max_wait", 30.0)))
        return webhook_summary()

    async def webhooks_status(request: Request, body: JSON) -> JSON:
        return webhook_summary()

    def webhook_summary() -> JSON:
        return {
            "attempts": len(sender.attempts),
            "delivered": sum(1 for d in sender.deliveries.values() if d.delivered),
            "failed": sum(1 for d in sender.deliveries.values() if d.failed),
            "pending_events": len(state.outbox),
            "disabled": sender.disabled,
            "secret_kind": sender.secret_kind,
            "api_version": sender.api_version,
        }

    async def summary(request: Request, body: JSON) -> JSON:
        statuses: dict[str, int] = {}
        for seat in state.seats.values():
            statuses[seat["status"]] = statuses.get(seat["status"], 0) + 1
        return {
            "subscriptions": len(state.subscriptions),
            "orders": len(state.orders),
            "members": len(state.members),
            "member_model": state.member_model_enabled,
            "seats": statuses,
            "events": len(state.events),
        }

    def route(path: str, action: Action, methods: list[str] | None = None) -> Route:
        return Route(f"/_sim{path}", _wrap(action), methods=methods or ["POST"])

    return [
        route("/state", summary, ["GET"]),
        route("/subscriptions", create_subscription),
        route("/subscriptions/{id}/{action}", subscription_action),
        route("/orders", create_order),
        route("/seats/assign", assign),
        route("/seats/{id}/claim", claim),
        route("/seats/{id}/revoke", revoke),
        route("/seats/{id}/resend", resend),
        route("/seats/{id}/token", token, ["GET"]),
        route("/members/{id}/email", member_email),
        route("/members/{id}", delete_member, ["DELETE"]),
        route("/customers/{id}/email", customer_email),
        route("/faults", faults, ["POST", "DELETE"]),
        route("/latency", latency),
        route("/rate-limit", rate_limit),
        route("/feature", feature),
        route("/clock/advance", clock),
        route("/log", log, ["GET"]),
        route("/webhooks/config", webhooks_config),
        route("/webhooks/flush", webhooks_flush),
        route("/webhooks", webhooks_status, ["GET"]),
    ]
