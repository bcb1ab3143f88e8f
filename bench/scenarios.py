"""The scenarios: what load each one puts on a contender, and what it records.

A scenario's :meth:`measure` gets a started contender and returns plain metrics
(``req_s``, ``mib_s``, ``p50_ms``, ``p99_ms``, ``cpu``...), or raises:

* :class:`bench.procs.BenchError` when anything went wrong that would make the numbers a
  lie: a socket error, a non-2xx response, a stream that broke, a child that died. The
  measurement is then reported as FAILED with the reason, never with numbers;
* :class:`NotApplicable` when the contender does not do what the scenario needs (no
  WebSocket; a proxy that buffers a whole response, so an event stream never arrives;
  one that holds fewer concurrent streams than asked).

Throughput scenarios use wrk (C, one thread on the load core) so that the load
generator is not what is measured; the others need a client that wrk is not (holding
idle connections, reading event streams, WebSocket) and use :mod:`bench.loadgen`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

from bench import h2load, loadgen, wrk
from bench.contenders import Contender
from bench.env import Tools
from bench.procs import BenchError, Child, Watch

MIB = 1 << 20
Metrics = dict[str, float]


class NotApplicable(Exception):
    """The contender cannot do what this scenario measures."""


@attrs.frozen
class Context:
    child: Child
    watch: Watch
    contender: Contender
    tools: Tools
    duration: float
    warmup: float
    workdir: Path

    @property
    def port(self) -> int:
        return self.child.port


@attrs.frozen
class Scenario:
    name: str
    title: str
    #: Which back end the contender sits in front of (see :class:`bench.contenders.Site`).
    backend: str
    #: The metric the "rate" column shows, and its unit.
    rate: str
    rate_unit: str
    #: Metrics compared as ratios, each with whether higher is better.
    compared: tuple[tuple[str, bool], ...]
    #: The only contenders it is run with; ``None``: every one.
    contenders: frozenset[str] | None = None
    needs: ClassVar[frozenset[str]] = frozenset()

    def runs(self, contender: Contender) -> bool:
        """Whether this scenario and ``contender`` are measured together."""
        return (self.contenders is None or contender.name in self.contenders) and (
            contender.scenarios is None or self.name in contender.scenarios
        )

    def measure(self, ctx: Context) -> Metrics:
        raise NotImplementedError


def _check_wrk(result: wrk.WrkResult, what: str) -> None:
    if result.errors or result.non_2xx:
        errors = ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v)
        raise BenchError(
            f"{what}: {result.non_2xx} non-2xx responses, socket errors: {errors or 'none'}"
        )
    if result.requests == 0:
        raise BenchError(f"{what}: no request completed")


@attrs.frozen
class WrkScenario(Scenario):
    """wrk with keep-alive connections: GETs, or POSTs of a fixed body (Lua script)."""

    path: str = "/small"
    connections: int = 16
    upload_size: int = 0
    #: A new connection (and, over TLS, a full handshake) for every request.
    close: bool = False
    needs: ClassVar[frozenset[str]] = frozenset({"wrk"})

    def measure(self, ctx: Context) -> Metrics:
        assert ctx.tools.wrk is not None
        scheme = ctx.contender.scheme
        url = f"{scheme}://127.0.0.1:{ctx.port}{ctx.contender.mount}{self.path}"
        headers = ("Connection: close",) if self.close else ()
        script = (
            wrk.write_upload_script(ctx.workdir, self.upload_size) if self.upload_size else None
        )

        def once(duration: float) -> wrk.WrkResult:
            assert ctx.tools.wrk is not None
            return wrk.run(
                ctx.tools.wrk,
                url,
                connections=self.connections,
                duration=duration,
                script=script,
                headers=headers,
            )

        _check_wrk(once(ctx.warmup), "warm-up")
        ctx.watch.restart_cpu()
        result = once(ctx.duration)
        cpu = ctx.watch.cpu_share()
        _check_wrk(result, "measurement")
        ctx.child.check_alive()
        if self.upload_size:
            mib_s = result.req_s * self.upload_size / MIB
        else:
            mib_s = result.read_bytes_s / MIB
        return {
            "req_s": result.req_s,
            "mib_s": mib_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "cpu": cpu,
            # CPU time per request: steadier than req/s on a machine others share
            # (a contender not kept busy has a low rate, not a high cost).
            "cpu_us": cpu / result.req_s * 1e6 if result.req_s else 0.0,
            "requests": result.requests,
            "errors": result.errors + result.non_2xx,
        }


def _check_load(result: loadgen.HttpLoad, what: str) -> None:
    if result.socket_errors or result.non_2xx:
        raise BenchError(
            f"{what}: {result.non_2xx} non-2xx responses, {result.socket_errors} socket errors"
            + (f" (first: {result.first_error})" if result.first_error else "")
        )
    if result.requests == 0:
        raise BenchError(f"{what}: no request completed")


@attrs.frozen
class PyHttpScenario(Scenario):
    """The bench's own keep-alive load generator (no wrk needed): the smoke run."""

    path: str = "/small"
    connections: int = 16

    def measure(self, ctx: Context) -> Metrics:
        path = ctx.contender.mount + self.path

        def once(duration: float) -> loadgen.HttpLoad:
            return trio.run(
                lambda: loadgen.http_load(
                    ctx.port, path, connections=self.connections, duration=duration
                )
            )

        _check_load(once(ctx.warmup), "warm-up")
        ctx.watch.restart_cpu()
        result = once(ctx.duration)
        cpu = ctx.watch.cpu_share()
        _check_load(result, "measurement")
        ctx.child.check_alive()
        return {
            "req_s": result.req_s,
            "mib_s": result.mib_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "cpu": cpu,
            "requests": result.requests,
            "errors": result.socket_errors + result.non_2xx,
        }


