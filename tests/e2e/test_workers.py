"""``--workers 2`` through the real CLI, with real upstreams (issue 17).

Every test starts ``python -m trioproxy --workers 2`` and reads the supervisor's
admin listener (``/status`` of every worker, the summed ``/metrics``) and the
log, where access lines say ``trioproxy.access[worker N]``. Requests go on
fresh connections (``Connection: close``), so the kernel's ``SO_REUSEPORT``
hash spreads them over the workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import upstream_app
from e2e.metrics_helpers import parse
from fixtures import ProxyProcess, raw_request, run_proxy, serve_asgi

pytestmark = pytest.mark.timeout(90)

_SUPERVISOR_ADMIN = re.compile(r"trioproxy\.supervisor: admin listening on http://([\d.]+):(\d+)")


async def _get(host: str, port: int, target: str) -> tuple[int, bytes]:
    """``GET target`` on a connection of its own: (status, body); (0, b"") if the
    connection failed or closed before a whole answer."""
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    try:
        raw = await raw_request(host, port, request, read_timeout=10)
    except OSError:
        return 0, b""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 "):
        return 0, b""
    return int(head.split(b" ", 2)[1]), body


async def _admin(proxy: ProxyProcess, path: str) -> bytes:
    with trio.fail_after(10):
        log = await proxy.wait_for_stderr("trioproxy.supervisor: admin listening on")
    match = _SUPERVISOR_ADMIN.search(log)
    assert match, log
    status, body = await _get(match[1], int(match[2]), path)
    assert status == 200, (status, body)
    return body


async def _status(proxy: ProxyProcess) -> dict[str, Any]:
    return json.loads(await _admin(proxy, "/status"))  # type: ignore[no-any-return]


async def _requests_total(proxy: ProxyProcess) -> float:
    scrape = parse((await _admin(proxy, "/metrics")).decode())
    return sum(scrape.matching("trioproxy_requests_total").values())


def _access_lines(log: str, worker: int) -> list[str]:
    return [line for line in log.splitlines() if f"trioproxy.access[worker {worker}]" in line]


async def _logged(proxy: ProxyProcess, needle: str, count: int) -> None:
    with trio.fail_after(15):
        while proxy.stderr().count(needle) < count:  # noqa: ASYNC110 (another process's log)
            await trio.sleep(0.05)


def _inflight(status: dict[str, Any]) -> list[int]:
    """Requests in flight on each worker, by worker number."""
    counts = []
    for worker in status["workers"]:
        targets = (worker["status"] or {}).get("targets", [])
        counts.append(sum(target["inflight"] for target in targets))
    return counts


async def test_requests_spread_over_both_workers_and_metrics_add_up(
    nursery: trio.Nursery,
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    sent = 40
    async with run_proxy("--workers", "2", "--upstream", upstream, "--admin-port", "0") as proxy:
        assert proxy.stdout().count("listening on") == 1
        for _ in range(sent):
            assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        status = await _status(proxy)
        workers = status["workers"]
        assert [w["id"] for w in workers] == [0, 1]
        assert all(w["state"] == "ready" and w["status"] is not None for w in workers)
        pids = {w["pid"] for w in workers}
        assert len(pids) == 2 and proxy.pid not in pids
        # Both took requests (the chance that 40 fresh connections all hash to one
        # worker is 2**-39).
        log = await proxy.settled_stderr()
        served = [len(_access_lines(log, 0)), len(_access_lines(log, 1))]
        assert sum(served) == sent and min(served) > 0, served
        assert await _requests_total(proxy) == sent
        scrape = parse((await _admin(proxy, "/metrics")).decode())
        # Live gauges are per worker.
        assert set(scrape.matching("trioproxy_open_connections")) == {
            frozenset({("listener", "proxy"), ("worker", "0")}),
            frozenset({("listener", "proxy"), ("worker", "1")}),
        }
    assert proxy.returncode == 0


async def test_metrics_path_on_the_proxy_port_shows_the_whole_fleet(
    nursery: trio.Nursery,
) -> None:
    """Whichever worker takes a scrape, it shows every worker's totals: one worker's
    own counts, alternating between scrapes, would look like resets to rate()."""
    upstream = await serve_asgi(upstream_app.app, nursery)
    sent = 40
    args = ("--workers", "2", "--upstream", upstream, "--metrics-path", "/metrics")
    async with run_proxy(*args) as proxy:
        for _ in range(sent):
            assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        answered: set[str] = set()
        for _ in range(12):  # fresh connections: both workers take some
            status, body = await _get(proxy.host, proxy.port, "/metrics")
            assert status == 200
            scrape = parse(body.decode())
            assert (
                sum(scrape.matching("trioproxy_requests_total", route="default").values()) == sent
            )
            # The live gauges are the answering worker's own, labelled.
            workers = {dict(key)["worker"] for key in scrape.matching("trioproxy_open_connections")}
            assert len(workers) == 1
            answered |= workers
        assert answered == {"0", "1"}
    assert proxy.returncode == 0


async def test_workers_inherit_one_listening_socket_where_so_reuseport_is_missing(
    nursery: trio.Nursery,
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_proxy(
        "--workers",
        "2",
        "--upstream",
        upstream,
        "--admin-port",
        "0",
        env={"_TRIOPROXY_NO_REUSEPORT": "1"},
    ) as proxy:
        # The workers accept from one queue (which of them takes a connection is
        # up to who is woken first: no even spread, see README "Workers").
        for _ in range(10):
            assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        # Both workers die in turn: the restarted ones serve the inherited socket.
        for worker, ready in ((1, 3), (0, 4)):
            victim = (await _status(proxy))["workers"][worker]["pid"]
            os.kill(victim, signal.SIGKILL)
            await _logged(proxy, ") ready", ready)
        for _ in range(10):
            assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        status = await _status(proxy)
        assert [w["restarts"] for w in status["workers"]] == [1, 1]
        assert await _requests_total(proxy) == 20
    assert proxy.returncode == 0


async def test_sigkill_of_a_worker_under_load(nursery: trio.Nursery) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_proxy("--workers", "2", "--upstream", upstream, "--admin-port", "0") as proxy:
        victim = (await _status(proxy))["workers"][0]["pid"]
        results: list[tuple[float, int]] = []
        stop = trio.Event()
        killed_at: list[float] = []

        async def load() -> None:
            while not stop.is_set():
                status, _ = await _get(proxy.host, proxy.port, "/slow?delay=0.01")
                results.append((trio.current_time(), status))

        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(load)
            await trio.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            killed_at.append(trio.current_time())
            with trio.fail_after(10):
                await proxy.wait_for_stderr("worker 0 (pid")
            await _logged(proxy, ") ready", 3)  # two at start, then the new worker 0
            back_after = trio.current_time() - killed_at[0]
            await trio.sleep(1.0)
            stop.set()
        log = proxy.stderr()
        assert f"worker 0 (pid {victim}) killed by signal SIGKILL" in log, log
        assert back_after < 8, back_after  # "within a few seconds", on a loaded machine
        # Requests that began half a second after the kill all succeeded, before and
        # after the worker was back.
        later = [status for at, status in results if at > killed_at[0] + 0.5]
        assert len(later) > 20 and set(later) == {200}, later
        before = [status for at, status in results if at < killed_at[0]]
        assert before and set(before) == {200}
        status = await _status(proxy)
        assert status["workers"][0]["restarts"] == 1
        assert status["workers"][0]["state"] == "ready"
        assert status["workers"][0]["pid"] != victim
        assert "SIGKILL" in status["workers"][0]["last_exit"]
        # The dead worker's counts were not lost with it. An exchange is counted
        # after its last byte is sent, so each of the 4 clients may have had one
        # answered by the victim and not yet counted at the instant of the kill.
        ok = sum(1 for _, status in results if status == 200)
        total = await _requests_total(proxy)
        assert ok - 4 <= total <= len(results), (ok, total, len(results))
        # Requests after the restart reach both workers again.
        for _ in range(30):
            assert (await _get(proxy.host, proxy.port, "/"))[0] == 200
        log = await proxy.settled_stderr()
        assert _access_lines(log.split("worker 0 (pid")[-1], 0)
    assert proxy.returncode == 0


def _config(a: str, b: str, to: str, *, broken: bool = False) -> str:
    match = 'match = { path_prefix = "no-slash" }\n' if broken else ""
    return (
        "[server]\nworkers = 2\nadmin = { port = 0 }\n"
        f'[upstreams.a]\nservers = ["{a}"]\n[upstreams.b]\nservers = ["{b}"]\n'
        f'[routes.r]\nupstream = "{to}"\n{match}'
    )


@pytest.mark.parametrize("how", ["sighup", "watch"])
async def test_a_reload_reaches_both_workers_and_streams_on_both_survive(
    how: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    a = await serve_asgi(upstream_app.app, nursery)
    b = await serve_asgi(upstream_app.app, nursery)
    path = tmp_path / "trioproxy.toml"
    path.write_text(_config(a, b, "a"))
    watch = ["--watch"] if how == "watch" else []
    async with run_proxy("--config", str(path), *watch) as proxy:
        events: list[list[int]] = []

        async def sse(opened: trio.Event) -> None:
            mine: list[int] = []
            events.append(mine)
            async with (
                httpx.AsyncClient(timeout=20, trust_env=False) as http,
                http.stream("GET", proxy.url + "/sse?n=40&interval=0.1") as response,
            ):
                opened.set()
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        mine.append(json.loads(line[6:])["i"])

        async with trio.open_nursery() as streams:
            # Streams on fresh connections until each worker has at least one.
            with trio.fail_after(20):
                while min(_inflight(await _status(proxy))) < 1:
                    opened = trio.Event()
                    streams.start_soon(sse, opened)
                    await opened.wait()
            # A bad config: refused by the supervisor; no worker hears of it.
            path.write_text(_config(a, b, "b", broken=True))
            if how == "sighup":
                proxy.process.send_signal(signal.SIGHUP)
            await _logged(proxy, "reload refused", 1)
            status = await _status(proxy)
            assert status["supervisor"]["config"]["last_error"]
            for _ in range(10):
                status_code, body = await _get(proxy.host, proxy.port, "/echo")
                assert status_code == 200
                assert json.loads(body)["headers"]  # served by a
            # A good one: both workers reload it, while the streams go on.
            path.write_text(_config(a, b, "b"))
            if how == "sighup":
                proxy.process.send_signal(signal.SIGHUP)
            await _logged(proxy, "config reloaded (generation 2)", 2)
            log = proxy.stderr()
            assert "[worker 0]: config reloaded" in log and "[worker 1]: config reloaded" in log
            mark = len(log)
            scrape = parse((await _admin(proxy, "/metrics")).decode())
            assert scrape.value("trioproxy_config_reloads_total", result="success") == 1
            assert scrape.value("trioproxy_config_reloads_total", result="failure") == 1
            for _ in range(20):
                assert (await _get(proxy.host, proxy.port, "/echo"))[0] == 200
        log = await proxy.settled_stderr()
        # Refused once, by the supervisor only.
        assert log.count("reload refused") == 1
        assert "trioproxy.supervisor: reload refused" in log
        after = log[mark:]
        for worker in (0, 1):
            lines = [line for line in _access_lines(after, worker) if "/echo" in line]
            assert lines and all(f"upstream={b}" in line for line in lines), (worker, lines)
        before = [line for line in _access_lines(log[:mark], 0) if "/echo" in line]
        assert all(f"upstream={a}" in line for line in before)
    # Every stream (at least one per worker) ran to its end, uncut.
    assert len(events) >= 2
    assert all(stream == list(range(40)) for stream in events), events
    assert proxy.returncode == 0


async def test_sigterm_drains_both_workers_then_exits_0(nursery: trio.Nursery) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_proxy(
        "--workers", "2", "--upstream", upstream, "--admin-port", "0", "--grace", "10"
    ) as proxy:
        answers: list[tuple[int, bytes]] = []

        async def slow() -> None:
            answers.append(await _get(proxy.host, proxy.port, "/slow?delay=2"))

        async with trio.open_nursery() as clients:
            started = 0
            with trio.fail_after(20):
                while min(_inflight(await _status(proxy))) < 1:
                    clients.start_soon(slow)
                    started += 1
                    await trio.sleep(0.05)
                # Every request is in flight (none waits in an accept queue, where a
                # drain would reset it: that is what a drain does to those).
                while sum(_inflight(await _status(proxy))) < started:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                await proxy.process.wait()
        assert answers == [(200, b"slow done")] * started
        log = proxy.stderr()
        assert "[worker 0]: draining" in log and "[worker 1]: draining" in log
    assert proxy.returncode == 0


async def test_a_worker_that_refuses_the_config_as_it_reads_now_is_retried(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    path = tmp_path / "trioproxy.toml"
    good = (
        "[server]\nworkers = 2\nadmin = { port = 0 }\n"
        f'[upstreams.default]\nservers = ["{upstream}"]\n'
    )
    path.write_text(good)
    async with run_proxy("--config", str(path)) as proxy:
        victim = (await _status(proxy))["workers"][1]["pid"]
        # The file turns bad, then a worker dies: started again, it refuses the file
        # (exit status 2). Not a crash: the other worker serves on.
        path.write_text("[server]\nworkers = 2\nbogus = 1\n")
        os.kill(victim, signal.SIGKILL)
        await _logged(proxy, "refused the config as it reads now", 1)
        for _ in range(10):
            assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        # Fixed: the worker is back at its next try.
        path.write_text(good)
        await _logged(proxy, ") ready", 3)
        status = await _status(proxy)
        assert [w["state"] for w in status["workers"]] == ["ready", "ready"]
        assert proxy.returncode is None
    assert proxy.returncode == 0


# Imported as a route's body transform: kills worker 1 as it loads its config.
_CRASHY = """
import os
if os.environ.get("_TRIOPROXY_WORKER_ID") == "1":
    os._exit(3)

