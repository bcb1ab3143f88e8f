"""The floor: what a bare trio relay costs on the bench's own SSE, body and small-GET loads.

``python -m bench.floor sse|download|upload|small --target T`` starts the scenario's back end
(the bench's SSE server, or its nginx) and a contender, loads it the way the bench does
(same pinning: the contender on core 1; back end, load and this process on core 0;
1000 SSE streams, or wrk with 8 connections on 1 MiB bodies / 4 on 10 MiB uploads / 64
on the 100-byte body) and prints, per repetition and as medians, the latency or
throughput and the contender's **CPU time per unit of work** (µs per SSE event, ms per
MiB, µs per request): the figure that survives a shared machine. Every repetition
starts the contender afresh and warms it up first.

Contenders (``--target``):

``relay``
    The smallest trio relay, in this file: per client connection one upstream
    connection and two tasks, each ``receive_some`` → ``send_all`` on
    ``trio.SocketStream`` in a loop; no parsing, no timeouts. The floor for a design
    that uses trio's streams.
``relay-lowlevel``
    The same below trio's stream layer: the raw socket's ``recv``/``send`` first, and
    ``wait_readable``/``wait_writable`` only when a call would block (what
    ``trioproxy.sockets.FastSocketStream`` does). The floor for any one-task-per-stream trio design.
``relay-hub``
    One task relays every connection pair: after connecting, a connection's task hands
    both sockets to a hub that owns its own ``select.epoll`` (level-triggered
    registrations kept for the pair's life, so no ``epoll_ctl`` per event), waits with
    ``wait_readable`` on that epoll's descriptor and drains ``poll(0)``: ``recv`` from the
    ready side, ``send`` to the other; a partial send buffers the rest, stops reading
    that side and waits for ``EPOLLOUT`` on the sink (backpressure). It yields to trio
    every :data:`HUB_YIELD_EVERY` events, and runs with trioproxy's collector settings
    (``gc.freeze()``, a gen-0 threshold of 10,000). The floor for a design where one
    task relays many streams.
``trioproxy``, ``trioproxy-h11``
    ``python -m trioproxy`` (``--http auto`` / ``--http h11``) with the bench's flags,
    from this checkout or ``--trioproxy-src DIR``.
``nginx``
    nginx as a reverse proxy, configured as in the bench.

``python -m bench.floor relay --port P --upstream HOST:PORT [--lowlevel | --hub]`` runs
the bare relay alone (what ``--target relay`` starts).
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from bench import loadgen, nginx, wrk
from bench.contenders import REPO_DIR
from bench.env import discover
from bench.procs import CORE_LOAD, CORE_PROXY, Child, free_port, pin_self, raise_nofile_limit, start

READ_SIZE = 65536
MIB = 1 << 20


# --- the bare relay -------------------------------------------------------------------


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(READ_SIZE):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


Pump = Callable[[trio.SocketStream, trio.SocketStream], Awaitable[None]]


async def _relay_one(client: trio.SocketStream, upstream: tuple[str, int], pump: Pump) -> None:
    try:
        server = await trio.open_tcp_stream(*upstream)
    except OSError:
        await trio.aclose_forcefully(client)
        return
    try:
        async with trio.open_nursery() as nursery:

            async def pump_and_cancel(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                await pump(source, sink)
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump_and_cancel, client, server)
            nursery.start_soon(pump_and_cancel, server, client)
    finally:
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(client)


async def _pump_lowlevel(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """``_pump`` below trio's stream layer: the raw sockets, and a wait only when a
    call would block (what ``SocketStream`` costs on top of the syscalls)."""
    src = source.socket._sock  # type: ignore[attr-defined]  # the stdlib socket
    dst = sink.socket._sock  # type: ignore[attr-defined]
    unyielded = 0
    try:
        while True:
            try:
                data = src.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                unyielded = 0
                continue
            if not data:
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[dst.send(view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
            unyielded += 1
            if unyielded >= 16:  # a source that never blocks must not starve the others
                await trio.lowlevel.checkpoint()
                unyielded = 0
    except OSError:
        pass


#: Events the hub handles before it yields to the other tasks.
HUB_YIELD_EVERY = 64
_HUB_MAX_EVENTS = 256
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP


class _Side:
    """One socket of a relayed pair, and what waits to be written to it."""

    __slots__ = ("done", "mask", "peer", "pending", "sock")

    def __init__(self, sock: socket.socket, done: trio.Event) -> None:
        self.sock = sock
        self.peer: _Side = self
        self.pending = b""  # bytes read from the peer that this socket did not take yet
        self.mask = _IN
        self.done = done


class _Hub:
    """One task relaying every pair (see ``relay-hub`` in the module docstring)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._sides: dict[int, _Side] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        epoll = self._epoll = select.epoll()
        sides = self._sides
        try:
            task_status.started()
            handled = 0
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                while events := epoll.poll(0, _HUB_MAX_EVENTS):
                    for fd, mask in events:
                        side = sides.get(fd)
                        if side is not None:
                            self._ready(side, mask)
                    handled += len(events)
                    if handled >= HUB_YIELD_EVERY:
                        handled = 0
                        await trio.lowlevel.checkpoint()
        finally:
            self._epoll = None
            epoll.close()

    async def relay(self, a: socket.socket, b: socket.socket) -> None:
        """Relay between ``a`` and ``b`` until one side ends; the caller closes them."""
        epoll = self._epoll
        assert epoll is not None, "the hub is not running"
        done = trio.Event()
        left, right = _Side(a, done), _Side(b, done)
        left.peer, right.peer = right, left
        try:
            for side in (left, right):
                side.sock.setblocking(False)
                self._sides[side.sock.fileno()] = side
                epoll.register(side.sock.fileno(), _IN)
            await done.wait()
        finally:
            for side in (left, right):
                if self._sides.pop(side.sock.fileno(), None) is not None:
                    epoll.unregister(side.sock.fileno())

    def _modify(self, side: _Side, mask: int) -> None:
        if side.mask != mask:
            side.mask = mask
            assert self._epoll is not None
            self._epoll.modify(side.sock.fileno(), mask)

    def _ready(self, side: _Side, mask: int) -> None:
        try:
            if mask & _OUT and side.pending:
                # The sink drained: write what waited, and read its peer again.
                sent = side.sock.send(side.pending)
                side.pending = side.pending[sent:]
                if not side.pending:
                    self._modify(side, side.mask & ~_OUT)
                    self._modify(side.peer, side.peer.mask | _IN)
            if mask & (_IN | _ERR) and side.mask & _IN:
                try:
                    data = side.sock.recv(READ_SIZE)
                except BlockingIOError:
                    return
                if not data:
                    side.done.set()
                    return
                sink = side.peer
                try:
                    sent = sink.sock.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    # Backpressure: keep the rest, stop reading until the sink drains.
                    sink.pending = data[sent:]
                    self._modify(sink, sink.mask | _OUT)
                    self._modify(side, side.mask & ~_IN)
        except OSError as exc:
            if exc.errno == errno.EBADF:  # pragma: no cover
                raise
            side.done.set()


