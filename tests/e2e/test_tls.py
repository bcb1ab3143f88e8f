"""TLS through the real proxy, both sides.

Upstream: https upstreams' certificates are verified by default, against
``--upstream-ca`` when given, and not at all with ``--insecure``; a group's client
certificate (mTLS) is presented to an upstream that asks for one.

Termination: the proxy serves https (``--certfile``/``--keyfile``, ``[server.tls]``),
picks certificates by SNI, forwards ``X-Forwarded-Proto: https``, tunnels ``wss``,
cuts plain-HTTP clients and stalled handshakes by the header timeout while serving
others, reloads certificates on SIGHUP without dropping connections, and answers 308
on its ``redirect_http`` listener.

The upstream is ``tests/upstream_app.py`` under hypercorn with a certificate from a
throwaway trustme CA, written to the test's temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
import trustme
import upstream_app
from fixtures import raw_request, run_proxy
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def serve_https(
    cert: trustme.LeafCert, tmp_path: Path, nursery: trio.Nursery, *, client_ca: str | None = None
) -> str:
    """``upstream_app.app`` over TLS on a free port of 127.0.0.1; its base URL. With
    ``client_ca``, it requires a client certificate issued by that CA (mTLS)."""
    certfile, keyfile = tmp_path / "upstream.pem", tmp_path / "upstream.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.certfile = str(certfile)
    config.keyfile = str(keyfile)
    config.accesslog = None
    config.loglevel = "WARNING"
    if client_ca is not None:
        config.ca_certs = client_ca
        config.verify_mode = ssl.CERT_REQUIRED

    app: Any = upstream_app.app  # hypercorn's ASGI types are narrower than the app's

    async def serve(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(
            app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status
        )

    binds: list[str] = await nursery.start(serve)
    assert binds[0].startswith("https://127.0.0.1:"), binds
    return binds[0]


@pytest.fixture
async def https_upstream(ca: trustme.CA, tmp_path: Path, nursery: trio.Nursery) -> str:
    """An https upstream whose certificate names 127.0.0.1, issued by ``ca``."""
    return await serve_https(ca.issue_cert("127.0.0.1"), tmp_path, nursery)


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_verified_with_upstream_ca(
    https_upstream: str, ca_file: str, http_client: httpx.AsyncClient
) -> None:
    async with run_proxy("--upstream", https_upstream, "--upstream-ca", ca_file) as proxy:
        response = await http_client.get(proxy.url + "/echo/tls?x=1")
        again = await http_client.get(proxy.url + "/")
    assert response.status_code == 200
    echo = response.json()
    assert echo["target"] == "/echo/tls?x=1"
    hosts = [value for name, value in echo["headers"] if name == "host"]
    assert hosts == [https_upstream.removeprefix("https://")]
    # The client spoke plain http to the proxy, whatever the upstream's scheme.
    assert [v for n, v in echo["headers"] if n == "x-forwarded-proto"] == ["http"]
    assert (again.status_code, again.text) == (200, "ok")


async def test_unknown_ca_is_refused_by_default(
    https_upstream: str, http_client: httpx.AsyncClient
) -> None:
    async with run_proxy("--upstream", https_upstream) as proxy:
        response = await http_client.get(proxy.url + "/")
    assert response.status_code == 502
    assert len(response.content) < 200
    assert "Traceback" not in response.text and "SSL" not in response.text


async def test_insecure_skips_verification(
    https_upstream: str, http_client: httpx.AsyncClient
) -> None:
    async with run_proxy("--upstream", https_upstream, "--insecure") as proxy:
        response = await http_client.get(proxy.url + "/")
    assert (response.status_code, response.text) == (200, "ok")


async def test_certificate_for_another_host_is_refused(
    ca: trustme.CA,
    ca_file: str,
    tmp_path: Path,
    nursery: trio.Nursery,
    http_client: httpx.AsyncClient,
) -> None:
    url = await serve_https(ca.issue_cert("other.example"), tmp_path, nursery)
    async with run_proxy("--upstream", url, "--upstream-ca", ca_file) as proxy:
        response = await http_client.get(proxy.url + "/")
    assert response.status_code == 502
    assert "Traceback" not in response.text


async def test_the_log_says_why_verification_failed(
    https_upstream: str, http_client: httpx.AsyncClient
) -> None:
    async with run_proxy("--upstream", https_upstream) as proxy:
        assert (await http_client.get(proxy.url + "/")).status_code == 502
    assert "certificate verify failed" in proxy.stderr().lower(), proxy.stderr()


# --- TLS termination: the proxy's own listener ------------------------------------------
#
# The proxy serves https with certificates from the same kind of throwaway CA; clients
# verify against it. The upstream is plain http (upstream_app under hypercorn).


def write_pair(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[str, str]:
    """``cert``'s chain and key as PEM files ``name.pem`` / ``name.key``."""
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


