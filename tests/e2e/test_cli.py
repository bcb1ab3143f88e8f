"""The command line of the real ``python -m trioproxy``: help, bad usage, a busy port,
the demo, and stopping on a signal.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio
from fixtures import REPO_ROOT, run_proxy

pytestmark = pytest.mark.timeout(20)

FLAGS = (
    "--help",
    "--upstream",
    "--demo",
    "--host",
    "--port",
    "--log-level",
    "--http",
    "--connect-timeout",
    "--read-timeout",
    "--header-timeout",
    "--body-timeout",
    "--keepalive-timeout",
    "--max-header-size",
    "--max-body-size",
    "--max-connections-per-upstream",
    "--pool-timeout",
    "--grace",
    "--workers",
    "--preserve-host",
    "--upstream-ca",
    "--insecure",
    "--strategy",
    "--no-health-check",
    "--health-path",
    "--health-expect",
    "--health-method",
    "--health-interval",
    "--health-timeout",
    "--health-rise",
    "--health-fall",
    "--eject-after",
    "--eject-for",
    "--breaker-failures",
    "--breaker-window",
    "--breaker-open-for",
    "--breaker-half-open",
    "--breaker-successes",
    "--retries",
    "--retry-budget",
    "--retry-replay-limit",
    "--admin-port",
    "--admin-host",
    "--ws-max-message-size",
    "--ws-idle-timeout",
    "--config",
    "--env-file",
    "--check-config",
    "--watch",
    "--backend-url",
    "--certfile",
    "--keyfile",
    "--metrics-path",
    "--no-metrics",
    "--metrics-buckets",
    "--log-format",
    "--access-log",
)


async def trioproxy(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m trioproxy *args`` to its end (within 10 s), capturing its output."""
    with trio.fail_after(10):
        return await trio.run_process(
            [sys.executable, "-m", "trioproxy", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO_ROOT,
        )


async def test_help_lists_every_flag() -> None:
    result = await trioproxy("--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for flag in FLAGS:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{flag} not in --help"
    # Every flag documented in the README is in --help, and the other way round.
    readme = (REPO_ROOT / "README.rst").read_text()
    assert set(re.findall(r"``(--[a-z-]+)", readme)) - {"--help"} <= set(FLAGS)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--upstream", "ftp://x"], ["--upstream", "ftp://x"]),
        (["--upstream", "http://127.0.0.1:1", "--port", "99999"], ["--port", "99999"]),
        (["--upstream", "http://127.0.0.1:1", "--read-timeout", "abc"], ["--read-timeout", "abc"]),
        (["--upstream", "http://127.0.0.1:1", "--max-body-size", "lots"], ["--max-body-size"]),
        (["--upstream", "http://127.0.0.1:1", "--header-timeout", "0"], ["--header-timeout", "0"]),
        ([], ["--upstream", "--demo"]),
        (["--upstream", "http://127.0.0.1:1", "--health-expect", "ok"], ["--health-expect", "ok"]),
        (
            ["--upstream", "http://127.0.0.1:1", "--health-expect", "299-200"],
            ["--health-expect", "299-200"],
        ),
        (
            ["--upstream", "http://127.0.0.1:1", "--health-expect", "200,700"],
            ["--health-expect", "700"],
        ),
        (["--upstream", "http://127.0.0.1:1", "--health-path", "hz"], ["--health-path", "hz"]),
    ],
    ids=[
        "scheme",
        "port",
        "seconds",
        "size",
        "zero-timeout",
        "no-upstream",
        "expect-word",
        "expect-range",
        "expect-high",
        "health-path",
    ],
)
async def test_bad_usage_is_one_line_and_exit_2(args: list[str], expected: list[str]) -> None:
    result = await trioproxy(*args)
    assert result.returncode == 2
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    for needle in expected:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in lines[0]


async def test_port_in_use_is_one_line_naming_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await trioproxy(
            "--host", "127.0.0.1", "--port", str(port), "--upstream", "http://127.0.0.1:1"
        )
    assert result.returncode != 0
    assert b"listening on" not in result.stdout
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0]


async def test_demo_alternates_between_its_two_upstreams(http_client: httpx.AsyncClient) -> None:
    async with run_proxy("--demo") as proxy:
        pages = [await http_client.get(proxy.url + "/") for _ in range(4)]
    names = []
    for page in pages:
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        match = re.search(r"demo upstream ([AB])\b", page.text)
        assert match, page.text
        names.append(match.group(1))
    assert names in (["A", "B", "A", "B"], ["B", "A", "B", "A"]), names


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_an_idle_proxy_cleanly(signum: signal.Signals) -> None:
    # The signal goes out as soon as "listening on" is read, as a supervisor would send
    # it; a few rounds, since a proxy that announced itself before installing its signal
    # handlers died of that race only some of the time.
    for _ in range(3):
        async with run_proxy("--upstream", "http://127.0.0.1:1") as proxy:
            proxy.process.send_signal(signum)
            with trio.fail_after(2):
                await proxy.process.wait()
            assert proxy.returncode == 0, proxy.stderr()
            with pytest.raises(OSError):
                await trio.open_tcp_stream(proxy.host, proxy.port)
        assert "Traceback" not in proxy.stderr()