@attrs.frozen
class IdleScenario(Scenario):
    """Open ``count`` keep-alive connections, one request each, hold them; read the RSS."""

    count: int = 1000
    hold_s: float = 1.0

    def measure(self, ctx: Context) -> Metrics:
        warm = trio.run(
            lambda: loadgen.http_load(ctx.port, "/small", connections=4, duration=ctx.warmup)
        )
        _check_load(warm, "warm-up")
        time.sleep(0.5)
        baseline = ctx.child.rss()

        async def hold() -> tuple[loadgen.IdleConnections, int, int]:
            # Bounded, but long enough for the slowest peer to accept them all.
            within = max(60.0, 0.025 * self.count)
            idle = await loadgen.open_idle(ctx.port, self.count, within=within)
            try:
                await trio.sleep(self.hold_s)
                return idle, ctx.child.rss(), ctx.child.established()
            finally:
                await loadgen.close_all(idle.streams)

        idle, rss, held = trio.run(hold)
        if idle.stalled and not (idle.errors or idle.non_2xx):
            raise NotApplicable(
                f"holds at most {idle.answered} connections: the others had no answer"
                " for 15 s (a cap on concurrent connections)"
            )
        if idle.errors or idle.non_2xx:
            raise BenchError(
                f"{idle.non_2xx} non-2xx responses, {idle.errors} socket errors"
                f" opening {self.count} connections (first: {idle.first_error})"
            )
        ctx.child.check_alive()
        if held < self.count:
            raise BenchError(
                f"only {held} of {self.count} connections were still open {self.hold_s:.0f} s"
                " after their request"
            )
        return {
            "held": held,
            "rss_mib": rss / MIB,
            "kib_per_conn": (rss - baseline) / self.count / 1024,
            "open_s": idle.seconds,
        }


@attrs.frozen
class SseScenario(Scenario):
    """``streams`` concurrent event streams from a back end that writes to all at once."""

    streams: int = 1000
    ready_timeout: float = 15.0
    #: ``POST`` to an OpenAI endpoint with a chat request: LLM token streams.
    openai: bool = False

    def measure(self, ctx: Context) -> Metrics:
        extra: dict[str, Any] = {}
        if self.openai:
            extra = {
                "method": "POST",
                "path": "/v1/chat/completions",
                "body": b'{"model":"bench","stream":true,"messages":[]}',
            }
        result = loadgen.sse_fanout(
            ctx.port,
            streams=self.streams,
            duration=ctx.duration,
            ready_timeout=self.ready_timeout,
            on_start=ctx.watch.restart_cpu,
            **extra,
        )
        cpu = ctx.watch.cpu_share()
        if result.errors:
            raise BenchError(
                f"{result.errors} streams failed (first: {result.first_error or 'non-2xx'})"
            )
        if result.ready == 0:
            raise NotApplicable(
                f"no event reached any stream within {self.ready_timeout:.0f} s"
                " (the whole response is buffered)"
            )
        if result.ready < self.streams:
            # No error, but streams beyond some number wait: a cap on concurrent
            # upstream connections (fastapi-reverse-proxy's shared httpx client has 100).
            raise NotApplicable(
                f"holds only {result.ready} of {self.streams} concurrent streams: the others"
                f" had no event within {self.ready_timeout:.0f} s (an upstream connection cap)"
            )
        if result.events == 0:
            raise BenchError("no event arrived during the measurement")
        ctx.child.check_alive()
        return {
            "events_s": result.events_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "max_ms": result.max_ms,
            "cpu": cpu,
            # The contender's CPU time per event relayed (cpu is its share of a core).
            "cpu_us_event": cpu / result.events_s * 1e6,
        }


