"""https upstreams through the real proxy: certificates are verified by default, against
``--upstream-ca`` when given, and not at all with ``--insecure``.

The upstream is ``tests/upstream_app.py`` under hypercorn with a certificate from a
throwaway trustme CA, written to the test's temporary directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
import upstream_app
from fixtures import run_proxy
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def serve_https(cert: trustme.LeafCert, tmp_path: Path, nursery: trio.Nursery) -> str:
    """``upstream_app.app`` over TLS on a free port of 127.0.0.1; its base URL."""
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
