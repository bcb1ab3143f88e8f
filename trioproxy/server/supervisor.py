"""The supervisor of ``--workers N``: N proxy processes, one port, one admin view.

How workers start. Each is ``python -m trioproxy`` again, with the supervisor's
own arguments, environment and working directory, plus the variables of
:mod:`trioproxy.server.worker`. A re-exec rather than ``multiprocessing``: a
worker then reads its configuration from the very sources the supervisor read
(and reads them again on SIGHUP, as a lone proxy does), nothing of a live
``Config`` (compiled regexes, imported body transforms, SSL contexts) has to be
pickled, a worker is a fresh interpreter with nothing inherited from the
supervisor's trio run, and its exit status or signal is the process's own.
Workers run in a process group of their own, so a Ctrl-C at a terminal reaches
the supervisor only, which drains them once (a second signal to a worker means
"stop at once").

The port. On Linux the supervisor binds the proxy address with ``SO_REUSEPORT``
and does not listen on it: it holds the port (``port = 0`` is picked here, once)
and takes no connection. Each worker binds and listens on the same address with
``SO_REUSEPORT``, and the kernel spreads new connections over the workers that
listen. Elsewhere the supervisor listens once and the workers inherit the
socket (:mod:`trioproxy.server.reuseport`).

Lifecycle::

    Supervisor.run
    └─ nursery
       ├─ signals: SIGTERM/SIGINT → drain every worker; SIGHUP → reload
       ├─ file watcher (--watch) → reload
       ├─ admin listener (the only one: /status of every worker, summed /metrics)
       └─ one keeper task per worker number: start, wait for "ready", wait for
          the exit, log why it died, back off, start again

A worker that dies is started again after a backoff (0.1 s, doubling up to 5 s;
a worker that ran for ``STABLE_AFTER`` seconds starts the count afresh). When
one worker number dies ``CRASH_LIMIT`` times in a row without running that long,
the supervisor stops every worker and exits 1. A worker started again that
refuses the configuration (exit status 2: the file was changed into a bad one
after the supervisor checked it, and then the worker died) is no crash: the
others serve on, and it is tried again every ``MAX_BACKOFF`` seconds until the
file is fixed.

Reload: the supervisor reads and checks the whole configuration (as
``--check-config`` does); a bad one is refused and logged, and no worker hears
of it; a good one is announced to every worker with SIGHUP, and each reloads
itself with the guarantees of a lone proxy (requests and streams under way end on
the config they began with).

Drain: SIGTERM to every worker, which drains within ``grace``; a worker still
there ``grace`` + ``KILL_AFTER_GRACE`` seconds later is killed. Then exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from trioproxy.admin import serve_admin
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import Config
from trioproxy.observe.fleet import fleet_exposition
from trioproxy.observe.metrics import CONTENT_TYPE
from trioproxy.server.listener import format_url
from trioproxy.server.reuseport import bind_sockets, reuse_port_supported
from trioproxy.server.watch import watch_files
from trioproxy.server.worker import WorkerSettings
from trioproxy.snapshot import build_snapshot

log = logging.getLogger("trioproxy.supervisor")

#: Set (to anything) in the supervisor's environment: inherited sockets even on Linux.
ENV_NO_REUSEPORT = "_TRIOPROXY_NO_REUSEPORT"
#: A worker's exit status for a configuration it refuses (as ``python -m trioproxy``).
CONFIG_REFUSED = 2
#: A worker that ran this long (seconds) before it died starts the crash count afresh.
STABLE_AFTER = 10.0
#: Quick deaths in a row of one worker number that end the supervisor.
CRASH_LIMIT = 5
#: The first restart's delay, doubled on each quick death, up to ``MAX_BACKOFF``.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0
#: How long a worker may take to report ready before it is killed (a quick death).
START_TIMEOUT = 30.0
#: On drain, seconds past ``grace`` after which a worker still there is killed.
KILL_AFTER_GRACE = 5.0
#: How long the admin listener waits for one worker's answer.
WORKER_ANSWER_TIMEOUT = 2.0


def describe_exit(returncode: int) -> str:
    """``exited with status 3`` or ``killed by signal SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exited with status {returncode}"


def backoff(quick_deaths: int) -> float:
    """Seconds before a restart, after ``quick_deaths`` (>= 1) deaths in a row."""
    return float(min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (quick_deaths - 1)))


