"""Bad input and secrets: the receiver fuzzed with hostile requests never answers 500 and
never stores a delivery without a valid signature, its memory stays bounded under huge
bodies; no secret reaches logs, errors, metrics or the database; an insecure POLAR_API_URL
is refused; the query commands open the database read-only.

The hypothesis fuzz talks to the app through `httpx.ASGITransport` (the same Starlette app
and lifespan, without a socket) for speed: it is about the app's answers, and arbitrary
header bytes reach the app unchanged that way. Everything about sizes, streaming, duplicated
headers and the server process runs over real loopback HTTP (`running(...)` or `seat-sync web`).
`FUZZ_EXAMPLES` (default 120 per backend) sets the fuzz's size.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.support.commands import SEAT_SYNC, env_for, environment, forget_own_variables, seat_sync
from tests.support.mirror import delivery_ids
from tests.support.polar_signing import polar_signature_header
from tests.support.ports import free_port
from tests.support.settings import SIM_TOKEN, WEBHOOK_SECRET, make_settings
from tests.support.waiting import until_answering
from tests.support.webhooks import receiver_client, signed_headers
from tests.support.workers import run_worker_until_idle
from worker.config import ConfigError, load_settings
from worker.intake.receiver import MAX_BODY_BYTES, running
from worker.platform import logs
from worker.platform.db import create_engine, redacted
from worker.platform.metrics import render as render_metrics
from worker.simulator.server import SimulatedPolar

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
ANSWERS = {200, 202, 400, 403, 413}  # with the database up: never 5xx


# ---------------------------------------------------------------------- the fuzz

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["customer_seat.assigned", "customer_seat.revoked", "subscription.updated", "x"]
        )
        | st.text(max_size=80),
        "data": json_values
        | st.fixed_dictionaries(
            {"id": st.uuids().map(str), "subscription_id": st.uuids().map(str) | st.text()}
        ),
    },
    optional={"timestamp": st.text(max_size=30)},
).map(lambda e: json.dumps(e, allow_nan=True).encode())
bodies = (
    envelopes
    | st.binary(max_size=300)
    | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b"", b"\xff\xfe\xfd", b'{"type": "\xc3\x28"}', b"[" * 5000, b"1" * 5000])
)
header_bytes = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]], bool]:
    """(body, headers, whether the headers carry a valid signature for this body)."""
    body = draw(bodies)
    webhook_id = draw(st.uuids().map(str) | st.text(alphabet="abc_-0123456789", max_size=300))
    now = int(time.time())
    stamp = draw(
        st.sampled_from(["now", "old", "future", "garbage", "float"]).map(
            lambda k: {
                "now": str(now),
                "old": str(now - 301),
                "future": str(now + 301),
                "garbage": "yesterday",
                "float": f"{now}.5",
            }[k]
        )
    )
    good = polar_signature_header(WEBHOOK_SECRET, "legacy", webhook_id, stamp, body)
    other_body = polar_signature_header(WEBHOOK_SECRET, "legacy", webhook_id, stamp, body + b" ")
    mode = draw(
        st.sampled_from(
            [
                "valid",
                "replayed_other_body",
                "tampered",
                "wrong_secret",
                "garbage",
                "several",
                "v2",
                "missing",
                "duplicated",
            ]
        )
    )
    signature = {
        "valid": good,
        "replayed_other_body": other_body,
        "tampered": good[:-6] + ("AAAA==" if not good.endswith("AAAA==") else "BBBB=="),
        "wrong_secret": polar_signature_header("whsec_other", "legacy", webhook_id, stamp, body),
        "garbage": draw(st.text(alphabet="v1,= +/abcXYZ0123456789", max_size=120)),
        "several": f"v1,{base64.b64encode(b'x' * 32).decode()} {good} v1,zz",
        "v2": good.replace("v1,", "v2,"),
        "missing": "",
        "duplicated": good,
    }[mode]
    headers: list[tuple[bytes, bytes]] = [
        (
            b"content-type",
            draw(st.sampled_from([b"application/json", b"text/plain", b""]) | header_bytes),
        ),
        (b"webhook-id", webhook_id.encode()),
        (b"webhook-timestamp", stamp.encode()),
    ]
    if mode != "missing":
        headers.append((b"webhook-signature", signature.encode()))
    if mode == "duplicated":
        # The receiver reads the first value: a garbage one first must not let the second in.
        headers.insert(0, (b"webhook-signature", draw(header_bytes)))
    for _ in range(draw(st.integers(0, 2))):
        headers.append(
            (
                draw(st.sampled_from([b"webhook-id", b"x-junk", b"webhook-timestamp"])),
                draw(header_bytes),
            )
        )
    drop = draw(st.sampled_from([None, b"webhook-id", b"webhook-timestamp"]))
    headers = [(k, v) for k, v in headers if k != drop]
    # What a correct receiver sees: first value of each header, latin-1, stripped.
    first: dict[bytes, str] = {}
    for k, v in headers:
        first.setdefault(k, v.decode("latin-1").strip())
    fresh = stamp == str(now)
    valid = (
        fresh
        and first.get(b"webhook-id") == webhook_id
        and first.get(b"webhook-timestamp") == stamp
        and bool(webhook_id.strip())
        and len(webhook_id) <= 255
        and any(part == good for part in first.get(b"webhook-signature", "").split())
    )
    return body, headers, valid


async def test_fuzzed_requests_never_500_and_store_only_signed_deliveries(
    database_url: str,
) -> None:
    settings = make_settings(database_url)
    signed_ids: set[str] = set()
    seen: dict[int, int] = {}

    async with receiver_client(settings, raise_app_exceptions=False) as client:
        loop = asyncio.get_running_loop()

        async def send(body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
            response = await client.post("/webhooks/polar", content=body, headers=headers)
            return response.status_code

        # hypothesis runs examples synchronously: drive them from a thread, each request
        # on the test's event loop (where the app's engine lives).
        @hyp_settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(request=requests())
        def one(request: tuple[bytes, list[tuple[bytes, bytes]], bool]) -> None:
            body, headers, valid = request
            status = asyncio.run_coroutine_threadsafe(send(body, headers), loop).result(30)
            seen[status] = seen.get(status, 0) + 1
            assert status in ANSWERS, (status, body[:80], headers)
            if status in (200, 202):
                assert valid, (body[:80], headers)
                first_id = next(v for k, v in headers if k == b"webhook-id")
                signed_ids.add(first_id.decode("latin-1").strip())

        await asyncio.to_thread(one)

    stored = await delivery_ids(database_url)
    assert len(stored) == len(set(stored))
    assert set(stored) <= signed_ids
    assert 202 in seen and 403 in seen, seen  # the fuzz reached both sides of the check


# ---------------------------------------------------------------------- hostile bodies over HTTP


@pytest.fixture
async def hook_url(database_url: str) -> AsyncIterator[str]:
    async with running(make_settings(database_url), redis_url=None) as url:
        yield url


async def test_deeply_nested_json_is_refused_not_a_crash(hook_url: str, database_url: str) -> None:
    """100 000 levels of nesting: json.loads raises RecursionError (not a ValueError); even
    correctly signed, that must be a 400, and the process must keep serving."""
    deep = b'{"type":"x","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with httpx.AsyncClient(timeout=30) as client:
        unsigned = await client.post(hook_url, content=deep, headers=signed_headers(b"other"))
        answer = await client.post(hook_url, content=deep, headers=signed_headers(deep))
        after = await client.post(
            hook_url, content=b'{"type":"x"}', headers=signed_headers(b'{"type":"x"}')
        )
    assert unsigned.status_code == 403
    assert answer.status_code == 400, answer.text[:200]
    assert after.status_code == 202
    assert len(await delivery_ids(database_url)) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"type":"x","data":{"n":' + b"9" * 5000 + b"}}", 400),  # over Python's int limit
        (b'{"type":"x","data":{"n":1e999999,"m":-1e-999999}}', 202),  # inf and zero
        (b'{"type":"x","type":"customer_seat.assigned","data":{}}', 202),  # duplicate keys
        (b'{"type":"x","data":"\xff\xfe"}', 400),  # invalid UTF-8 inside a string
        ('{"type":"x","data":"\U0001f600 \u202e"}'.encode(), 202),
        (b'{"type":"x\\u0000y","data":{}}', (202, 400)),  # NUL in a stored column
        (b'{"type":"customer_seat.assigned","data":{"subscription_id":"a\\u0000b"}}', (202, 400)),
    ],
    ids=["huge-int", "huge-float", "duplicate-keys", "bad-utf8", "unicode", "nul-type", "nul-id"],
)
async def test_odd_but_signed_payloads_get_a_definite_answer(
    hook_url: str, database_url: str, body: bytes, expected: int | tuple[int, ...]
) -> None:
    """Signed, so they pass verification: the answer is 202 or 400, never 500 and never 503
    (a 503 makes Polar retry the same bytes until it disables the endpoint)."""
    async with httpx.AsyncClient() as client:
        answer = await client.post(hook_url, content=body, headers=signed_headers(body))
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert answer.status_code in allowed, answer.text[:200]
    assert len(await delivery_ids(database_url)) == (1 if answer.status_code == 202 else 0)


async def test_replayed_tampered_and_duplicated_signatures_store_nothing(
    hook_url: str, database_url: str
) -> None:
    body = b'{"type":"customer_seat.assigned","data":{"subscription_id":"s1"}}'
    good = signed_headers(body)
    now = int(time.time())
    cases: list[tuple[bytes, list[tuple[str, str]]]] = [
        (body.replace(b"s1", b"s2"), list(good.items())),  # replay: same id+ts+sig, new body
        (  # a duplicated header: the receiver reads the first value, a wrong one
            body,
            [
                ("webhook-id", good["webhook-id"]),
                ("webhook-timestamp", good["webhook-timestamp"]),
                ("webhook-signature", "v1," + "A" * 44),
                ("webhook-signature", good["webhook-signature"]),
            ],
        ),
        (body, [(k, v) for k, v in signed_headers(body, timestamp=now - 3600).items()]),
        (body, [(k, v) for k, v in signed_headers(body, timestamp=now + 3600).items()]),
        (
            body,
            [
                *[(k, v) for k, v in good.items() if k != "webhook-signature"],
                ("webhook-signature", good["webhook-signature"].replace("v1,", "v2,")),
            ],
        ),
    ]
    async with httpx.AsyncClient() as client:
        answers = [
            (await client.post(hook_url, content=b, headers=h)).status_code for b, h in cases
        ]
        several = {**good, "webhook-signature": "v1,bm9wZQ== " + good["webhook-signature"]}
        accepted = await client.post(hook_url, content=body, headers=several)
        replayed = await client.post(hook_url, content=body, headers=good)
    assert answers == [403] * len(cases)
    assert (accepted.status_code, replayed.status_code) == (202, 200)
    assert await delivery_ids(database_url) == [good["webhook-id"]]


# ---------------------------------------------------------------------- memory


async def test_memory_stays_bounded_under_many_huge_bodies(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A real `seat-sync web` process takes 60 declared-oversized, 60 streamed 4 MiB (no
    Content-Length) and 40 maximal 1 MiB bodies, eight at a time: its resident memory grows
    by no more than the bodies in flight at once plus slack, not with the number sent."""
    port = free_port()
    env = environment(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        POLAR_ACCESS_TOKEN=SIM_TOKEN,
        POLAR_API_URL="http://127.0.0.1:9",
        POLAR_WEBHOOK_SECRET=WEBHOOK_SECRET,
        LOG_FORMAT="json",
    )
    with (tmp_path / "web.log").open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            SEAT_SYNC, "web", "--port", str(port), env=env, stdout=log_file, stderr=log_file
        )
        try:
            url = f"http://127.0.0.1:{port}/webhooks/polar"
            await until_answering(
                f"http://127.0.0.1:{port}/healthz",
                within=10,
                what=lambda: "web up:\n" + (tmp_path / "web.log").read_text(errors="replace"),
            )
            async with httpx.AsyncClient(timeout=30) as client:
                mebibyte = b"x" * MAX_BODY_BYTES
                oversized = mebibyte + b"x"

                async def streamed() -> AsyncIterator[bytes]:
                    for _ in range(64):
                        yield b"y" * 65536

                # Streamed and maximal bodies carry Polar's headers (signed for another
                # body): the receiver refuses a request without them before reading it.
                async def send(kind: str) -> int:
                    if kind == "declared":
                        response = await client.post(url, content=oversized)
                    elif kind == "streamed":
                        response = await client.post(
                            url, content=streamed(), headers=signed_headers(b"-")
                        )
                    else:
                        response = await client.post(
                            url, content=mebibyte, headers=signed_headers(b"-")
                        )
                    return response.status_code

                async def wave(kinds: list[str]) -> list[int]:
                    gate = asyncio.Semaphore(8)

                    async def one(kind: str) -> int:
                        async with gate:
                            with contextlib.suppress(httpx.TransportError):
                                return await send(kind)
                            return 413  # the server may close an oversized upload early

                    return await asyncio.gather(*(one(k) for k in kinds))

                await wave(["maximal"] * 8 + ["streamed"] * 8)  # warm up allocator and pool
                rss = psutil.Process(proc.pid)
                before = rss.memory_info().rss
                codes = await wave(["declared"] * 60 + ["streamed"] * 60 + ["maximal"] * 40)
                grown = rss.memory_info().rss - before
                healthy = (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
    assert set(codes) <= {403, 413} and 500 not in codes
    assert codes.count(403) == 40
    assert healthy == 200
    assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert await delivery_ids(database_url) == []


# ---------------------------------------------------------------------- secrets on error paths

DB_PASSWORD = "pw-" + "q7Zx" * 6


def with_password(database_url: str) -> str:
    url = make_url(database_url)
    return url.set(password=DB_PASSWORD).render_as_string(hide_password=False)


def test_redacted_masks_the_password() -> None:
    shown = redacted(f"postgresql://seat:{DB_PASSWORD}@db.internal:5432/mirror")
    assert DB_PASSWORD not in shown and "***" in shown and "db.internal" in shown


async def test_no_secret_on_error_paths(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    """Error paths print more than happy ones: a rejected token (401), an unreachable
    database (503, CLI error), the migration command naming the database, bad signatures.
    Grep everything they produced (logs, answers, metrics, CLI output, tables)."""
    wrong_token = "polar_oat_" + "w" * 40
    captured = io.StringIO()
    logs.configure(log_format="json", level="DEBUG", stream=captured)
    outputs: list[str] = []
    try:
        sub = sim.state.create_subscription(seats=2)
        sim.state.assign(subscription_id=sub["id"], email="e@example.com")
        bad_token = make_settings(database_url, sim, polar_access_token=wrong_token)
        async with running(bad_token, redis_url=redis_url) as hook_url:
            body = json.dumps(
                {"type": "customer_seat.assigned", "data": {"subscription_id": sub["id"]}}
            ).encode()
            async with httpx.AsyncClient() as client:
                for headers in (
                    signed_headers(body),
                    {**signed_headers(body), "webhook-signature": "v1,x"},
                ):
                    outputs.append(
                        (await client.post(hook_url, content=body, headers=headers)).text
                    )
                await run_worker_until_idle(bad_token, redis_url)
                # What a METRICS_PORT scrape would serve: this process's registry, after
                # the receiver and worker above counted into it.
                outputs.append(render_metrics()[0].decode())
        unreachable = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{free_port()}/gone"
        async with (
            running(make_settings(unreachable), redis_url=None) as down_url,
            httpx.AsyncClient() as client,
        ):
            answer = await client.post(down_url, content=body, headers=signed_headers(body))
            assert answer.status_code == 503
            outputs.append(answer.text)
            outputs.append((await client.get(down_url.replace("/webhooks/polar", "/readyz"))).text)
    finally:
        logs.configure(log_format="json")
    env = env_for(database_url, sim, redis_url, POLAR_ACCESS_TOKEN=wrong_token)
    ran = [
        await seat_sync("resync", "--subscription", sub["id"], env=env),
        await seat_sync("seats", env={**env, "DATABASE_URL": unreachable}),
    ]
    if database_url.startswith("postgresql"):
        ran.append(
            await seat_sync(
                "db", "upgrade", env={**env, "DATABASE_URL": with_password(database_url)}
            )
        )
        assert ran[-1].code == 0 and "***" in ran[-1].out, ran[-1]
    assert ran[0].code != 0 and "POLAR_ACCESS_TOKEN" in ran[0].err  # the 401 was reached
    assert ran[1].code != 0
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            tables = [
                repr((await conn.execute(text(f"SELECT * FROM {table}"))).all())
                for table in ("seat_scope", "sync_run", "webhook_delivery")
            ]
    finally:
        await engine.dispose()
    assert "sync_auth_failed" in captured.getvalue()
    everything = "\n".join([captured.getvalue(), *outputs, *tables, *(r.out + r.err for r in ran)])
    for secret in (wrong_token, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), DB_PASSWORD):
        assert secret not in everything, secret


# ---------------------------------------------------------------------- POLAR_API_URL


@pytest.mark.parametrize(
    ("url", "insecure_ok", "accepted"),
    [
        ("https://api.polar.sh", False, True),
        ("http://api.polar.sh", False, False),
        ("http://127.0.0.1:8900", False, True),
        ("http://localhost:8900", False, True),
        ("http://[::1]:8900", False, True),
        ("http://127.0.0.1.nip.io", False, False),
        ("http://localhost.evil.example", False, False),
        ("http://user@127.0.0.1@evil.example", False, False),
        ("http://10.0.0.5", False, False),
        ("http://api.polar.sh", True, True),
        ("ftp://api.polar.sh", True, False),
    ],
)
def test_polar_api_url_must_be_https_unless_loopback_or_opted_in(
    monkeypatch: pytest.MonkeyPatch, url: str, insecure_ok: bool, accepted: bool
) -> None:
    """Through the environment, as every process reads it."""
    forget_own_variables(monkeypatch)
    monkeypatch.setenv("POLAR_API_URL", url)
    if insecure_ok:
        monkeypatch.setenv("POLAR_ALLOW_INSECURE_URL", "true")
    if accepted:
        assert load_settings().polar_api_url == url
    else:
        with pytest.raises(ConfigError, match="POLAR_API_URL"):
            load_settings()


async def test_an_insecure_polar_api_url_stops_the_command_naming_the_variable(
    database_url: str, redis_url: str, sim: SimulatedPolar
) -> None:
    env = env_for(database_url, sim, redis_url, POLAR_API_URL="http://api.polar.example")
    refused = await seat_sync("resync", "--subscription", "s", env=env)
    assert refused.code == 2 and "POLAR_API_URL" in refused.err
    opted_in = await seat_sync("seats", env={**env, "POLAR_ALLOW_INSECURE_URL": "true"})
    assert opted_in.code == 0, opted_in.err


# ---------------------------------------------------------------------- read-only queries


async def test_a_read_only_engine_cannot_write(database_url: str) -> None:
    """The INSERT is valid (a writable engine runs it): only read-only mode refuses it."""
    probe = text("INSERT INTO alembic_version (version_num) VALUES ('probe')")
    engine = create_engine(database_url, read_only=True)
    try:
        with pytest.raises(Exception, match=r"(?i)read-only|readonly"):
            async with engine.begin() as conn:
                await conn.execute(probe)
    finally:
        await engine.dispose()
    writable = create_engine(database_url)
    try:
        async with writable.connect() as conn:
            count = text("SELECT count(*) FROM alembic_version")
            assert (await conn.execute(count)).scalar() == 1
    finally:
        await writable.dispose()