async def relay(port: int, upstream: tuple[str, int], mode: str = "stream") -> None:
    """Accept on 127.0.0.1:``port`` and relay every connection to ``upstream``.

    ``mode``: ``stream`` (``SocketStream``), ``lowlevel`` (raw sockets) or ``hub``.
    """
    if mode != "hub":
        pump = _pump_lowlevel if mode == "lowlevel" else _pump

        async def handler(client: trio.SocketStream) -> None:
            await _relay_one(client, upstream, pump)

        await trio.serve_tcp(handler, port, host="127.0.0.1", backlog=4096)
        return

    # The hub's floor is measured under the collector settings the proxy runs with.
    from trioproxy.__main__ import tune_gc

    tune_gc()
    hub = _Hub()

    async def hub_handler(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*upstream)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        try:
            await hub.relay(client.socket._sock, server.socket._sock)  # type: ignore[attr-defined]
        finally:
            await trio.aclose_forcefully(server)
            await trio.aclose_forcefully(client)

    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await trio.serve_tcp(hub_handler, port, host="127.0.0.1", backlog=4096)


# --- contenders -------------------------------------------------------------------------


def _contender(
    target: str, port: int, upstream: str, workdir: Path, *, stream: bool, src: Path
) -> Child:
    if target in ("relay", "relay-lowlevel", "relay-hub"):
        argv = [sys.executable, "-m", "bench.floor", "relay", "--port", str(port)]
        argv += ["--upstream", upstream]
        argv += {"relay-lowlevel": ["--lowlevel"], "relay-hub": ["--hub"]}.get(target, [])
    elif target in ("trioproxy", "trioproxy-h11"):
        http = "h11" if target == "trioproxy-h11" else "auto"
        argv = [sys.executable, "-m", "trioproxy", "--upstream", f"http://{upstream}"]
        argv += ["--port", str(port), "--http", http, "--log-level", "warning"]
        argv += ["--max-connections-per-upstream", "4096"]
    elif target == "nginx":
        tools = discover()
        assert tools.nginx is not None, "nginx not found"
        prefix = workdir / "nginx-proxy"
        conf = nginx.write_proxy(prefix, port, upstream, raise_nofile_limit(), stream=stream)
        argv = nginx.command(tools.nginx, conf)
    else:
        raise SystemExit(f"unknown target {target!r}")
    # ``python -m`` puts the working directory first on sys.path: trioproxy runs from src.
    cwd = src if target.startswith("trioproxy") else REPO_DIR
    return start(target, argv, port=port, core=CORE_PROXY, log_dir=workdir, cwd=cwd)


