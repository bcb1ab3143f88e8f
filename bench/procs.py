"""Child processes of a run: start them pinned to a core, wait until they answer, watch
their CPU and memory, stop them.

Every child is started in its own session, so that stopping it reaches the workers it
forked (nginx's worker, granian's worker) and nothing it started outlives the run. The
two cores of the machine are split once for the whole run: the contender alone on
:data:`CORE_PROXY`; the load generators, the back ends and this process on
:data:`CORE_LOAD`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import psutil  # type: ignore[import-untyped]  # no stubs in the test extra

CORE_LOAD = 0
CORE_PROXY = 1

#: How long a child may take to answer its first request.
READY_TIMEOUT = 30.0
#: How long a child may take to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """A measurement that must not report numbers (errors seen, a child died, a timeout)."""


#: The cores this process may use, read before :func:`pin_self` narrows them.
_CORES = frozenset(os.sched_getaffinity(0))


def cores_available() -> bool:
    """Whether the two-core split can be made (two cores or more, and ``taskset``)."""
    return {CORE_LOAD, CORE_PROXY} <= _CORES and shutil.which("taskset") is not None


def pinned(argv: Sequence[str], core: int | None) -> list[str]:
    """``argv`` run under ``taskset -c CORE`` when the machine has the cores for it, and
    under ``setpriv --pdeathsig TERM`` when there is one, so that a child is told to stop
    even if this process dies without its cleanup (SIGKILL). ``core=None``: not pinned
    (``bench.workers``, where a contender's workers spread over every core)."""
    prefix = []
    if shutil.which("setpriv"):
        prefix = ["setpriv", "--pdeathsig", "TERM"]
    if core is not None and cores_available():
        prefix += ["taskset", "-c", str(core)]
    return [*prefix, *argv]


def pin_self(core: int = CORE_LOAD) -> None:
    """Pin this process (and the Python load generator in it) to ``core``."""
    if cores_available():
        os.sched_setaffinity(0, {core})


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the child binds it, not us)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it).

    Returns:
        The soft limit now in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def probe_http(port: int, path: str = "/ready", timeout: float = 2.0, tls: bool = False) -> int:
    """One ``GET`` over a fresh connection (over TLS, certificate unchecked, with
    ``tls``); returns the status code.

    Raises:
        OSError: the connection failed or closed before a status line came.
    """
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = stack.enter_context(context.wrap_socket(sock))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before a status line")
            data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    if match is None:
        raise ConnectionError(f"not an HTTP response: {data[:40]!r}")
    return int(match.group(1))


@attrs.define
class Child:
    """A started child process and the log its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def processes(self) -> list[psutil.Process]:
        """The child and everything it forked, as far as they are still alive."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far by the child and its descendants."""
        total = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss(self) -> int:
        """Resident memory of the child and its descendants, in bytes."""
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def established(self) -> int:
        """TCP connections accepted on our port and still established."""
        count = 0
        for proc in self.processes():
            try:
                conns = proc.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            for conn in conns:
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == self.port:
                    count += 1
        return count

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """SIGTERM to the child's session, SIGKILL after :data:`STOP_TIMEOUT`."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
        # Workers a master left behind (it was killed before it could reap them).
        _signal_group(self.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    core: int | None,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready_path: str | None = "/ready",
    ready_timeout: float = READY_TIMEOUT,
    tls: bool = False,
) -> Child:
    """Start ``argv`` pinned to ``core`` and wait until it answers on ``port``.

    Args:
        ready_path: a path that answers 200 once the child (and whatever it proxies to)
            is ready; ``None`` to wait only for the port to accept connections.

    Raises:
        BenchError: the child exited, or did not answer within ``ready_timeout``.

    Resource handling:
        On failure the child is stopped before the error is raised; otherwise the caller
        owns it and must call :meth:`Child.stop`.
    """
    log_path = log_dir / f"{name}-{port}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            pinned(argv, core),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    child = Child(name=name, popen=popen, log_path=log_path, port=port)
    try:
        _wait_ready(child, ready_path, ready_timeout, tls)
    except BaseException:
        child.stop()
        raise
    return child


def _wait_ready(child: Child, ready_path: str | None, timeout: float, tls: bool = False) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            if ready_path is None:
                socket.create_connection(("127.0.0.1", child.port), timeout=1.0).close()
                return
            status = probe_http(child.port, ready_path, tls=tls)
            if status == 200:
                return
            last_error = f"GET {ready_path} answered {status}"
        except OSError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    raise BenchError(
        f"{child.name} did not answer within {timeout:.0f} s ({last_error}):\n{child.log_tail()}"
    )


@attrs.define
class Watch:
    """CPU time used and peak memory of a child over one measurement.

    Memory is sampled every ``interval`` seconds on a thread, so the peak is the largest
    sample, not the kernel's high-water mark (psutil has no portable one for a tree).
    """

    child: Child
    interval: float = 0.1
    peak_rss: int = 0
    _cpu_start: float = 0.0
    _time_start: float = 0.0
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        self._cpu_start = self.child.cpu_seconds()
        self._time_start = time.monotonic()
        self.peak_rss = self.child.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self.child.rss())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.child.rss())

    def restart_cpu(self) -> None:
        """Start the CPU clock again (after a warm-up)."""
        self._cpu_start = self.child.cpu_seconds()
        self._time_start = time.monotonic()

    def cpu_share(self) -> float:
        """CPU time used since the (re)start over wall time: 1.0 is one whole core."""
        elapsed = time.monotonic() - self._time_start
        return (self.child.cpu_seconds() - self._cpu_start) / elapsed if elapsed > 0 else 0.0
