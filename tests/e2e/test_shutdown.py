"""SIGTERM and SIGINT drain the real proxy process: stop accepting, let the requests in
flight finish within ``--grace``, close idle connections, exit 0; a second signal stops
it at once.

Each test waits until the proxy holds a connection to the upstream (seen from outside
with ``psutil``) before it signals, so that "in flight" is a fact, not a guess.
"""

from __future__ import annotations

import signal

import pytest
import trio
from e2e.resources import (
    READ_SIZE,
    Head,
    connections_to,
    open_request,
    receive_head,
    receive_until_eof,
    wait_until,
)
from fixtures import ProxyProcess, run_proxy

#: How soon after the signal the listening socket must refuse connections.
REFUSE_WITHIN = 0.5


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _start_in_flight(proxy: ProxyProcess, upstream: str, target: str) -> trio.SocketStream:
    """Send ``GET target`` and wait until the proxy has connected upstream for it."""
    stream = await open_request(
        proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    )
    reached = await wait_until(lambda: connections_to(proxy.pid, _port(upstream)) > 0, within=5)
    assert reached, "the proxy never connected to the upstream"
    # Let the request head cross too.
    await trio.sleep(0.05)
    return stream


async def _read_response(stream: trio.SocketStream) -> tuple[Head, bytes]:
    head, body = await receive_head(stream)
    while len(body) < int(head.headers[b"content-length"]):
        data = await stream.receive_some(READ_SIZE)
        assert data, f"EOF in the body after {body!r}"
        body += data
    return head, body


async def _refused_after(proxy: ProxyProcess, signalled: float, *, within: float) -> float | None:
    """Connect every 10 ms until the proxy refuses; seconds from ``signalled``, or None."""
    deadline = trio.current_time() + within
    while trio.current_time() < deadline:
        try:
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
        except OSError:
            return trio.current_time() - signalled
        await trio.aclose_forcefully(stream)
        await trio.sleep(0.01)
    return None


async def _exit_after(proxy: ProxyProcess, signalled: float, *, within: float) -> float:
    with trio.move_on_after(within):
        await proxy.process.wait()
    assert proxy.returncode is not None, f"still running {within} s after the signal"
    return trio.current_time() - signalled


async def test_sigterm_lets_the_request_in_flight_finish(upstream: str) -> None:
    async with run_proxy("--upstream", upstream) as proxy:
        with trio.fail_after(15):
            stream = await _start_in_flight(proxy, upstream, "/slow?delay=1")
            try:
                signalled = trio.current_time()
                proxy.process.send_signal(signal.SIGTERM)
                refused = await _refused_after(proxy, signalled, within=2)
                head, body = await _read_response(stream)
                answered = trio.current_time() - signalled
                tail, ending = await receive_until_eof(stream)
            finally:
                await trio.aclose_forcefully(stream)
            exited = await _exit_after(proxy, signalled, within=5)
    print(
        f"\nSIGTERM in flight: refused new connections after "
        f"{'never' if refused is None else f'{refused * 1000:.1f} ms'}, "
        f"answered after {answered:.2f} s, exited {proxy.returncode} after {exited:.2f} s"
    )
    assert (head.status, body) == (200, b"slow done")
    # Draining: the response says so, and the connection ends after it.
    assert head.headers.get(b"connection", b"").lower() == b"close"
    assert (tail, ending) == (b"", "eof")
    assert refused is not None and refused < REFUSE_WITHIN, "still accepting after the signal"
    assert proxy.returncode == 0
    assert exited < answered + 1.0


async def test_sigterm_closes_an_idle_keepalive_connection(upstream: str) -> None:
    async with run_proxy("--upstream", upstream) as proxy:
        with trio.fail_after(10):
            stream = await open_request(
                proxy.host, proxy.port, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
            )
            try:
                head, body = await _read_response(stream)
                assert (head.status, body) == (200, b"ok")
                signalled = trio.current_time()
                proxy.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(3):
                    rest, ending = await receive_until_eof(stream)
                closed = trio.current_time() - signalled
            finally:
                await trio.aclose_forcefully(stream)
            exited = await _exit_after(proxy, signalled, within=5)
    print(
        f"\nSIGTERM with an idle keep-alive client: closed after {closed * 1000:.1f} ms, "
        f"exited {proxy.returncode} after {exited * 1000:.0f} ms"
    )
    assert (rest, ending) == (b"", "eof")
    assert closed < 2.0
    assert proxy.returncode == 0
    assert exited < 2.0


async def test_grace_period_cuts_a_long_request_short(upstream: str) -> None:
    async with run_proxy("--upstream", upstream, "--grace", "0.5") as proxy:
        with trio.fail_after(15):
            stream = await _start_in_flight(proxy, upstream, "/slow?delay=10")
            try:
                signalled = trio.current_time()
                proxy.process.send_signal(signal.SIGTERM)
                ending = "hang"
                with trio.move_on_after(5):
                    received, ending = await receive_until_eof(stream)
                closed = trio.current_time() - signalled
            finally:
                await trio.aclose_forcefully(stream)
            exited = await _exit_after(proxy, signalled, within=5)
    print(
        f"\n--grace 0.5 with a 10 s request: client saw {ending} after {closed:.2f} s, "
        f"exited {proxy.returncode} after {exited:.2f} s"
    )
    assert ending in ("eof", "reset")
    assert b"slow done" not in received
    assert 0.5 <= closed < 1.5
    assert proxy.returncode == 0
    assert exited < 1.5


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_second_signal_during_drain_stops_at_once(
    upstream: str, second: signal.Signals
) -> None:
    async with run_proxy("--upstream", upstream) as proxy:  # default grace: 10 s
        with trio.fail_after(15):
            stream = await _start_in_flight(proxy, upstream, "/slow?delay=10")
            try:
                proxy.process.send_signal(signal.SIGINT)
                await proxy.wait_for_stderr("draining")
                await trio.sleep(0.1)
                assert proxy.returncode is None, "exited on the first signal"
                signalled = trio.current_time()
                proxy.process.send_signal(second)
                ending = "hang"
                with trio.move_on_after(5):
                    received, ending = await receive_until_eof(stream)
                closed = trio.current_time() - signalled
            finally:
                await trio.aclose_forcefully(stream)
            exited = await _exit_after(proxy, signalled, within=5)
    print(
        f"\nSIGINT then {second.name}: client saw {ending} after {closed * 1000:.0f} ms, "
        f"exited {proxy.returncode} after {exited * 1000:.0f} ms"
    )
    assert ending in ("eof", "reset")
    assert b"slow done" not in received
    assert closed < 1.0
    assert exited < 1.0
    assert proxy.returncode == 0
