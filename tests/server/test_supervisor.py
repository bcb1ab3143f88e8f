"""The supervisor's sans-I/O rules and the shared listening sockets
(the processes themselves: tests/e2e/test_workers.py)."""

from __future__ import annotations

import socket

import pytest

from trioproxy.server.reuseport import bind_sockets, reuse_port_supported
from trioproxy.server.supervisor import (
    CRASH_LIMIT,
    MAX_BACKOFF,
    STABLE_AFTER,
    backoff,
    describe_exit,
)
from trioproxy.server.worker import WorkerSettings


def test_describe_exit_names_the_status_or_the_signal() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(2) == "exited with status 2"
    assert describe_exit(-9) == "killed by signal SIGKILL"
    assert describe_exit(-15) == "killed by signal SIGTERM"


def test_backoff_doubles_up_to_its_ceiling() -> None:
    delays = [backoff(n) for n in range(1, 10)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays == sorted(delays) and max(delays) == MAX_BACKOFF
    # A crash loop is declared long before the ceiling makes restarts slow: the
    # deaths before it cost at most a few seconds of waiting.
    assert sum(backoff(n) for n in range(1, CRASH_LIMIT)) < 2.0 < STABLE_AFTER


def test_worker_settings_round_trip_through_the_environment() -> None:
    settings = WorkerSettings(id=1, port=8080, control_fd=7, listen_fds=(8, 9))
    assert WorkerSettings.from_environ(settings.environ()) == settings
    assert WorkerSettings.from_environ({"TRIOPROXY_WORKERS": "2"}) is None
    plain = WorkerSettings(id=0, port=1, control_fd=3)
    assert WorkerSettings.from_environ(plain.environ()) == plain


@pytest.mark.skipif(not reuse_port_supported(), reason="SO_REUSEPORT spreads only on Linux")
def test_a_reserved_port_is_shared_by_listeners_and_takes_no_connection() -> None:
    # The supervisor's socket: bound, not listening.
    (held,) = bind_sockets("127.0.0.1", 0, reuse_port=True, listen=False)
    port = held.getsockname()[1]
    try:
        # Nobody listens yet: a connection is refused, not queued on the held socket.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # Two workers' listeners on the same port.
        (one,) = bind_sockets("127.0.0.1", port, reuse_port=True)
        (two,) = bind_sockets("127.0.0.1", port, reuse_port=True)
        try:
            clients = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(32)]
            accepted = []
            for listener in (one, two):
                listener.setblocking(False)
                while True:
                    try:
                        accepted.append((listener, listener.accept()[0]))
                    except BlockingIOError:
                        break
            assert len(accepted) == 32
            assert {listener for listener, _ in accepted} == {one, two}
            for _, conn in accepted:
                conn.close()
            for client in clients:
                client.close()
            # While workers listen, a listener without SO_REUSEPORT cannot have the port.
            with pytest.raises(OSError):
                bind_sockets("127.0.0.1", port, reuse_port=False)
        finally:
            one.close()
            two.close()
    finally:
        held.close()
