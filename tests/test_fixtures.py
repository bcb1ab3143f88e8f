"""The test harness itself: the upstream app's endpoints hit directly, the fault-injection
server, and the raw client. If these fail, no end-to-end result means anything.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio_websocket
from fixtures import (
    raw_request,
    read_head,
    reset,
    run_listening_process,
    run_proxy,
    serve_asgi,
    serve_tcp_handler,
)
from upstream_app import app, pattern_bytes, pattern_sha256


async def test_root_and_unknown_path(upstream: str, http_client: httpx.AsyncClient) -> None:
    root = await http_client.get(upstream + "/")
    missing = await http_client.get(upstream + "/nope")
    assert (root.status_code, root.text) == (200, "ok")
    assert missing.status_code == 404


async def test_echo_reports_target_headers_and_body(
    upstream: str, http_client: httpx.AsyncClient
) -> None:
    body = b"hello upstream" * 1000
    response = await http_client.post(
        upstream + "/echo/a%2Fb?x=1&y=%20&x=2",
        content=body,
        headers=[("X-Repeat", "one"), ("X-Repeat", "two"), ("X-Other", "v")],
    )
    echo = response.json()
    assert echo["method"] == "POST"
    # Not decoded, not normalised, repeated query keys kept in order.
    assert echo["target"] == "/echo/a%2Fb?x=1&y=%20&x=2"
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    repeated = [value for name, value in echo["headers"] if name == "x-repeat"]
    assert repeated == ["one", "two"]
    names = [name for name, _ in echo["headers"]]
    assert names.index("x-repeat") < names.index("x-other")


async def test_echo_without_query_or_body(upstream: str, http_client: httpx.AsyncClient) -> None:
    echo = (await http_client.request("DELETE", upstream + "/echo")).json()
    assert (echo["method"], echo["target"], echo["body_len"]) == ("DELETE", "/echo", 0)
    assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("chunked", [False, True])
async def test_bytes_streams_the_pattern(
    upstream: str, http_client: httpx.AsyncClient, chunked: bool
) -> None:
    size = 3 * 64 * 1024 + 1000
    url = upstream + f"/bytes/{size}" + ("?chunked=1" if chunked else "")
    digest = hashlib.sha256()
    received = 0
    async with http_client.stream("GET", url) as response:
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert (
        digest.hexdigest()
        == pattern_sha256(size)
        == hashlib.sha256(pattern_bytes(size)).hexdigest()
    )
    if chunked:
        assert "content-length" not in response.headers
        assert response.headers["transfer-encoding"] == "chunked"
    else:
        assert response.headers["content-length"] == str(size)


def test_pattern_bytes() -> None:
    assert pattern_bytes(0) == b""
    assert pattern_bytes(258) == bytes(range(256)) + b"\x00\x01"


async def test_upload_hashes_a_streamed_body(upstream: str, http_client: httpx.AsyncClient) -> None:
    parts = [b"x" * 100_000, b"y" * 50_000, b"z"]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    response = await http_client.put(upstream + "/upload", content=body())
    whole = b"".join(parts)
    assert response.json() == {"len": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


async def test_sse_sends_n_events_apart(upstream: str, http_client: httpx.AsyncClient) -> None:
    events: list[dict[str, object]] = []
    arrival: list[float] = []
    async with http_client.stream(
        "GET", upstream + "/sse?n=4&interval=0.05", headers={"Last-Event-ID": "41"}
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        buffer = ""
        async for text in response.aiter_text():
            buffer += text
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in event.splitlines())
                events.append({"id": fields["id"], **json.loads(fields["data"])})
                arrival.append(trio.current_time())
    assert [event["id"] for event in events] == ["0", "1", "2", "3"]
    assert [event["i"] for event in events] == [0, 1, 2, 3]
    assert events[0]["last_event_id"] == "41"
    assert "last_event_id" not in events[1]
    # Each event is flushed on its own, not buffered to the end.
    assert arrival[-1] - arrival[0] >= 0.1
    assert events[3]["t"] > events[0]["t"]  # type: ignore[operator]


async def test_slow_status_and_cookies(upstream: str, http_client: httpx.AsyncClient) -> None:
    start = trio.current_time()
    slow = await http_client.get(upstream + "/slow?delay=0.2")
    assert (slow.status_code, slow.text) == (200, "slow done")
    assert trio.current_time() - start >= 0.2

    teapot = await http_client.get(upstream + "/status/418")
    no_content = await http_client.get(upstream + "/status/204")
    assert (teapot.status_code, teapot.text) == (418, "status 418")
    assert (no_content.status_code, no_content.content) == (204, b"")

    cookies = await http_client.get(upstream + "/cookies")
    assert cookies.headers.get_list("set-cookie") == ["a=1", "b=2", "c=3"]
    assert cookies.headers["cache-control"] == "no-cache, private"


async def test_serve_asgi_graceful_shutdown_trigger(nursery: trio.Nursery) -> None:
    stop = trio.Event()
    done = trio.Event()

    async def serve_then_mark_done(task_status: trio.TaskStatus[str]) -> None:
        async with trio.open_nursery() as inner:
            task_status.started(await serve_asgi(app, inner, shutdown_trigger=stop.wait))
        done.set()

    url = await nursery.start(serve_then_mark_done)
    assert url.startswith("http://127.0.0.1:")
    host, port = url.removeprefix("http://").split(":")
    assert (await raw_request(host, int(port), b"GET / HTTP/1.0\r\n\r\n")).endswith(b"\r\n\r\nok")
    stop.set()
    with trio.fail_after(5):
        await done.wait()


async def test_raw_request_sees_malformed_input_rejected(upstream: str) -> None:
    host, port = upstream.removeprefix("http://").split(":")
    answer = await raw_request(host, int(port), b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_fault_injection_server(nursery: trio.Nursery) -> None:
    heads: list[bytes] = []

    async def reset_before_head(stream: trio.SocketStream) -> None:
        heads.append(await read_head(stream))
        await reset(stream)

    async def close_mid_body(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)

    async def never_answer(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    request = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"

    host, port = await serve_tcp_handler(reset_before_head, nursery)
    assert await raw_request(host, port, request) == b""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        with pytest.raises(trio.BrokenResourceError):  # an RST, not a clean EOF
            await stream.receive_some(1024)
    assert heads == [request, request]

    host, port = await serve_tcp_handler(close_mid_body, nursery)
    async with httpx.AsyncClient(trust_env=False) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"http://{host}:{port}/x")

    host, port = await serve_tcp_handler(never_answer, nursery)
    start = trio.current_time()
    assert await raw_request(host, port, request, read_timeout=0.2) == b""
    assert trio.current_time() - start >= 0.2


# A stand-in for the proxy's start-up contract: print the line, then serve until SIGTERM.
_FAKE_SERVER = """
import signal, socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("starting", flush=True)
print("some log line", file=sys.stderr, flush=True)
if sys.argv[1] == "exit":
    sys.exit(3)
