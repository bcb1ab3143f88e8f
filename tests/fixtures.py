"""Servers, clients and the real proxy process, for tests that cross real sockets.

Everything listens on 127.0.0.1 with port 0 and lives in a nursery the test owns (the
pytest-trio ``nursery`` fixture, usually), so nothing outlives its test.

- :func:`serve_asgi`: an ASGI app behind hypercorn's trio server; returns its base URL.
- :func:`serve_tcp_handler`: a bare TCP server calling ``handler(stream)`` per connection,
  for upstreams that misbehave on purpose (reset, half an answer, no answer).
- :func:`run_proxy`: ``python -m trioproxy`` as a subprocess, ready once it printed
  ``listening on http://HOST:PORT``; SIGTERM (then SIGKILL) on the way out.
- :func:`raw_request`: send raw bytes, collect whatever comes back until EOF or a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from trioproxy.observe.log_output import FLUSH_EVERY_S

REPO_ROOT = Path(__file__).resolve().parent.parent

#: How long ``run_proxy`` waits for the ``listening on`` line, by default.
PROXY_START_TIMEOUT = 10.0
#: How long ``run_proxy`` waits after SIGTERM before it sends SIGKILL, by default.
PROXY_STOP_TIMEOUT = 15.0

# Only a whole line counts: a chunk may end in the middle of the port number. The
# proxy's "listening on URL" line, or hypercorn's "Running on URL (CTRL + C to quit)".
# An IPv6 host is bracketed (``http://[::1]:8080``); ``host`` keeps the brackets.
_LISTENING = re.compile(
    rb"(?:listening|Running) on (https?://(\[[^\]\s]+\]|[^\s:\[]+):(\d+))(?:\r?\n| \()"
)

StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]


# --- ASGI apps under hypercorn -------------------------------------------------------


async def serve_asgi(
    app: Any,
    nursery: trio.Nursery,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
) -> str:
    """Serve ``app`` with hypercorn's trio worker on a free port of 127.0.0.1.

    Args:
      app: an ASGI 3 application.
      nursery: owns the server; cancelling it stops the server.
      shutdown_trigger: returns to start hypercorn's graceful shutdown; by default the
        server runs until ``nursery`` is cancelled.

    Returns:
      The base URL, ``http://127.0.0.1:PORT``.
    """
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    # "Running on ..." at INFO is noise in a test log; errors still show.
    config.loglevel = "WARNING"
    binds: list[str] = await nursery.start(
        _serve_hypercorn, app, config, shutdown_trigger or trio.sleep_forever
    )
    return binds[0]


async def _serve_hypercorn(
    app: Any,
    config: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


# --- raw TCP servers for fault injection ----------------------------------------------


async def serve_tcp_handler(handler: StreamHandler, nursery: trio.Nursery) -> tuple[str, int]:
    """Run a TCP server on a free port of 127.0.0.1 that calls ``handler(stream)`` per
    connection.

    Resource handling:
      The stream is closed (forcefully) when ``handler`` returns, so a handler that simply
      returns closes the connection with a FIN; use :func:`reset` for an RST. A peer that
      went away (``BrokenResourceError``) ends that connection's handler quietly: breaking
      connections is what these servers are for.

    Returns:
      ``(host, port)`` to connect to.
    """

    async def per_connection(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, per_connection, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port


async def read_head(stream: trio.abc.ReceiveStream, *, max_size: int = 65536) -> bytes:
    """Read from ``stream`` until the blank line ending an HTTP head; return all bytes read.

    Returns what arrived so far if the peer closes first or ``max_size`` is passed.
    """
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and len(buffer) < max_size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


async def reset(stream: trio.SocketStream) -> None:
    """Close ``stream`` with a TCP RST instead of a FIN (SO_LINGER with a zero timeout)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


# --- a raw client ---------------------------------------------------------------------


async def raw_request(
    host: str,
    port: int,
    data: bytes,
    *,
    read_timeout: float = 5,
    send_eof: bool = False,
) -> bytes:
    """Send ``data`` as-is and return everything received until EOF or ``read_timeout``.

    For malformed requests no HTTP client would send. A reset by the peer ends the read
    like EOF does; the bytes received before it are returned.

    Args:
      read_timeout: total seconds to wait for the peer to close after sending.
      send_eof: half-close the connection after sending ``data``.
    """
    stream = await trio.open_tcp_stream(host, port)
    received = bytearray()
    try:
        await stream.send_all(data)
        if send_eof:
            await stream.send_eof()
        with trio.move_on_after(read_timeout):
            while chunk := await stream.receive_some(65536):
                received += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(received)


# --- the real proxy process -------------------------------------------------------------