@attrs.frozen
class WsScenario(Scenario):
    """WebSocket echo round trips on ``connections`` connections, back to back."""

    connections: int = 16

    def measure(self, ctx: Context) -> Metrics:
        def once(duration: float, on_start: Callable[[], None] | None = None) -> loadgen.WsEcho:
            return trio.run(
                lambda: loadgen.ws_echo(
                    ctx.port, connections=self.connections, duration=duration, on_start=on_start
                )
            )

        warm = once(ctx.warmup)
        if (unsupported := ctx.contender.no_websocket) is not None:
            if warm.refused_status:
                raise NotApplicable(
                    f"{unsupported}: the upgrade was answered {warm.refused_status}"
                )
            if warm.connected == 0 and warm.errors:
                raise NotApplicable(f"{unsupported}: {warm.first_error}")
        elif warm.refused_status:
            raise BenchError(f"warm-up: the upgrade was answered {warm.refused_status}")
        result = once(ctx.duration, ctx.watch.restart_cpu)
        cpu = ctx.watch.cpu_share()
        for what, r in (("warm-up", warm), ("measurement", result)):
            if r.errors or r.connected < r.connections:
                raise BenchError(
                    f"{what}: {r.connected} of {r.connections} connected, {r.errors} errors"
                    f" (first: {r.first_error})"
                )
        ctx.child.check_alive()
        return {
            "msgs_s": result.msgs_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "cpu": cpu,
        }


@attrs.frozen
class H2loadScenario(Scenario):
    """h2load with one stream per connection: HTTP/2 with prior knowledge (h2c), or
    HTTP/1.1 (``h1``). (h2load's HTTP/1.1 client counts every hypercorn response as
    failed, the status line's empty reason phrase being the likely cause, so the ASGI
    scenarios compare its HTTP/2 with wrk's HTTP/1.1 at the same 64 connections.)"""

    path: str = "/small"
    connections: int = 64
    h1: bool = False
    needs: ClassVar[frozenset[str]] = frozenset({"h2load"})

    def measure(self, ctx: Context) -> Metrics:
        assert ctx.tools.h2load is not None
        url = f"http://127.0.0.1:{ctx.port}{ctx.contender.mount}{self.path}"

        # One run, warm-up included (see bench/h2load.py): the CPU clock restarts when
        # the warm-up ends.
        timer = threading.Timer(ctx.warmup, ctx.watch.restart_cpu)
        timer.start()
        try:
            result = h2load.run(
                ctx.tools.h2load,
                url,
                connections=self.connections,
                duration=ctx.duration,
                warmup=ctx.warmup,
                h1=self.h1,
            )
        finally:
            timer.cancel()
        cpu = ctx.watch.cpu_share()
        if result.failed or result.non_2xx or not result.requests:
            raise BenchError(
                f"h2load: {result.failed} failed, {result.non_2xx} not 2xx, "
                f"{result.requests} succeeded:\n{result.output[-1500:]}"
            )
        ctx.child.check_alive()
        return {
            "req_s": result.req_s,
            "mean_ms": result.mean_ms,
            "cpu": cpu,
            "requests": result.requests,
            "errors": 0,
        }