if sys.argv[1] != "silent":
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
time.sleep(60)
"""


async def test_run_listening_process_reads_the_address_and_stops_it() -> None:
    command = [sys.executable, "-c", _FAKE_SERVER, "serve"]
    async with run_listening_process(command) as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.pid == server.process.pid
        assert server.returncode is None
        with trio.fail_after(5):
            assert "some log line" in await server.wait_for_stderr("some log line")
        stream = await trio.open_tcp_stream(server.host, server.port)
        await stream.aclose()
    assert server.returncode == -signal.SIGTERM


async def test_run_listening_process_kills_what_ignores_sigterm() -> None:
    command = [sys.executable, "-c", _FAKE_SERVER, "ignore-term"]
    async with run_listening_process(command, stop_within=0.5) as server:
        pass
    assert server.returncode == -signal.SIGKILL


@pytest.mark.parametrize(("mode", "why"), [("exit", "exited"), ("silent", "timed out")])
async def test_run_listening_process_fails_the_test_with_its_output(mode: str, why: str) -> None:
    command = [sys.executable, "-c", _FAKE_SERVER, mode]
    with pytest.raises(pytest.fail.Exception) as failure:
        async with run_listening_process(command, start_within=1):
            raise AssertionError("not reached")
    message = str(failure.value)
    assert message.startswith(f"{why} before printing 'listening on'")
    assert "starting" in message
    assert "some log line" in message


async def test_run_listening_process_passes_the_body_error_through() -> None:
    command = [sys.executable, "-c", _FAKE_SERVER, "serve"]
    with pytest.raises(KeyError):
        async with run_listening_process(command):
            raise KeyError("from the test body")


async def test_websocket_echo(upstream: str) -> None:
    ws_url = upstream.replace("http://", "ws://") + "/ws"
    async with trio_websocket.open_websocket_url(ws_url) as ws:
        await ws.send_message("hello")
        assert await ws.get_message() == "hello"
        await ws.send_message(b"\x00\xff")
        assert await ws.get_message() == b"\x00\xff"
    with pytest.raises(trio_websocket.HandshakeError):
        async with trio_websocket.open_websocket_url(upstream.replace("http://", "ws://") + "/x"):
            pass


async def test_run_proxy_forwards_get_echo(upstream: str, http_client: httpx.AsyncClient) -> None:
    async with run_proxy("--upstream", upstream) as proxy:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}"
        response = await http_client.get(proxy.url + "/echo/x%2Fy?b=2&a=1&b=3")
        assert response.status_code == 200
        echo = response.json()
        assert (echo["method"], echo["target"], echo["body_len"]) == (
            "GET",
            "/echo/x%2Fy?b=2&a=1&b=3",
            0,
        )
        # Without --preserve-host the upstream sees its own authority.
        hosts = [value for name, value in echo["headers"] if name == "host"]
        assert hosts == [upstream.removeprefix("http://")]
    # SIGTERM drains and exits cleanly.
    assert proxy.returncode == 0