@attrs.define
class WorkerSlot:
    """One worker number and the process serving it now."""

    id: int
    process: trio.Process | None = None
    #: starting, ready, restarting or stopped.
    state: str = "starting"
    admin: tuple[str, int] | None = None
    started_at: float | None = None
    restarts: int = 0
    last_exit: str | None = None
    ready: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the supervisor keeps this worker number no more.
    ended: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "pid": self.pid,
            "state": self.state,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


class Supervisor:
    """``await run()`` starts the workers, keeps them, and returns the exit status.

    Args:
        config: the configuration, already checked (``workers`` > 1).
        load: reads and checks the config again (the file, ``.env``, the
            environment, the command line); raises ConfigError.
        argv: the command line arguments the workers get (the supervisor's own).
        watch: files whose change triggers a reload (``--watch``).
    """

    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[], Config],
        argv: Sequence[str],
        watch: Sequence[str] = (),
    ) -> None:
        self.config = config
        self._load = load
        self._argv = list(argv)
        self._watch = tuple(watch)
        self.slots = [WorkerSlot(i) for i in range(config.server.workers)]
        self.stopping = False
        self.status = 0
        self.config_error: str | None = None
        #: Reloads checked good (and sent to every worker), and refused.
        self.reloads = 0
        self.refused = 0
        self._reloading = trio.Lock()
        self._metrics_dir = ""
        # (``_TRIOPROXY_NO_REUSEPORT=1`` takes the other platforms' way here too,
        # so that it is tested on Linux.)
        self._reuse_port = reuse_port_supported() and not os.environ.get(ENV_NO_REUSEPORT)
        self._listen_fds: tuple[int, ...] = ()
        self._port = 0
        self._nursery: trio.Nursery | None = None
        #: Every worker was ready once and ``listening on`` was printed.
        self.listening = False

    # --- run ------------------------------------------------------------------------

    async def run(self) -> int:
        server = self.config.server
        try:
            sockets = bind_sockets(
                server.host, server.port, reuse_port=self._reuse_port, listen=not self._reuse_port
            )
        except OSError as exc:
            print(
                f"trioproxy: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        self._port = int(sockets[0].getsockname()[1])
        address = (str(sockets[0].getsockname()[0]), self._port)
        self._listen_fds = () if self._reuse_port else tuple(s.fileno() for s in sockets)
        self._metrics_dir = tempfile.mkdtemp(prefix="trioproxy-metrics-")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._watch_signals)
                if self._watch:
                    changed = "config file changed, checking it"
                    nursery.start_soon(watch_files, self._watched, self.reload, changed)
                if not await self._serve_admin(nursery):
                    nursery.cancel_scope.cancel()
                    return 1
                for slot in self.slots:
                    nursery.start_soon(self._keep, slot)
                for slot in self.slots:
                    await slot.ready.wait()
                if not self.stopping:
                    scheme = "https" if server.tls is not None else "http"
                    log.info("%d workers ready", len(self.slots))
                    print(f"listening on {format_url(address, scheme)}", flush=True)
                    self.listening = True
                await self._all_stopped()
                nursery.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("stopped")
        return self.status

    async def _serve_admin(self, nursery: trio.Nursery) -> bool:
        """Open the admin listener (before any worker starts); False if it cannot be."""
        admin_settings = self.config.server.admin
        if admin_settings is None:
            return True
        try:
            admin = await nursery.start(
                serve_admin, FleetAdmin(self), admin_settings.host, admin_settings.port
            )
        except OSError as exc:
            print(
                f"trioproxy: cannot listen on {admin_settings.host}:{admin_settings.port} "
                f"(admin): {exc.strerror or exc}",
                file=sys.stderr,
            )
            return False
        log.info("admin listening on %s", format_url(admin[0]))
        return True

    async def _all_stopped(self) -> None:
        for slot in self.slots:
            await slot.ended.wait()

    # --- one worker number ----------------------------------------------------------

    async def _keep(self, slot: WorkerSlot) -> None:
        """Start the worker of ``slot``, and again each time it dies, until the
        supervisor stops or the worker crash-loops."""
        quick_deaths = 0
        while not self.stopping:
            started = time.monotonic()
            await self._start(slot)
            assert slot.process is not None
            if self.stopping and slot.process.returncode is None:
                # Started while the others were told to drain: it drains too.
                slot.process.send_signal(signal.SIGTERM)
            returncode = await slot.process.wait()
            ran = time.monotonic() - started
            was_ready = slot.state == "ready"
            slot.admin = None
            slot.last_exit = describe_exit(returncode)
            if self.stopping:
                log.info("worker %d (pid %s) %s", slot.id, slot.pid, slot.last_exit)
                break
            try:
                from prometheus_client.multiprocess import mark_process_dead

                mark_process_dead(slot.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            except OSError:
                pass
            if returncode == CONFIG_REFUSED and not was_ready and self.listening:
                # Not a crash: the config as it reads now is refused (a file edited
                # after a refused reload). The others serve on; retry until it is fixed.
                slot.state = "restarting"
                slot.restarts += 1
                log.error(
                    "worker %d (pid %s) refused the config as it reads now (exit status 2, "
                    "its errors are above); the other workers serve on; retrying in %.1f s",
                    slot.id,
                    slot.pid,
                    MAX_BACKOFF,
                )
                await trio.sleep(MAX_BACKOFF)
                continue
            quick_deaths = 1 if ran >= STABLE_AFTER else quick_deaths + 1
            if quick_deaths >= CRASH_LIMIT:
                log.critical(
                    "worker %d (pid %s) %s after %.1f s, %d quick deaths in a row: "
                    "crash loop, stopping",
                    slot.id,
                    slot.pid,
                    slot.last_exit,
                    ran,
                    quick_deaths,
                )
                slot.state = "stopped"
                self.status = 1
                self.stop()
                break
            delay = backoff(quick_deaths)
            log.error(
                "worker %d (pid %s) %s after %.1f s; restarting in %.1f s",
                slot.id,
                slot.pid,
                slot.last_exit,
                ran,
                delay,
            )
            slot.state = "restarting"
            slot.restarts += 1
            await trio.sleep(delay)
        slot.state = "stopped"
        slot.ready.set()  # (a start that never became ready must not hold up run)
        slot.ended.set()

    async def _start(self, slot: WorkerSlot) -> None:
        """Start the worker process of ``slot`` and wait for its ready line (or its end)."""
        ours, theirs = socket.socketpair()
        settings = WorkerSettings(
            id=slot.id, port=self._port, control_fd=theirs.fileno(), listen_fds=self._listen_fds
        )
        env = {
            **os.environ,
            **settings.environ(),
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
        }
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trioproxy", *self._argv],
                env=env,
                pass_fds=(theirs.fileno(), *self._listen_fds),
                process_group=0,
            )
        finally:
            theirs.close()
        slot.process = process
        slot.state = "starting"
        slot.started_at = time.time()
        control = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        # The control socket lives as long as the worker: its end of file tells the
        # worker the supervisor is gone. Closed when the process has ended.
        line = b""
        with trio.move_on_after(START_TIMEOUT) as timeout:
            while b"\n" not in line:
                try:
                    data = await control.receive_some(4096)
                except (trio.BrokenResourceError, OSError):
                    data = b""
                if not data:
                    break
                line += data
        if b"\n" in line:
            report = json.loads(line.split(b"\n", 1)[0])
            admin = report.get("admin")
            slot.admin = (str(admin[0]), int(admin[1])) if admin else None
            slot.state = "ready"
            slot.ready.set()
            log.info("worker %d (pid %d) ready", slot.id, process.pid)
        elif timeout.cancelled_caught:
            log.error(
                "worker %d (pid %d) not ready after %.0f s; killing it",
                slot.id,
                process.pid,
                START_TIMEOUT,
            )
            process.kill()
        self._hold(control, process)

    def _hold(self, control: trio.SocketStream, process: trio.Process) -> None:
        """Keep ``control`` open until ``process`` ends (see ``_start``)."""
        assert self._nursery is not None
        self._nursery.start_soon(self._close_after, control, process)

    async def _close_after(self, control: trio.SocketStream, process: trio.Process) -> None:
        try:
            await process.wait()
        finally:
            await trio.aclose_forcefully(control)

    # --- signals, reload, stop ------------------------------------------------------

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async with trio.open_nursery() as reloads:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP, checking the config")
                        reloads.start_soon(self.reload)
                    elif self.stopping:
                        log.warning("received %s again, stopping the workers now", name)
                        self._signal_workers(signal.SIGTERM)
                    else:
                        log.info("received %s, draining %d workers", name, len(self.slots))
                        self.stop()

    def stop(self) -> None:
        """Drain every worker (SIGTERM); kill what is left after grace (idempotent)."""
        if self.stopping:
            return
        self.stopping = True
        self._signal_workers(signal.SIGTERM)
        assert self._nursery is not None
        self._nursery.start_soon(self._kill_after_grace)

    async def _kill_after_grace(self) -> None:
        await trio.sleep(self.config.server.grace + KILL_AFTER_GRACE)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error(
                    "worker %d (pid %s) still there after grace; killing it", slot.id, slot.pid
                )
                slot.process.kill()

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def reload(self) -> bool:
        """Check the config once, here; if it is good, every worker reloads it."""
        async with self._reloading:
            try:
                config = self._load()
                build_snapshot(config)
            except ConfigError as exc:
                lines = str(exc).splitlines() or [repr(exc)]
                more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
                self.config_error = f"{lines[0]}{more}"
                self.refused += 1
                log.error(
                    "reload refused, the config in use stays (no worker was told): %s",
                    self.config_error,
                )
                return False
            if config.server.workers != self.config.server.workers:
                log.warning("reload: a new number of workers needs a restart")
            self.config_error = None
            self.reloads += 1
            # (The number of workers, the listener and the admin listener stay as
            # they were started; grace and the rest apply from now on.)
            self.config = attrs.evolve(
                config, server=attrs.evolve(config.server, workers=len(self.slots))
            )
            log.info("config OK, every worker reloads it")
            self._signal_workers(signal.SIGHUP)
            return True

    def _watched(self) -> Sequence[str]:
        """The files ``--watch`` polls (as ``ProxyServer._watched``)."""
        return (*self._watch, *self.config.files_read())

    # --- one view -------------------------------------------------------------------

    async def ask(self, slot: WorkerSlot, path: str) -> tuple[int, bytes] | None:
        """GET ``path`` from the worker's admin listener; None if it does not answer."""
        if slot.admin is None or slot.state != "ready":
            return None
        with trio.move_on_after(WORKER_ANSWER_TIMEOUT):
            try:
                return await http_get(slot.admin, path)
            except (OSError, trio.BrokenResourceError, ValueError):
                return None
        return None

    async def ask_all(self, path: str) -> dict[int, tuple[int, bytes] | None]:
        answers: dict[int, tuple[int, bytes] | None] = {}

        async def one(slot: WorkerSlot) -> None:
            answers[slot.id] = await self.ask(slot, path)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(one, slot)
        return answers

    @property
    def metrics_dir(self) -> str:
        return self._metrics_dir