_GET = (("req_s", True), ("p99_ms", False))
#: The TLS scenarios compare each TLS terminator with itself in plain http, on CPU
#: time per request too.
_TLS_PAIRS = frozenset({"nginx", "nginx-tls", "trioproxy", "trioproxy-tls"})
_TLS_COMPARED = (*_GET, ("cpu_us", False))
#: The ASGI front end's scenarios: trioproxy.asgi and a FastAPI proxy_pass app, both on
#: hypercorn's trio worker, against fastapi-reverse-proxy on uvicorn (and the standalone
#: server, for what the ASGI server costs).
_ASGI = frozenset({"trioproxy", "trioproxy-asgi", "fastapi-trioproxy", "fastapi-reverse-proxy"})
#: The LLM meter's scenarios: its cost (on / off) and a change to it (/ baseline).
_LLM = frozenset({"direct", "trioproxy", "trioproxy-nometrics", "trioproxy-baseline"})
_ASGI_H2 = frozenset({"trioproxy-asgi", "fastapi-trioproxy"})

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        WrkScenario(
            "get-small-16", "small GET (100 B), 16 conns", "http", "req_s", "req/s", _GET,
            path="/small", connections=16,
        ),
        WrkScenario(
            "get-small-64", "small GET (100 B), 64 conns", "http", "req_s", "req/s", _GET,
            path="/small", connections=64,
        ),
        WrkScenario(
            "routes-64", "small GET (100 B), 64 conns, 50-route config vs one route", "http",
            "req_s", "req/s", _GET,
            contenders=frozenset({"trioproxy", "trioproxy-50routes"}),
            path="/small", connections=64,
        ),
        WrkScenario(
            "download-1m", "1 MiB downloads, 8 conns", "http", "mib_s", "MiB/s",
            (("mib_s", True),), path="/1m", connections=8,
        ),
        WrkScenario(
            "upload-10m", "10 MiB uploads, 4 conns", "http", "mib_s", "MiB/s",
            (("mib_s", True),), path="/upload", connections=4, upload_size=10 * MIB,
        ),
        IdleScenario(
            "idle-1k", "1k idle keep-alive conns", "http", "kib_per_conn", "KiB/conn",
            (("kib_per_conn", False), ("rss_mib", False)), count=1000,
        ),
        IdleScenario(
            "idle-10k", "10k idle keep-alive conns", "http", "kib_per_conn", "KiB/conn",
            (("kib_per_conn", False), ("rss_mib", False)), count=10_000,
        ),
        WsScenario(
            "ws-echo", "WebSocket echo, 16 conns", "ws", "msgs_s", "msgs/s",
            (("msgs_s", True),), connections=16,
        ),
        WsScenario(
            "ws-echo-1", "WebSocket echo, 1 conn", "ws", "msgs_s", "msgs/s",
            (("msgs_s", True),), connections=1,
        ),
        WrkScenario(
            "asgi-get-64", "ASGI front end: small GET (100 B), 64 conns", "http", "req_s",
            "req/s", _GET, contenders=_ASGI, path="/small", connections=64,
        ),
        WrkScenario(
            "asgi-download-1m", "ASGI front end: 1 MiB downloads, 8 conns", "http", "mib_s",
            "MiB/s", (("mib_s", True),), contenders=_ASGI, path="/1m", connections=8,
        ),
        H2loadScenario(
            "asgi-h2-64", "ASGI front end: small GET, 64 conns, HTTP/2 h2c (h2load)", "http",
            "req_s", "req/s", (("req_s", True),), contenders=_ASGI_H2,
        ),
        SseScenario(
            "sse-1000", "SSE fan-out, 1000 streams", "sse", "events_s", "events/s",
            (("p99_ms", False),), streams=1000,
        ),
        WrkScenario(
            "tls-small-64", "small GET (100 B), 64 keep-alive conns, TLS terminated vs plain",
            "http", "req_s", "req/s", _TLS_COMPARED, contenders=_TLS_PAIRS, path="/small",
            connections=64,
        ),
        WrkScenario(
            "tls-handshake-16", "small GET (100 B), 16 conns, a new connection per request",
            "http", "req_s", "req/s", _TLS_COMPARED, contenders=_TLS_PAIRS, path="/small",
            connections=16, close=True,
        ),
        SseScenario(
            "sse-llm-1000", "LLM token streams (OpenAI chunks), 1000 streams", "sse",
            "events_s", "events/s", (("p99_ms", False), ("cpu_us_event", False)),
            contenders=_LLM,
            streams=1000, openai=True,
        ),
        SseScenario(
            "sse-llm-100", "LLM token streams (OpenAI chunks), 100 streams", "sse",
            "events_s", "events/s", (("p99_ms", False), ("cpu_us_event", False)),
            contenders=_LLM,
            streams=100, openai=True,
        ),
    )
}  # fmt: skip

SMOKE = PyHttpScenario(
    "smoke-get-16",
    "small GET (100 B), 16 conns, Python client",
    "pyhttp",
    "req_s",
    "req/s",
    _GET,
    path="/small",
    connections=16,
)
#: That a config-file proxy (the 50-route gateway) keeps working under load.
SMOKE_ROUTES = PyHttpScenario(
    "smoke-routes-16",
    "small GET (100 B), 16 conns, Python client, 50-route config",
    "pyhttp",
    "req_s",
    "req/s",
    _GET,
    contenders=frozenset({"trioproxy-50routes"}),
    path="/small",
    connections=16,
)
