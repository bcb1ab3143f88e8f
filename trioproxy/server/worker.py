"""One worker of several: what the supervisor tells it, and what it tells back.

The supervisor (``trioproxy.server.supervisor``) starts each worker as
``python -m trioproxy`` with the supervisor's own arguments, environment and
working directory, so a worker reads its configuration from the same sources and
reloads from them on SIGHUP as a lone proxy does. What makes it a worker is a few
variables outside the ``TRIOPROXY_*`` namespace of the configuration:

``_TRIOPROXY_WORKER_ID``
    its number, 0 to N-1 (a restarted worker keeps its number);
``_TRIOPROXY_WORKER_PORT``
    the proxy port the supervisor chose and holds (``port = 0`` picks it once);
``_TRIOPROXY_WORKER_FD``
    its end of a socket pair with the supervisor: the worker writes one JSON line
    there once it accepts (``{"id", "pid", "admin": [host, port]}``); end of file
    on it means the supervisor is gone, and the worker drains and exits;
``_TRIOPROXY_WORKER_LISTEN_FDS``
    where ``SO_REUSEPORT`` is missing: the listening sockets it inherited.

A worker binds its own ``SO_REUSEPORT`` listener, serves its admin endpoints on
127.0.0.1 with a free port (the supervisor's admin listener reads them), prints
no ``listening on`` line (the supervisor prints one for all), watches no files
(the supervisor does, and validates before any worker reloads), and tags its log
lines with its number.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence

import attrs
import trio

from trioproxy.config.model import AdminSettings, Config

log = logging.getLogger("trioproxy.worker")

ENV_ID = "_TRIOPROXY_WORKER_ID"
ENV_PORT = "_TRIOPROXY_WORKER_PORT"
ENV_FD = "_TRIOPROXY_WORKER_FD"
ENV_LISTEN_FDS = "_TRIOPROXY_WORKER_LISTEN_FDS"


@attrs.frozen
class WorkerSettings:
    """What the supervisor passed a worker (see the module docstring)."""

    id: int
    port: int
    control_fd: int
    listen_fds: tuple[int, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSettings | None:
        """The settings, or None in a process the supervisor did not start."""
        if ENV_ID not in environ:
            return None
        fds = environ.get(ENV_LISTEN_FDS, "")
        return cls(
            id=int(environ[ENV_ID]),
            port=int(environ[ENV_PORT]),
            control_fd=int(environ[ENV_FD]),
            listen_fds=tuple(int(fd) for fd in fds.split(",") if fd),
        )

    def environ(self) -> dict[str, str]:
        """The variables that say these settings to the worker process."""
        return {
            ENV_ID: str(self.id),
            ENV_PORT: str(self.port),
            ENV_FD: str(self.control_fd),
            ENV_LISTEN_FDS: ",".join(str(fd) for fd in self.listen_fds),
        }

    def sockets(self) -> list[socket.socket]:
        """The inherited listening sockets (none where the worker binds its own)."""
        return [socket.socket(fileno=fd) for fd in self.listen_fds]

    def log_format(self) -> str:
        """The log line format: the lone proxy's, with the worker's number."""
        return f"%(asctime)s %(levelname)s %(name)s[worker {self.id}]: %(message)s"


def worker_config(config: Config, worker: WorkerSettings) -> Config:
    """``config`` as a worker serves it: on the supervisor's port, with a private
    admin listener, watching no file (see the module docstring)."""
    server = attrs.evolve(
        config.server,
        port=worker.port,
        workers=1,
        admin=AdminSettings(host="127.0.0.1", port=0),
    )
    return attrs.evolve(config, server=server, watch=False)


def worker_loader(load: Callable[[], Config], worker: WorkerSettings) -> Callable[[], Config]:
    """``load`` (the reload of a lone proxy), its result as the worker serves it."""
    return lambda: worker_config(load(), worker)


async def report_ready(
    worker: WorkerSettings,
    admin: Sequence[tuple[str, int]],
    shutdown: Callable[[], None],
) -> None:
    """Tell the supervisor this worker accepts, then wait on the control socket:
    when the supervisor is gone (end of file, or the socket broke), ``shutdown``.

    Resource handling: the control socket is closed on the way out.
    """
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=worker.control_fd))
    stream = trio.SocketStream(sock)
    try:
        line = {"id": worker.id, "pid": os.getpid(), "admin": list(admin[0]) if admin else None}
        await stream.send_all(json.dumps(line).encode() + b"\n")
        while await stream.receive_some(4096):
            pass  # the supervisor says nothing else (yet)
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    log.warning("the supervisor is gone; draining")
    shutdown()
