"""A real ``redis-server`` for the tests of the Redis rate limit store.

Each test that needs Redis starts its own (:func:`run_redis`) on a free port of
127.0.0.1, without persistence, so it can stop, pause or restart it to make an
outage. ``redis-server`` must be on PATH: ``.ci/run`` installs it
(``apt-get install -y redis-server``); without it these tests fail and say
so, rather than skip.

``TRIOPROXY_TEST_REDIS_URL`` (set by ``.ci/run``) names a shared Redis for
the tests that only need one to talk to (:func:`shared_redis_url`); their
keys are unique per test, so runs do not see each other's counts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

SHARED_URL_ENV = "TRIOPROXY_TEST_REDIS_URL"


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not on PATH: the Redis rate limit tests need a real one "
            "(apt-get install -y redis-server; .ci/run installs it)",
            pytrace=False,
        )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class RedisServer:
    port: int
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, *, within: float = 10) -> None:
        """Start (or restart) it on its port and wait until it answers PING."""
        assert self.process is None
        self.process = await trio.lowlevel.open_process(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(within):
            while not await self._answers():
                assert self.process.returncode is None, "redis-server exited at start"
                await trio.sleep(0.02)

    async def _answers(self) -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            await stream.send_all(b"PING\r\n")
            with trio.move_on_after(1):
                return (await stream.receive_some(64)).startswith(b"+PONG")
            return False
        except trio.BrokenResourceError:
            return False
        finally:
            await trio.aclose_forcefully(stream)

    async def stop(self) -> None:
        """Stop it (SIGKILL: an outage, not a shutdown) and wait until it is gone."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def pause(self) -> None:
        """SIGSTOP: it keeps its connections but answers nothing (a stalled Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def run_redis() -> AsyncIterator[RedisServer]:
    """A fresh redis-server for one test; killed on the way out."""
    server = RedisServer(_free_port())
    for _attempt in range(3):
        try:
            await server.start()
            break
        except (AssertionError, trio.TooSlowError):
            # The port was taken between finding it and binding it: another one.
            await server.stop()
            server = RedisServer(_free_port())
    else:
        pytest.fail("could not start redis-server on a free port", pytrace=False)
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            if server.process is not None:
                server.resume()  # a paused server cannot die of SIGKILL any less
            await server.stop()


@asynccontextmanager
async def shared_redis_url() -> AsyncIterator[str]:
    """``TRIOPROXY_TEST_REDIS_URL`` if set (CI's shared Redis), else a fresh one."""
    url = os.environ.get(SHARED_URL_ENV)
    if url:
        yield url
        return
    async with run_redis() as server:
        yield server.url