@attrs.define
class ProxyProcess:
    """A running ``python -m trioproxy`` (or other server) started by :func:`run_proxy`."""

    process: trio.Process
    url: str = ""
    host: str = ""
    port: int = 0
    _stdout: bytearray = attrs.field(factory=bytearray)
    _stderr: bytearray = attrs.field(factory=bytearray)
    _listening: trio.Event = attrs.field(factory=trio.Event)
    _settled: trio.Event = attrs.field(factory=trio.Event)
    _stdout_closed: trio.Event = attrs.field(factory=trio.Event)
    _stderr_closed: trio.Event = attrs.field(factory=trio.Event)
    # Replaced by a fresh event each time stderr grows, so waiters wake per chunk.
    _stderr_grew: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def stdout(self) -> str:
        """What the proxy wrote to stdout so far."""
        return self._stdout.decode(errors="replace")

    def stderr(self) -> str:
        """What the proxy wrote to stderr so far (its log)."""
        return self._stderr.decode(errors="replace")

    async def settled_stderr(self) -> str:
        """stderr once the proxy has written out what it logged until now.

        Its log goes through a writer thread that writes every ``FLUSH_EVERY_S``
        (trioproxy.observe.log_output); read after a few of those, so that a check
        that something is *not* in the log sees the lines of everything before it.
        """
        await trio.sleep(4 * FLUSH_EVERY_S)
        return self.stderr()

    async def wait_for_stderr(self, needle: str) -> str:
        """Wait until ``needle`` shows up in stderr; return all of stderr then.

        Put a deadline around it (``with trio.fail_after(5): ...``).

        Raises:
          AssertionError: stderr closed (the proxy exited) without ``needle``.
        """
        while needle not in self.stderr():
            assert not self._stderr_closed.is_set(), (
                f"proxy stderr closed without {needle!r}\n" + self._describe()
            )
            await self._stderr_grew.wait()
        return self.stderr()

    async def _drain_stdout(self) -> None:
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.receive_some(65536):
            self._stdout += chunk
            if not self._listening.is_set() and (match := _LISTENING.search(self._stdout)):
                self.url = match.group(1).decode()
                self.host = match.group(2).decode()
                self.port = int(match.group(3))
                self._listening.set()
                self._settled.set()
        self._stdout_closed.set()

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self._stderr += chunk
            self._stderr_grew.set()
            self._stderr_grew = trio.Event()
        self._stderr_closed.set()
        self._stderr_grew.set()

    async def _watch_exit(self) -> None:
        await self.process.wait()
        self._settled.set()

    def _describe(self) -> str:
        return (
            f"exit status: {self.process.returncode}\n"
            f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"
        )


@asynccontextmanager
async def run_proxy(
    *args: str, env: dict[str, str] | None = None, health_check: bool = False
) -> AsyncIterator[ProxyProcess]:
    """Start the real proxy, ``python -m trioproxy --host 127.0.0.1 --port 0 *args``.

    Runs from the repository root, so the working tree's ``trioproxy`` is the one started.
    Readiness, failure and cleanup are those of :func:`run_listening_process`.

    Args:
      args: further command-line arguments (``--upstream URL``, ...).
      env: variables to set on top of this process's environment.
      health_check: keep the active health checks (on in the real CLI). Off by default
        here: most tests use fault-injecting upstreams that count connections or answer
        one canned response, which probes would disturb; the balancing tests turn it on.

    Yields:
      The :class:`ProxyProcess`, with ``url``, ``port``, ``pid``, ``process``, and
      ``stderr()`` for the log captured so far.
    """
    command = [sys.executable, "-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", *args]
    if not health_check and "--no-health-check" not in args:
        command.append("--no-health-check")
    async with run_listening_process(command, env=env, cwd=REPO_ROOT) as proxy:
        yield proxy


def cli_args_as_toml(args: Sequence[str]) -> str:
    """The configuration ``python -m trioproxy ARGS`` makes, as a TOML file says it
    (for a front end that reads a file: the ASGI app). Flags that set a key in every
    group set it in every group of ``--config FILE`` (whose keys the flags override,
    as on the command line), or without a file in the group ``default``, the only
    one command-line flags make. A file's relative paths stay right only if the TOML is
    written in the file's directory (:func:`run_asgi_proxy` does)."""
    from trioproxy.__main__ import build_parser, sources_from_args

    parser = build_parser()
    sources = sources_from_args(parser, parser.parse_args(list(args)), {}, str(REPO_ROOT))
    if sources.config_file is None:
        lines = []
        for value in sources.cli:
            path = ("upstreams", "default", *value.path) if value.every_group else value.path
            lines.append(f"{'.'.join(path)} = {_toml_value(value.raw)}")
        return "\n".join(lines) + "\n"
    document: dict[str, Any] = tomllib.loads(Path(sources.config_file).read_text())
    # As the loader does: a flag for every group sets its key in the groups there are.
    for value in sorted(sources.cli, key=lambda value: value.every_group):
        parsed = tomllib.loads(f"v = {_toml_value(value.raw)}")["v"]
        paths = (
            [("upstreams", group, *value.path) for group in document.get("upstreams", {})]
            if value.every_group
            else [value.path]
        )
        for path in paths:
            table = document
            for key in path[:-1]:
                table = table.setdefault(key, {})
            table[path[-1]] = parsed
    lines = [f"{json.dumps(key)} = {_toml_inline(value)}" for key, value in document.items()]
    return "\n".join(lines) + "\n"


