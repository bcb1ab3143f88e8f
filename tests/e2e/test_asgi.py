"""The ASGI front end in real hypercorn processes: what only it has (HTTP/2 and TLS
from hypercorn, lifespan, create_app) and the FastAPI helpers in front of two
upstreams (``examples/fastapi_gateway.py``).

The cases it shares with the standalone server run in the other e2e modules, through
the ``front_end`` fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
import upstream_app
from fixtures import REPO_ROOT, hypercorn_command, run_asgi_proxy, run_listening_process, serve_asgi
from upstream_app import pattern_sha256
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

GATEWAY = REPO_ROOT / "examples" / "fastapi_gateway.py"


def echo_values(echo: dict[str, Any], name: str) -> list[str]:
    return [value for field, value in echo["headers"] if field == name]


# --- HTTP/2 and TLS through hypercorn -----------------------------------------------------


async def test_http2_over_tls_gets_the_same_bodies(upstream: str, tmp_path: Path) -> None:
    """hypercorn's --certfile/--keyfile and h2 in front of the engine: an HTTP/2
    client gets the bodies an HTTP/1.1 client gets, the split cookie fields of
    HTTP/2 reach the HTTP/1.1 upstream joined, and X-Forwarded-Proto says https."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    verify = ssl.create_default_context(cafile=str(ca_file))
    hypercorn_tls = ("--certfile", str(certfile), "--keyfile", str(keyfile))
    async with (
        run_asgi_proxy("--upstream", upstream, hypercorn_args=hypercorn_tls) as proxy,
        httpx.AsyncClient(http2=True, verify=verify, timeout=10) as h2,
        httpx.AsyncClient(verify=verify, timeout=10) as h1,
    ):
        assert proxy.url.startswith("https://")
        size = 3 * 1024 * 1024 + 17
        for client, version in ((h2, "HTTP/2"), (h1, "HTTP/1.1")):
            response = await client.get(f"{proxy.url}/bytes/{size}")
            assert response.http_version == version
            assert response.status_code == 200
            assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size)
            chunked = await client.get(f"{proxy.url}/bytes/{size}?chunked=1")
            assert hashlib.sha256(chunked.content).hexdigest() == pattern_sha256(size)
            cookies = await client.get(f"{proxy.url}/cookies")
            assert cookies.headers.get_list("set-cookie") == ["a=1", "b=2", "c=3"]
            upload = await client.post(f"{proxy.url}/upload", content=b"u" * 200_000)
            assert upload.json() == {
                "len": 200_000,
                "sha256": hashlib.sha256(b"u" * 200_000).hexdigest(),
            }
        echo = (
            await h2.get(
                f"{proxy.url}/echo/a%2Fb?x=1&x=2",
                headers=[("cookie", "a=1"), ("x-kept", "1"), ("cookie", "b=2")],
            )
        ).json()
    assert echo["target"] == "/echo/a%2Fb?x=1&x=2"
    assert echo_values(echo, "cookie") == ["a=1; b=2"]
    assert echo_values(echo, "x-forwarded-proto") == ["https"]
    assert echo_values(echo, "via") == ["2 trioproxy"]


async def test_each_log_line_is_written_once(upstream: str) -> None:
    """hypercorn's lines through its own handler only (here: stdout), the proxy's
    through its own (stderr): neither through the other's as well."""
    async with run_asgi_proxy("--upstream", upstream) as proxy:
        async with httpx.AsyncClient() as client:
            assert (await client.get(proxy.url + "/echo")).status_code == 200
        err = await proxy.settled_stderr()
    assert proxy.stdout().count("Running on") == 1
    assert "Running on" not in err and "hypercorn" not in err, err
    assert err.count('"GET /echo HTTP/1.1" 200') == 1, err