@pytest.fixture
def site_pair(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    return write_pair(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "site")


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def tls_connect(
    port: int, ca: trustme.CA, server_hostname: str = "127.0.0.1"
) -> trio.SSLStream[trio.SocketStream]:
    """A verified TLS connection to the proxy on 127.0.0.1, handshake done."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, client_context(ca), server_hostname=server_hostname)
    await stream.do_handshake()
    return stream


async def get_on(stream: trio.abc.Stream, path: str, host: str = "127.0.0.1") -> bytes:
    """One keep-alive GET on ``stream``; the response head and body (Content-Length)."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return await get_on_answer(stream)


async def get_on_answer(stream: trio.abc.Stream) -> bytes:
    """The next response on ``stream`` (a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def test_https_through_the_proxy(
    ca: trustme.CA, site_pair: tuple[str, str], upstream: str
) -> None:
    certfile, keyfile = site_pair
    args = ["--upstream", upstream, "--certfile", certfile, "--keyfile", keyfile]
    async with (
        run_proxy(*args) as proxy,
        httpx.AsyncClient(verify=client_context(ca), timeout=10) as client,
    ):
        assert proxy.url.startswith("https://127.0.0.1:")
        response = await client.get(proxy.url + "/echo/x?y=1")
        assert response.status_code == 200
        assert response.http_version == "HTTP/1.1"
        echo = response.json()
        assert [v for n, v in echo["headers"] if n == "x-forwarded-proto"] == ["https"]
        # The client's address is read through the TLS stream.
        assert [v for n, v in echo["headers"] if n == "x-forwarded-for"] == ["127.0.0.1"]
        # A streamed response (SSE) over TLS: relayed by the connection's own task,
        # the stream hub writes to plain sockets only.
        async with client.stream("GET", proxy.url + "/sse?n=20&interval=0.01") as sse:
            body = b"".join([chunk async for chunk in sse.aiter_bytes()])
        assert body.count(b"data: ") == 20
        # TLS 1.2 is enough (1.3 was negotiated above); ALPN picks http/1.1 over h2.
        tls12 = client_context(ca)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        tls12.set_alpn_protocols(["h2", "http/1.1"])
        tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        stream = trio.SSLStream(tcp, tls12, server_hostname="127.0.0.1")
        await stream.do_handshake()
        assert stream.version() == "TLSv1.2"
        assert stream.selected_alpn_protocol() == "http/1.1"
        assert (await get_on(stream, "/")).startswith(b"HTTP/1.1 200")
        await stream.aclose()


async def test_wss_through_the_proxy(
    ca: trustme.CA, site_pair: tuple[str, str], upstream: str
) -> None:
    certfile, keyfile = site_pair
    args = ["--upstream", upstream, "--certfile", certfile, "--keyfile", keyfile]
    async with run_proxy(*args) as proxy:
        url = f"wss://127.0.0.1:{proxy.port}/ws"
        async with trio_websocket.open_websocket_url(url, ssl_context=client_context(ca)) as ws:
            await ws.send_message("hello over tls")
            assert await ws.get_message() == "hello over tls"
            await ws.send_message(b"\x00\x01" * 40000)
            assert await ws.get_message() == b"\x00\x01" * 40000


async def test_sni_picks_the_certificate(ca: trustme.CA, tmp_path: Path, upstream: str) -> None:
    default = write_pair(ca.issue_cert("default.test", "127.0.0.1"), tmp_path, "default")
    api = write_pair(ca.issue_cert("api.test"), tmp_path, "api")
    wild = write_pair(ca.issue_cert("*.wild.test"), tmp_path, "wild")
    config = tmp_path / "tls.toml"
    config.write_text(
        f"""\
[server.tls]
cert = "default.pem"
key = "default.key"
[[server.tls.sni]]
hosts = ["api.test"]
cert = "{api[0]}"
key = "{api[1]}"
[[server.tls.sni]]
hosts = ["*.wild.test"]
cert = "wild.pem"
key = "wild.key"
[upstreams.default]
servers = ["{upstream}"]
"""
    )
    assert default[0].endswith("default.pem") and wild[0].endswith("wild.pem")
    async with run_proxy("--config", str(config)) as proxy:
        for name, expected in [
            ("api.test", "api.test"),
            ("a.wild.test", "*.wild.test"),
            ("default.test", "default.test"),
            ("other.test", "default.test"),
        ]:
            tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            context = client_context(ca)
            context.check_hostname = False  # "other.test" gets the default, on purpose
            stream = trio.SSLStream(tcp, context, server_hostname=name)
            await stream.do_handshake()
            certificate = stream.getpeercert()
            assert certificate is not None
            names = [value for kind, value in certificate["subjectAltName"] if kind == "DNS"]
            assert names[0] == expected, (name, names)
            response = await get_on(stream, "/", host=name)
            assert response.startswith(b"HTTP/1.1 200"), response
            await stream.aclose()


async def test_plain_http_and_stalled_handshakes_are_cut_while_others_are_served(
    ca: trustme.CA, site_pair: tuple[str, str], upstream: str
) -> None:
    certfile, keyfile = site_pair
    args = ["--upstream", upstream, "--certfile", certfile, "--keyfile", keyfile]
    args += ["--header-timeout", "3", "--log-level", "debug"]
    async with run_proxy(*args) as proxy:
        # Plain HTTP on the TLS port: a plain 400 that says so, and the connection
        # closed at once (well before the header timeout), as nginx does.
        started = trio.current_time()
        answer = await raw_request("127.0.0.1", proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert trio.current_time() - started < 2.0
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert answer.endswith(b"\r\n\r\n400 Bad Request: plain HTTP was sent to the HTTPS port\n")
        # A real client, with a body it had not finished sending: the answer is read
        # whole, not lost to a reset.
        async with httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{proxy.port}/", content=b"x" * 200_000)
        assert response.status_code == 400
        assert response.text == "400 Bad Request: plain HTTP was sent to the HTTPS port\n"
        # Two stalled handshakes: one says nothing, one sends half a ClientHello.
        silent = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        half = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await half.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        stalled_at = trio.current_time()
        # Meanwhile, others are served.
        stream = await tls_connect(proxy.port, ca)
        assert (await get_on(stream, "/")).startswith(b"HTTP/1.1 200")
        assert trio.current_time() - stalled_at < 2.5
        # The stalled ones are cut by the header timeout (3 s), with no byte sent.
        for stalled in (silent, half):
            with trio.fail_after(10):
                assert await stalled.receive_some(100) == b""
            await stalled.aclose()
        assert trio.current_time() - stalled_at >= 2.8
        # The established connection stays, past the header timeout.
        assert (await get_on(stream, "/")).startswith(b"HTTP/1.1 200")
        await stream.aclose()
        log = await proxy.settled_stderr()
    assert log.count("TLS handshake with 127.0.0.1 failed: plain HTTP sent to the TLS port") == 2
    assert log.count("not finished within the header timeout") == 2, log


@pytest.mark.parametrize("how", ["sighup", "watch"])
async def test_certificates_reload_without_dropping_connections(
    tmp_path: Path, upstream: str, how: str
) -> None:
    """On SIGHUP, and with ``--watch`` when the certificate files change (a renewal
    by certbot or cert-manager), the config file itself untouched."""
    first_ca, second_ca = trustme.CA(), trustme.CA()
    write_pair(first_ca.issue_cert("127.0.0.1"), tmp_path, "site")
    config = tmp_path / "tls.toml"
    config.write_text(
        f'[server.tls]\ncert = "site.pem"\nkey = "site.key"\n'
        f'[upstreams.default]\nservers = ["{upstream}"]\n'
    )
    watch = ["--watch"] if how == "watch" else []
    # (Run from the repository's root: the files are found next to the config.)
    async with run_proxy("--config", str(config), *watch) as proxy:
        kept = await tls_connect(proxy.port, first_ca)
        assert (await get_on(kept, "/")).startswith(b"HTTP/1.1 200")
        write_pair(second_ca.issue_cert("127.0.0.1"), tmp_path, "site")
        if how == "sighup":
            proxy.process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            await proxy.wait_for_stderr("TLS certificates reloaded")
        # The connection made before keeps working...
        assert (await get_on(kept, "/")).startswith(b"HTTP/1.1 200")
        # ...and new ones get the new certificate.
        fresh = await tls_connect(proxy.port, second_ca)
        assert (await get_on(fresh, "/")).startswith(b"HTTP/1.1 200")
        with pytest.raises(trio.BrokenResourceError):
            await tls_connect(proxy.port, first_ca)
        await kept.aclose()
        await fresh.aclose()


async def test_redirect_http_answers_308_to_the_https_url(
    site_pair: tuple[str, str], tmp_path: Path, upstream: str
) -> None:
    config = tmp_path / "tls.toml"
    config.write_text(
        f'[server.tls]\ncert = "site.pem"\nkey = "site.key"\nredirect_http = "127.0.0.1:0"\n'
        f'[upstreams.default]\nservers = ["{upstream}"]\n'
    )
    async with run_proxy("--config", str(config)) as proxy:
        with trio.fail_after(5):
            log = await proxy.wait_for_stderr(" to https")
        line = next(line for line in log.splitlines() if "redirecting http://" in line)
        plain_port = int(line.split("redirecting http://127.0.0.1:")[1].split()[0])
        answer = await raw_request(
            "127.0.0.1",
            plain_port,
            b"POST /a/b?c=d HTTP/1.1\r\nHost: Example.COM:8080\r\nContent-Length: 0\r\n\r\n",
        )
        no_host = await raw_request("127.0.0.1", plain_port, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 308 "), answer
    assert f"location: https://example.com:{proxy.port}/a/b?c=d\r\n".encode() in answer.lower()
    assert b"connection: close" in answer.lower()
    assert no_host.startswith(b"HTTP/1.1 400") or no_host.startswith(b"HTTP/1.0 400"), no_host


async def test_upstream_client_certificate(
    ca: trustme.CA, ca_file: str, tmp_path: Path, nursery: trio.Nursery, http_client: Any
) -> None:
    """mTLS: an upstream that requires a client certificate gets the group's."""
    server = ca.issue_cert("127.0.0.1")
    url = await serve_https(server, tmp_path, nursery, client_ca=ca_file)
    client_cert, client_key = write_pair(ca.issue_cert("proxy.client"), tmp_path, "client")
    without = tmp_path / "without.toml"
    without.write_text(f'[upstreams.default]\nservers = ["{url}"]\ntls = {{ ca = "ca.pem" }}\n')
    with_cert = tmp_path / "with.toml"
    with_cert.write_text(
        f'[upstreams.default]\nservers = ["{url}"]\n'
        f'tls = {{ ca = "ca.pem", cert = "{client_cert}", key = "client.key" }}\n'
    )
    assert client_key.endswith("client.key")
    async with run_proxy("--config", str(without)) as proxy:
        refused = await http_client.get(proxy.url + "/")
    async with run_proxy("--config", str(with_cert)) as proxy:
        accepted = await http_client.get(proxy.url + "/")
    assert refused.status_code == 502
    assert (accepted.status_code, accepted.text) == (200, "ok")


def test_the_edge_example_passes_check_config(ca: trustme.CA, tmp_path: Path) -> None:
    """``examples/edge/trioproxy.toml`` with the files it names (made here: no
    certificate or key lives in the repository), through the real CLI."""
    example = Path(__file__).resolve().parents[2] / "examples" / "edge" / "trioproxy.toml"
    config = tmp_path / "trioproxy.toml"
    config.write_text(example.read_text())
    write_pair(ca.issue_cert("www.example.com"), tmp_path, "site")
    write_pair(ca.issue_cert("api.example.com", "*.api.example.com"), tmp_path, "api")
    (tmp_path / "keys.txt").write_text("# team A\nsk-example-1\n")
    command = [sys.executable, "-m", "trioproxy", "--check-config", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=20)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "config OK: 2 routes, 2 upstream groups, 2 servers\n"
    # Without the keys file it says which file, where, and why.
    (tmp_path / "keys.txt").unlink()
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=20)
    assert result.returncode == 2
    assert result.stderr == (
        f'{config}: routes.llm.auth.api_keys_file: cannot read "keys.txt": '
        "No such file or directory\n"
    )


