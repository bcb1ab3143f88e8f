"""The proxy out of file descriptors (its ``RLIMIT_NOFILE`` reached), as a real process.

What a user notices: a request that cannot get an upstream connection is answered 503
with ``Retry-After`` (the proxy is overloaded; a 502 would blame the upstream), the proxy
keeps running, and once clients go the next request is served at once. Running out of
descriptors is the proxy's own trouble: it must count against neither the upstream's
circuit breaker nor its health, or a burst of clients would take a healthy upstream out
of service for the breaker's 30 s.
"""

from __future__ import annotations

import sys

import httpx
import pytest
import trio
from e2e.resources import Head, fd_count, receive_head, wait_until
from fixtures import REPO_ROOT, run_listening_process

pytestmark = pytest.mark.timeout(30)

#: ``python -c LAUNCH LIMIT ARGS...``: the real CLI, under a lowered descriptor limit.
LAUNCH = (
    "import resource, runpy, sys; "
    "limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)); "
    "runpy.run_module('trioproxy', run_name='__main__', alter_sys=True)"
)
LIMIT = 48
#: More clients than the limit leaves room for; the kernel queues the rest.
CLIENTS = 80
#: How many of the accepted clients send a request while the proxy is out of fds:
#: more than the breaker's threshold (5 failures in 10 s) and the health checks' fall.
ASKING = 8


async def _answer(stream: trio.SocketStream) -> tuple[Head, bytes]:
    """Head and body of one response (the body framed by Content-Length)."""
    head, body = await receive_head(stream)
    length = int(head.headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return head, body


async def test_out_of_descriptors_answers_503_then_serves_at_once(upstream: str) -> None:
    command = [sys.executable, "-c", LAUNCH, str(LIMIT), "--host", "127.0.0.1", "--port", "0"]
    command += ["--upstream", upstream, "--health-interval", "0.2", "--log-level", "info"]
    async with run_listening_process(command, cwd=REPO_ROOT) as proxy:
        clients: list[trio.SocketStream] = []
        try:
            with trio.fail_after(15):
                for _ in range(CLIENTS):
                    clients.append(await trio.open_tcp_stream(proxy.host, proxy.port))
                # The proxy takes connections until it has no descriptor left.
                assert await wait_until(lambda: fd_count(proxy.pid) >= LIMIT - 1, within=5), (
                    f"the proxy holds {fd_count(proxy.pid)} fds, short of its limit {LIMIT}"
                )
                await trio.sleep(0.5)  # health probes meet the limit too
                # The kernel hands connections over in order: the first ones are accepted.
                answers = []
                for stream in clients[:ASKING]:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                    answers.append(await _answer(stream))
        finally:
            for stream in clients:
                await trio.aclose_forcefully(stream)
        with trio.fail_after(5):
            assert await wait_until(lambda: fd_count(proxy.pid) < LIMIT // 2, within=3)
            async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
                after = await client.get(f"{proxy.url}/")
        stderr = await proxy.settled_stderr()
    statuses = [head.status for head, _ in answers]
    assert statuses == [503] * ASKING, statuses
    for head, body in answers:
        assert head.headers.get(b"retry-after") == b"1", head
        assert body.startswith(b"503") and len(body) < 200, body
        assert b"Traceback" not in body and b"Errno" not in body, body
    # The upstream was never at fault: no breaker opened, no health verdict changed.
    assert after.status_code == 200, after.text
    assert "breaker" not in stderr, stderr
    assert "unhealthy" not in stderr, stderr
    assert "Too many open files" in stderr
    assert "Traceback" not in stderr
