"""The floor: what a bare trio relay costs on the bench's own SSE and download loads.

``python -m bench.floor sse|download|upload --target T`` starts the scenario's back end
(the bench's SSE server, or its nginx) and a contender, loads it the way the bench does
(same pinning: the contender on core 1; back end, load and this process on core 0;
1000 SSE streams, or wrk with 8 connections on 1 MiB bodies / 4 on 10 MiB uploads) and
prints, per repetition and as medians, the latency or throughput and the contender's
**CPU time per unit of work** (µs per SSE event, ms per MiB): the figure that survives a
shared machine. Every repetition starts the contender afresh and warms it up first.

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
``trioproxy``, ``trioproxy-h11``
    ``python -m trioproxy`` (``--http auto`` / ``--http h11``) with the bench's flags,
    from this checkout or ``--trioproxy-src DIR``.
``nginx``
    nginx as a reverse proxy, configured as in the bench.

``python -m bench.floor relay --port P --upstream HOST:PORT [--lowlevel]`` runs the
bare relay alone (what ``--target relay`` starts).
"""

from __future__ import annotations

import argparse
import os
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


async def relay(port: int, upstream: tuple[str, int], lowlevel: bool = False) -> None:
    """Accept on 127.0.0.1:``port`` and relay every connection to ``upstream``."""
    pump = _pump_lowlevel if lowlevel else _pump

    async def handler(client: trio.SocketStream) -> None:
        await _relay_one(client, upstream, pump)

    await trio.serve_tcp(handler, port, host="127.0.0.1", backlog=4096)


# --- contenders -------------------------------------------------------------------------


def _contender(
    target: str, port: int, upstream: str, workdir: Path, *, stream: bool, src: Path
) -> Child:
    if target in ("relay", "relay-lowlevel"):
        argv = [sys.executable, "-m", "bench.floor", "relay", "--port", str(port)]
        argv += ["--upstream", upstream] + (["--lowlevel"] if target == "relay-lowlevel" else [])
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
    run.add_argument("--lowlevel", action="store_true", help="raw sockets, no SocketStream")
    for name in ("sse", "download", "upload"):
        m = sub.add_parser(name, help=f"measure the {name} scenario")
        m.add_argument(
            "--target",
            default="relay",
            choices=("relay", "relay-lowlevel", "trioproxy", "trioproxy-h11", "nginx"),
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
            trio.run(relay, args.port, (host, int(port)), args.lowlevel)
        except KeyboardInterrupt:
            pass
        return
    args.scenario = args.command
    _measure(args)


if __name__ == "__main__":
    main()