async def test_the_handshake_and_the_first_head_share_one_header_timeout(
    ca: trustme.CA, site_pair: tuple[str, str], upstream: str
) -> None:
    """A client that takes 2.5 s to start its handshake, then sends half a head, is cut
    (with 408) 3 s after it connected, not 3 s after its handshake."""
    certfile, keyfile = site_pair
    args = ["--upstream", upstream, "--certfile", certfile, "--keyfile", keyfile]
    async with run_proxy(*args, "--header-timeout", "3") as proxy:
        tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        connected = trio.current_time()
        await trio.sleep(2.5)
        stream = trio.SSLStream(tcp, client_context(ca), server_hostname="127.0.0.1")
        await stream.do_handshake()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with trio.fail_after(10):
            received = await stream.receive_some(65536)
        # (the connection then lingers for the rest of a request, as any after a 408)
        elapsed = trio.current_time() - connected
        await trio.aclose_forcefully(stream)
    assert received.startswith(b"HTTP/1.1 408 "), received
    # 3 s from the accept; a timeout counted from the handshake would be ~5.5 s.
    assert 2.8 <= elapsed < 4.5, elapsed


async def test_large_bodies_both_ways_over_tls_with_a_slow_reader(
    ca: trustme.CA, site_pair: tuple[str, str], upstream: str
) -> None:
    """8 MiB down (read slowly, so the proxy's TLS writes must wait for the socket) and
    8 MiB up, byte for byte, then a request on the same connection."""
    certfile, keyfile = site_pair
    args = ["--upstream", upstream, "--certfile", certfile, "--keyfile", keyfile]
    size = 8 << 20
    async with run_proxy(*args) as proxy:
        stream = await tls_connect(proxy.port, ca)
        await stream.send_all(f"GET /bytes/{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        received = bytearray()
        with trio.fail_after(30):
            while (
                b"\r\n\r\n" not in received
                or len(received) - received.index(b"\r\n\r\n") - 4 < size
            ):
                chunk = await stream.receive_some(16384)
                assert chunk
                received += chunk
                if len(received) < (1 << 20):
                    await trio.sleep(0.001)  # a slow start: the proxy's buffers fill
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert body == upstream_app.pattern_bytes(size)
        payload = bytes(range(256)) * (size // 256)
        await stream.send_all(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        answer = await get_on_answer(stream)
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
            "len": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        assert (await get_on(stream, "/")).startswith(b"HTTP/1.1 200")
        await stream.aclose()


async def test_a_close_delimited_body_ends_with_close_notify(
    ca: trustme.CA, site_pair: tuple[str, str], upstream: str
) -> None:
    """An HTTP/1.0 client gets a body without a length, ended by the close: over TLS the
    close is a close_notify, so the client can tell the end from a truncation."""
    certfile, keyfile = site_pair
    args = ["--upstream", upstream, "--certfile", certfile, "--keyfile", keyfile]
    async with run_proxy(*args) as proxy:
        stream = await tls_connect(proxy.port, ca)
        await stream.send_all(b"GET /bytes/100000?chunked=1 HTTP/1.0\r\nHost: a\r\n\r\n")
        received = bytearray()
        with trio.fail_after(10):
            # trio.SSLStream raises BrokenResourceError on an EOF without close_notify.
            while chunk := await stream.receive_some(65536):
                received += chunk
        await stream.aclose()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    assert b"content-length" not in head.lower()
    assert body == upstream_app.pattern_bytes(100000)