def _backend(kind: str, workdir: Path) -> Child:
    port = free_port()
    if kind == "sse":
        argv = [sys.executable, "-m", "bench.servers", "sse", "--port", str(port)]
        return start("sse-backend", argv, port=port, core=CORE_LOAD, log_dir=workdir, cwd=REPO_DIR)
    tools = discover()
    assert tools.nginx is not None, "nginx not found"
    conf = nginx.write_backend(workdir / "nginx-backend", port, raise_nofile_limit())
    return start(
        "backend", nginx.command(tools.nginx, conf), port=port, core=CORE_LOAD, log_dir=workdir
    )


# --- measurements ---------------------------------------------------------------------


def _sse_once(child: Child, streams: int, duration: float) -> dict[str, float]:
    cpu: list[float] = []

    def on_start() -> None:
        cpu.append(child.cpu_seconds())
        # Read the clock again when the timing ends, not after the clients close.
        threading.Timer(duration, lambda: cpu.append(child.cpu_seconds())).start()

    result = loadgen.sse_fanout(child.port, streams=streams, duration=duration, on_start=on_start)
    time.sleep(0.05)
    if result.errors or result.ready < streams or len(cpu) < 2:
        raise SystemExit(f"SSE run failed: {result}")
    return {
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
        "events_s": result.events_s,
        "cpu_us_per_event": (cpu[1] - cpu[0]) * 1e6 / result.events,
    }


def _download_once(child: Child, duration: float, *, upload: int) -> dict[str, float]:
    tools = discover()
    assert tools.wrk is not None, "wrk not found"
    script = None
    path = "/1m"
    if upload:
        script = wrk.write_upload_script(Path(tempfile.gettempdir()), upload)
        path = "/upload"
    url = f"http://127.0.0.1:{child.port}{path}"
    connections = 4 if upload else 8
    wrk.run(tools.wrk, url, connections=connections, duration=1, script=script)  # warm-up
    before = child.cpu_seconds()
    result = wrk.run(tools.wrk, url, connections=connections, duration=duration, script=script)
    used = child.cpu_seconds() - before
    if result.errors or result.non_2xx:
        raise SystemExit(f"wrk saw errors: {result}")
    mib = result.requests * upload / MIB if upload else result.read_bytes_s * duration / MIB
    return {
        "mib_s": mib / duration,
        "p99_ms": result.p99_ms,
        "cpu_ms_per_mib": used * 1e3 / mib,
    }