def _toml_inline(value: Any) -> str:
    """``value`` (from ``tomllib``) as a TOML inline value: tables inline, strings as
    basic strings (JSON's escapes are TOML's)."""
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {_toml_inline(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    assert isinstance(value, str), value
    return json.dumps(value, ensure_ascii=False)


def _toml_value(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (int, float)):
        return repr(raw)
    if isinstance(raw, list):
        return "[" + ", ".join(_toml_value(item) for item in raw) + "]"
    text = str(raw)
    if re.fullmatch(r"[0-9]+", text):
        return text
    if re.fullmatch(r"[0-9]*\.[0-9]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@asynccontextmanager
async def run_asgi_proxy(
    *args: str,
    env: dict[str, str] | None = None,
    health_check: bool = False,
    hypercorn_args: Sequence[str] = (),
) -> AsyncIterator[ProxyProcess]:
    """The ASGI front end in a real ``hypercorn --worker-class trio trioproxy.asgi:app``
    process, configured as ``run_proxy(*args)`` would be: the flags are written to a
    TOML file that ``TRIOPROXY_CONFIG`` names (``app`` reads it at lifespan startup).

    hypercorn's own log goes to stdout (its ``Running on URL`` line is the readiness
    line), trioproxy's log to stderr, as with ``python -m trioproxy``.
    """
    if not health_check and "--no-health-check" not in args:
        args = (*args, "--no-health-check")
    with tempfile.TemporaryDirectory(prefix="trioproxy-asgi-") as tmp:
        config = Path(tmp) / "trioproxy.toml"
        if "--config" in args:
            # Next to the file: its relative paths (keys.txt, certificates) hold.
            given = Path(args[args.index("--config") + 1])
            config = given.with_name(f".asgi-{given.name}")
        config.write_text(cli_args_as_toml(args))
        # Served in this process (no worker child): its pid is the one whose
        # descriptors and memory the tests read, and SIGTERM reaches it.
        command = hypercorn_command("trioproxy.asgi:app", *hypercorn_args)
        full_env = {"TRIOPROXY_CONFIG": str(config), **(env or {})}
        # The working directory has no .env: only the file and env say anything.
        async with run_listening_process(command, env=full_env, cwd=Path(tmp)) as proxy:
            yield proxy


def hypercorn_command(
    app: str, *options: str, workers: bool = False, runner: tuple[str, ...] = ("-m",)
) -> list[str]:
    """``python -m hypercorn --worker-class trio`` serving ``app`` on a free port of
    127.0.0.1, its log on stdout (where :func:`run_listening_process` reads its
    "Running on" line). ``workers=False`` serves in the process itself (``--workers
    0``: its pid is the serving one); ``runner`` replaces ``-m`` (a script that runs a
    module). ``options`` go before ``app``."""
    command = [sys.executable, *runner, "hypercorn", "--worker-class", "trio"]
    if not workers:
        command += ["--workers", "0"]
    return [
        *command, "--bind", "127.0.0.1:0", "--error-logfile", "/dev/stdout", *options, app
    ]  # fmt: skip


@asynccontextmanager
async def run_listening_process(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    start_within: float = PROXY_START_TIMEOUT,
    stop_within: float = PROXY_STOP_TIMEOUT,
) -> AsyncIterator[ProxyProcess]:
    """Run ``command`` until it prints ``listening on http://HOST:PORT`` on stdout.

    The test fails, showing the process's exit status, stdout and stderr, if that line
    does not come within ``start_within`` seconds or the process exits first.

    Resource handling:
      stdout and stderr are read by background tasks the whole time, so the pipes never
      fill. On the way out the process gets SIGTERM, then SIGKILL if it has not exited
      within ``stop_within`` seconds; this cleanup is shielded from cancellation.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd
    )
    proxy = ProxyProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._drain_stdout)
            nursery.start_soon(proxy._drain_stderr)
            nursery.start_soon(proxy._watch_exit)
            try:
                with trio.move_on_after(start_within):
                    await proxy._settled.wait()
                if not proxy._listening.is_set():
                    # Let the pipes run dry so the failure shows the whole story.
                    with trio.move_on_after(1):
                        await proxy._stderr_closed.wait()
                    why = "exited" if process.returncode is not None else "timed out"
                    pytest.fail(
                        f"{why} before printing 'listening on': {command}\n" + proxy._describe(),
                        pytrace=False,
                    )
                yield proxy
            finally:
                with trio.CancelScope(shield=True):
                    await _stop(process, stop_within)
                    with trio.move_on_after(2):
                        await proxy._stdout_closed.wait()
                        await proxy._stderr_closed.wait()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the test body raised; hand the test its own error.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _stop(process: trio.Process, stop_within: float) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    with trio.move_on_after(stop_within):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