async def http_get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    """A GET of ``path`` on the admin listener at ``address`` (one request per
    connection, the body up to the end of the connection).

    Raises:
        OSError, trio.BrokenResourceError: connecting or reading failed.
        ValueError: the answer is no HTTP response.
    """
    stream = await trio.open_tcp_stream(*address)
    try:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode()
        )
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    finally:
        await trio.aclose_forcefully(stream)
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no response head")
    status = int(head.split(b" ", 2)[1])
    return status, body


class FleetAdmin:
    """The admin endpoints of every worker together (see ``trioproxy.admin``)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def respond(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"text/plain; charset=utf-8", b"method not allowed\n"
        sup = self.supervisor
        if path == b"/ping":
            return 200, b"text/plain; charset=utf-8", b"pong\n"
        if path == b"/metrics":
            if not sup.config.server.metrics:
                return 404, b"text/plain; charset=utf-8", b"metrics are off\n"
            answers = await sup.ask_all("/metrics")
            texts = {
                worker: answer[1].decode("utf-8", "replace")
                for worker, answer in answers.items()
                if answer is not None and answer[0] == 200
            }
            reloads = {"success": sup.reloads, "failure": sup.refused}
            return 200, CONTENT_TYPE, fleet_exposition(sup.metrics_dir, texts, reloads)
        if path == b"/health":
            answers = await sup.ask_all("/health")
            ok = any(a is not None and a[0] == 200 for a in answers.values())
            body = {
                "status": "ok" if ok else "unavailable",
                "workers": {
                    str(worker): _json_or_none(answer) for worker, answer in answers.items()
                },
            }
            return (200 if ok else 503), b"application/json", _dump(body)
        if path == b"/status":
            answers = await sup.ask_all("/status")
            workers = []
            for slot in sup.slots:
                entry = slot.summary()
                entry["status"] = _json_or_none(answers.get(slot.id))
                workers.append(entry)
            status = {
                "supervisor": {
                    "pid": os.getpid(),
                    "workers": len(sup.slots),
                    "config": {
                        "reloads": sup.reloads,
                        "refused": sup.refused,
                        "last_error": sup.config_error,
                    },
                },
                "workers": workers,
            }
            return 200, b"application/json", _dump(status)
        return 404, b"text/plain; charset=utf-8", b"not found\n"


def _json_or_none(answer: tuple[int, bytes] | None) -> object:
    if answer is None:
        return None
    try:
        return json.loads(answer[1])
    except ValueError:
        return None


def _dump(value: object) -> bytes:
    return json.dumps(value, indent=2).encode() + b"\n"