async def test_a_bad_config_fails_the_lifespan_and_hypercorn_exits(tmp_path: Path) -> None:
    """The config is read at lifespan startup: an error stops the server (hypercorn
    exits non-zero), with the file, key and value in the message."""
    config = tmp_path / "bad.toml"
    config.write_text('[upstreams.default]\nservers = ["http://127.0.0.1:1"]\nstrategy = "nope"\n')
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--workers",
        "0",
        "--bind",
        "127.0.0.1:0",
        "trioproxy.asgi:app",
    ]
    env = {"TRIOPROXY_CONFIG": str(config)}
    with trio.fail_after(20):
        process = await trio.run_process(
            command, env={**os.environ, **env}, cwd=tmp_path, capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
    output = (process.stdout + process.stderr).decode()
    assert process.returncode != 0
    assert "upstreams.default.strategy" in output, output


async def test_a_taken_admin_port_fails_the_lifespan_and_hypercorn_exits(tmp_path: Path) -> None:
    """The admin listener cannot bind (a second worker on a fixed port, say): the
    startup fails and the server exits, instead of serving 503 without a lifespan."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "admin.toml"
        config.write_text(
            f'[server]\nadmin = {{ host = "127.0.0.1", port = {port} }}\n'
            '[routes.pong]\nrespond = { status = 200, body = "pong" }\n'
        )
        command = [
            sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--workers", "0",
            "--bind", "127.0.0.1:0", "trioproxy.asgi:app",
        ]  # fmt: skip
        with trio.fail_after(20):
            process = await trio.run_process(
                command, env={**os.environ, "TRIOPROXY_CONFIG": str(config)}, cwd=tmp_path,
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
    output = (process.stdout + process.stderr).decode()
    assert process.returncode != 0
    assert "cannot start the admin listener" in output, output


# --- FastAPI with proxy_pass and LoadBalancer(HealthChecker([...])) --------------------


async def test_fastapi_gateway_balances_survives_a_dead_upstream_streams_and_echoes(
    nursery: trio.Nursery,
) -> None:
    """``examples/fastapi_gateway.py`` under hypercorn's trio worker, in front of two
    upstreams: GETs go to both; once one is killed, no GET fails (a request that
    meets the dead one before its ping does is retried on the other); SSE comes
    event by event; a WebSocket echoes; a POST body arrives whole."""
    killed = trio.Event()
    first = await serve_asgi(upstream_app.app, nursery)
    second = await serve_asgi(upstream_app.app, nursery, shutdown_trigger=killed.wait)
    command = hypercorn_command(f"{GATEWAY.stem}:app")
    env = {"GATEWAY_UPSTREAMS": f"{first},{second}", "GATEWAY_PING_INTERVAL": "0.5"}
    with trio.fail_after(45):
        async with (
            run_listening_process(command, env=env, cwd=GATEWAY.parent) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10) as client,
        ):
            hosts = set()
            for _ in range(60):
                response = await client.get("/api/echo/x?q=1")
                assert response.status_code == 200
                echo = response.json()
                assert echo["target"] == "/echo/x?q=1"
                hosts.add(echo_values(echo, "host")[0])
            assert hosts == {first.removeprefix("http://"), second.removeprefix("http://")}

            upload = await client.post("/api/upload", content=b"p" * 300_000)
            assert upload.json()["sha256"] == hashlib.sha256(b"p" * 300_000).hexdigest()

            killed.set()
            statuses = []
            async with trio.open_nursery() as load:
                for _ in range(4):
                    load.start_soon(_get_many, client, statuses, 30)
            assert statuses == [200] * 120, [s for s in statuses if s != 200]
            for _ in range(5):  # the killed one is out
                echo = (await client.get("/api/echo")).json()
                assert echo_values(echo, "host") == [first.removeprefix("http://")]

            arrivals = []
            async with client.stream("GET", "/events?n=5&interval=0.2") as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        arrivals.append((trio.current_time(), json.loads(line[6:])["i"]))
            assert [i for _, i in arrivals] == [0, 1, 2, 3, 4]
            # Event by event: the stream is not buffered to its end.
            assert arrivals[-1][0] - arrivals[0][0] > 0.5

            def echo_ws() -> list[str | bytes]:
                with sync_connect(gateway.url.replace("http://", "ws://") + "/ws") as ws:
                    ws.send("text")
                    ws.send(b"\x00bytes")
                    return [ws.recv(), ws.recv()]

            assert await trio.to_thread.run_sync(echo_ws) == ["text", b"\x00bytes"]
            direct = (await client.get("/first/echo")).json()
            assert echo_values(direct, "x-gateway") == ["fastapi"]
            assert echo_values(direct, "host") == [first.removeprefix("http://")]


async def _get_many(client: httpx.AsyncClient, statuses: list[int], count: int) -> None:
    for _ in range(count):
        statuses.append((await client.get("/api/echo")).status_code)
        await trio.sleep(0.01)


@pytest.mark.parametrize(
    "case", ["refused", "timeout", "no-healthy", "ws-refused", "ws-no-healthy"]
)
async def test_proxy_pass_failures_are_502_504_503(nursery: trio.Nursery, case: str) -> None:
    """A FastAPI app's proxy_pass answers as the standalone server: 502 when the
    upstream refuses, 504 when it does not answer within ``timeout``, 503 with
    Retry-After when the balancer has no healthy target; proxy_pass_websocket
    answers the handshake with the same statuses (hypercorn's
    ``websocket.http.response``)."""
    app_file = REPO_ROOT / "tests" / "e2e" / "proxy_pass_app.py"
    command = hypercorn_command("proxy_pass_app:app")
    slow = await serve_asgi(upstream_app.app, nursery)
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"PROXY_PASS_DEAD": dead, "PROXY_PASS_SLOW": slow}
    path, status = {
        "refused": ("/refused", 502),
        "timeout": ("/timeout", 504),
        "no-healthy": ("/no-healthy", 503),
        "ws-refused": ("/ws-refused", 502),
        "ws-no-healthy": ("/ws-no-healthy", 503),
    }[case]
    with trio.fail_after(30):
        async with (
            run_listening_process(command, env=env, cwd=app_file.parent) as app,
            httpx.AsyncClient(base_url=app.url, timeout=10) as client,
        ):
            if case.startswith("ws-"):
                url = app.url.replace("http://", "ws://") + path

                def handshake() -> InvalidStatus:
                    with pytest.raises(InvalidStatus) as caught:
                        sync_connect(url)
                    return caught.value

                refused = (await trio.to_thread.run_sync(handshake)).response
                answer = (refused.status_code, (refused.body or b"").decode(), refused.headers)
            else:
                response = await client.get(path)
                answer = (response.status_code, response.text, response.headers)
    got, text, headers = answer
    assert got == status, text
    assert text.startswith(f"{status} "), text
    if status == 503:
        assert headers["retry-after"] == "1"


async def test_sigterm_lets_a_request_in_flight_finish_then_the_lifespan_drains(
    upstream: str, tmp_path: Path
) -> None:
    """hypercorn (with its worker process, which is where its graceful shutdown
    lives: ``--workers 0`` has none) finishes a request in flight after SIGTERM; the
    lifespan then drains and closes the engine, and the process exits 0."""
    config = tmp_path / "trioproxy.toml"
    config.write_text(f'[upstreams.default]\nservers = ["{upstream}"]\nhealth = false\n')
    command = hypercorn_command("trioproxy.asgi:app", "--graceful-timeout", "5", workers=True)
    with trio.fail_after(30):
        async with (
            run_listening_process(
                command, env={"TRIOPROXY_CONFIG": str(config)}, cwd=tmp_path
            ) as proxy,
            httpx.AsyncClient(timeout=10) as client,
        ):
            async with trio.open_nursery() as nursery:
                answers: list[httpx.Response] = []

                async def slow() -> None:
                    answers.append(await client.get(proxy.url + "/slow?delay=1.5"))

                nursery.start_soon(slow)
                await trio.sleep(0.5)
                proxy.process.send_signal(signal.SIGTERM)
            await proxy.process.wait()
            stderr = await proxy.settled_stderr()
    assert [(r.status_code, r.text) for r in answers] == [(200, "slow done")]
    assert proxy.returncode == 0, proxy.stdout() + stderr
    assert '"GET /slow?delay=1.5 HTTP/1.1" 200' in stderr
