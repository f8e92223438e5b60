"""Outages on demand for tests: a TCP proxy that can stall (a hung dependency) or be cut (a
database that goes away), and a private redis-server that can be stopped and started again
(never the shared servers)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time

import redis.asyncio as aioredis

from tests.support.ports import free_port
from worker.platform.redis import redis_binary


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`. `pause()` holds every byte in both
    directions with the connections open (a stalled dependency) until `resume()`.
    `cut()` drops every open connection and refuses new ones (connection refused, as a
    stopped server does); `restore()` serves again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def cut(self) -> None:
        """The server vanishes: open connections are reset, new ones refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.sleep(0)

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()


class PrivateRedis:
    """A redis-server of our own on a free loopback port, without persistence: `stop()`
    is a crash (SIGKILL) and `start()` after it comes back EMPTY, the harshest outage."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="seat-sync-redis-")
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, wait_s: float = 10.0) -> None:
        assert self._process is None, "already running"
        self._process = await asyncio.create_subprocess_exec(
            redis_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
            try:
                if await client.ping():
                    return
            except (aioredis.RedisError, OSError):
                await asyncio.sleep(0.05)
            finally:
                await client.aclose()
        raise RuntimeError(f"private redis-server did not answer on port {self.port}")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)

    async def close(self) -> None:
        await self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