def _small_once(child: Child, duration: float) -> dict[str, float]:
    tools = discover()
    assert tools.wrk is not None, "wrk not found"
    url = f"http://127.0.0.1:{child.port}/small"
    wrk.run(tools.wrk, url, connections=64, duration=1)  # warm-up
    before = child.cpu_seconds()
    result = wrk.run(tools.wrk, url, connections=64, duration=duration)
    used = child.cpu_seconds() - before
    if result.errors or result.non_2xx or not result.requests:
        raise SystemExit(f"wrk saw errors: {result}")
    return {
        "req_s": result.requests / duration,
        "p99_ms": result.p99_ms,
        "cpu_us_per_req": used * 1e6 / result.requests,
    }


def _measure(args: argparse.Namespace) -> None:
    pin_self(CORE_LOAD)
    raise_nofile_limit()
    kind = "sse" if args.scenario == "sse" else "http"
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        os.chmod(tmp, 0o755)  # nginx's worker (another user) reads the files in it
        workdir = Path(tmp)
        backend = _backend(kind, workdir)
        try:
            runs: list[dict[str, float]] = []
            for rep in range(args.reps):
                child = _contender(
                    args.target,
                    free_port(),
                    f"127.0.0.1:{backend.port}",
                    workdir,
                    stream=kind == "sse",
                    src=args.trioproxy_src,
                )
                try:
                    if kind == "sse":
                        loadgen.sse_fanout(child.port, streams=args.streams, duration=1.0)  # warm
                        figures = _sse_once(child, args.streams, args.duration)
                    elif args.scenario == "small":
                        figures = _small_once(child, args.duration)
                    else:
                        upload = 10 * MIB if args.scenario == "upload" else 0
                        figures = _download_once(child, args.duration, upload=upload)
                finally:
                    child.stop()
                runs.append(figures)
                print(
                    f"{args.target} {args.scenario} rep {rep + 1}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()),
                    flush=True,
                )
        finally:
            backend.stop()
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"{args.target} {args.scenario} median of {len(runs)}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in medians.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("relay", help="run the bare relay alone")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--upstream", required=True, help="HOST:PORT")
    modes = run.add_mutually_exclusive_group()
    modes.add_argument("--lowlevel", action="store_true", help="raw sockets, no SocketStream")
    modes.add_argument("--hub", action="store_true", help="one task relays every pair")
    for name in ("sse", "download", "upload", "small"):
        m = sub.add_parser(name, help=f"measure the {name} scenario")
        m.add_argument(
            "--target",
            default="relay",
            choices=(
                "relay",
                "relay-lowlevel",
                "relay-hub",
                "trioproxy",
                "trioproxy-h11",
                "nginx",
            ),
        )
        m.add_argument("--duration", type=float, default=5.0)
        m.add_argument("--reps", type=int, default=3)
        m.add_argument("--streams", type=int, default=1000)
        m.add_argument(
            "--trioproxy-src",
            type=Path,
            default=REPO_DIR,
            help="run trioproxy from this tree (e.g. a `git archive` of another commit)",
        )
    args = parser.parse_args()
    if args.command == "relay":
        host, _, port = args.upstream.rpartition(":")
        try:
            mode = "hub" if args.hub else "lowlevel" if args.lowlevel else "stream"
            trio.run(relay, args.port, (host, int(port)), mode)
        except KeyboardInterrupt:
            pass
        return
    args.scenario = args.command
    _measure(args)


if __name__ == "__main__":
    main()