def transform(body: bytes, content_type: str) -> bytes:
    return body
"""


async def test_a_worker_that_dies_at_each_start_is_a_crash_loop(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    (tmp_path / "crashy.py").write_text(_CRASHY)
    path = tmp_path / "trioproxy.toml"
    path.write_text(
        "[server]\nworkers = 2\n"
        f'[upstreams.default]\nservers = ["{upstream}"]\n'
        '[routes.r]\nupstream = "default"\nbody_transform = "crashy:transform"\n'
    )
    command = [sys.executable, "-m", "trioproxy", "--port", "0", "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with trio.fail_after(60):
        result = await trio.run_process(
            command, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    log = result.stderr.decode()
    assert result.returncode == 1, log
    assert b"listening on" not in result.stdout
    assert log.count("exited with status 3") == 5, log
    assert "restarting in 0.1 s" in log and "restarting in 0.8 s" in log
    assert "crash loop, stopping" in log
    assert "worker 0 (pid" in log and "exited with status 0" in log  # drained, not killed


async def test_workers_1_is_one_process_without_a_supervisor(nursery: trio.Nursery) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_proxy("--workers", "1", "--upstream", upstream) as proxy:
        assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        log = await proxy.settled_stderr()
        assert "trioproxy.supervisor" not in log and "[worker" not in log
        assert "trioproxy.access: " in log


async def test_an_admin_port_in_use_stops_the_supervisor_before_any_worker_starts() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        command = [sys.executable, "-m", "trioproxy", "--workers", "2", "--port", "0"]
        command += ["--upstream", "http://127.0.0.1:9", "--admin-port", str(port)]
        with trio.fail_after(30):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert f"cannot listen on 127.0.0.1:{port} (admin)" in stderr
    assert "[worker" not in stderr and b"listening on" not in result.stdout


async def test_json_access_lines_carry_the_worker(nursery: trio.Nursery) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    args = ["--workers", "2", "--upstream", upstream, "--log-format", "json"]
    async with run_proxy(*args) as proxy:
        for _ in range(30):
            assert await _get(proxy.host, proxy.port, "/") == (200, b"ok")
        log = await proxy.settled_stderr()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) == 30
    assert {line["worker"] for line in lines} == {0, 1}


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    nursery: trio.Nursery,
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_proxy("--workers", "2", "--upstream", upstream, "--admin-port", "0") as proxy:
        pids = [worker["pid"] for worker in (await _status(proxy))["workers"]]
        proxy.process.send_signal(signal.SIGKILL)
        with trio.fail_after(15):
            await proxy.process.wait()
            await _logged(proxy, "the supervisor is gone; draining", 2)
            for pid in pids:
                # Gone, or a zombie nobody reaps (PID 1 of a container may not).
                while _proc_state(pid) not in ("gone", "zombie"):  # noqa: ASYNC110
                    await trio.sleep(0.05)


def _proc_state(pid: int) -> str:
    """``gone``, ``zombie``, or ``running`` (Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            text = status.read()
    except OSError:
        return "gone"
    return "zombie" if "\nState:\tZ" in text else "running"
