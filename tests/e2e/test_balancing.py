"""Balancing, health checks and retries through the real ``python -m trioproxy``, with
three real upstreams on 127.0.0.1 that can be killed and restarted (see
``balancing_helpers``).

What a user of the gateway would check: the split each strategy gives, that a dying
upstream costs no request and loses its traffic within ``fall * interval``, that a
restarted one gets it back within ``rise * interval``, that a POST that reached an
upstream is never sent twice, and that with every upstream down the answer is a quick
503 with ``Retry-After`` rather than a hang.

The machine running these is small and shared: timing ceilings carry a slack
(``SLACK``) on top of what the issue asks, and the measured figures go to the test's
output (``pytest -s``) so that a report can quote them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from e2e.balancing_helpers import (
    Client,
    Reply,
    Upstream,
    run_load,
    shares,
    start_upstreams,
    upstream_args,
)
from fixtures import ProxyProcess, raw_request, run_proxy

pytestmark = pytest.mark.timeout(30)

#: The health-check timing of the failover tests (the issue's, scaled down).
INTERVAL, FALL, RISE, PROBE_TIMEOUT = 0.2, 2, 2, 0.2
FAST_HEALTH = (
    "--health-interval",
    str(INTERVAL),
    "--health-fall",
    str(FALL),
    "--health-rise",
    str(RISE),
    "--health-timeout",
    str(PROBE_TIMEOUT),
)
#: Added to every timing ceiling: two shared cores, and others run tests too.
SLACK = 0.6
QUIET = ("--log-level", "warning")

_ADMIN = re.compile(r"admin listening on (http://[\d.]+:\d+)")


def statuses(replies: Sequence[Reply]) -> Counter[int]:
    return Counter(r.status for r in replies)


async def admin_url(proxy: ProxyProcess) -> tuple[str, int]:
    with trio.fail_after(5):
        log = await proxy.wait_for_stderr("admin listening on")
    match = _ADMIN.search(log)
    assert match, log
    host, port = match.group(1).removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def target_status(admin: tuple[str, int], url: str) -> dict[str, object]:
    raw = await raw_request(*admin, b"GET /status HTTP/1.1\r\nHost: admin\r\n\r\n", read_timeout=2)
    targets = json.loads(raw.partition(b"\r\n\r\n")[2])["targets"]
    return next(t for t in targets if t["url"] == url)


def is_candidate(entry: dict[str, object]) -> bool:
    breaker = entry["breaker"]
    assert isinstance(breaker, dict)
    return bool(entry["healthy"]) and not entry["ejected"] and breaker["state"] != "open"


@asynccontextmanager
async def steady_load(
    proxy: ProxyProcess, *, clients: int = 4, pause: float = 0.008
) -> AsyncIterator[list[Reply]]:
    """``clients`` keep-alive clients sending GET /who with ``pause`` s between requests
    (a few hundred requests/s in all) for as long as the block runs."""
    replies: list[Reply] = []
    stop = trio.Event()

    async def client() -> None:
        async with Client(proxy.host, proxy.port) as c:
            while not stop.is_set():
                replies.append(await c.get("/who"))
                await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
        try:
            yield replies
        finally:
            stop.set()


async def wait_until_status(
    admin: tuple[str, int], url: str, wanted: bool, *, key: str, within: float
) -> float:
    """Poll ``/status`` until ``key`` of target ``url`` is ``wanted``; the time it was seen."""
    with trio.fail_after(within):
        while True:
            entry = await target_status(admin, url)
            value = is_candidate(entry) if key == "candidate" else entry[key]
            if value == wanted:
                return trio.current_time()
            await trio.sleep(0.02)


async def first_request_since(upstream: Upstream, since: float, *, within: float) -> float | None:
    """When ``upstream`` first read a client request at or after ``since``, waiting at most
    until ``since + within``; None if it did not."""
    deadline = since + within
    while trio.current_time() < deadline:
        if requests := upstream.requests("/who", since=since):
            return requests[0].at
        await trio.sleep(0.01)
    return None


# --- strategies -----------------------------------------------------------------------


async def test_round_robin_is_the_default_and_alternates_evenly(nursery: trio.Nursery) -> None:
    ups = await start_upstreams(nursery, "a", "b", "c")
    async with (
        run_proxy(*upstream_args(ups), *QUIET) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        replies = [await client.get() for _ in range(60)]
    assert statuses(replies) == {200: 60}
    order = b"".join(r.body for r in replies)
    assert order == b"abc" * 20
    assert [len(u.requests("/who")) for u in ups] == [20, 20, 20]


@pytest.mark.timeout(45)
async def test_weighted_3_2_1_split_within_3_points(nursery: trio.Nursery) -> None:
    ups = await start_upstreams(nursery, "a", "b", "c")
    args = upstream_args(ups, "weight=3", "weight=2", "weight=1")
    async with run_proxy(*args, "--strategy", "weighted", *QUIET) as proxy:
        # Smooth: one request at a time gives nginx's interleaved a b a c b a.
        async with Client(proxy.host, proxy.port) as client:
            order = b"".join([(await client.get()).body for _ in range(12)])
        assert order == b"abacba" * 2
        with trio.fail_after(25):
            replies = await run_load(proxy.host, proxy.port, total=6000, concurrency=8)
    assert statuses(replies) == {200: 6000}
    split = shares(replies, "abc")
    print(f"weighted 3:2:1 over 6000: {split}")
    for name, expected in zip("abc", (3 / 6, 2 / 6, 1 / 6), strict=True):
        assert abs(split[name] - expected) <= 0.03, split


async def test_fastest_sends_a_20ms_slower_upstream_a_small_share(nursery: trio.Nursery) -> None:
    a, b = await start_upstreams(nursery, "a", "b")
    (slow,) = await start_upstreams(nursery, "slow", delay=0.020)
    args = upstream_args([a, b, slow])
    async with run_proxy(
        *args, "--strategy", "fastest", "--health-interval", "0.2", *QUIET, health_check=True
    ) as proxy:
        with trio.fail_after(15):
            replies = await run_load(proxy.host, proxy.port, total=1000, concurrency=4)
    assert statuses(replies) == {200: 1000}
    split = shares(replies, ["a", "b", "slow"])
    print(f"fastest over 1000, one upstream 20 ms slower: {split}")
    assert 0 < split["slow"] < 0.20, split
    # Slow probes feed its EWMA too: it answered probes, and they were slow.
    assert slow.probes()


async def test_least_connections_avoids_an_upstream_holding_slow_requests(
    nursery: trio.Nursery,
) -> None:
    busy = Upstream("busy", routes={"/hold": "hold"})
    await busy.start(nursery)
    b, c = await start_upstreams(nursery, "b", "c")
    args = upstream_args([busy, b, c])
    async with run_proxy(*args, "--strategy", "least_connections", *QUIET) as proxy:
        held: list[Reply] = []

        async def hold() -> None:
            async with Client(proxy.host, proxy.port, timeout=20) as client:
                held.append(await client.get("/hold"))

        async with trio.open_nursery() as holders:
            # Send /hold until the busy upstream holds one (the others answer it at once).
            with trio.fail_after(5):
                while not busy.held:
                    holders.start_soon(hold)
                    await trio.sleep(0.05)
            async with Client(proxy.host, proxy.port) as client:
                replies = [await client.get() for _ in range(30)]
            busy.release.set()
    assert statuses(replies) == {200: 30}
    assert busy.requests("/who") == []
    # Ties between the two idle ones alternate (a /hold answered a moment ago may shift one).
    to_b, to_c = len(b.requests("/who")), len(c.requests("/who"))
    assert to_b + to_c == 30 and 13 <= to_b <= 17, (to_b, to_c)
    assert statuses(held) == {200: len(held)}


# --- an upstream dies and comes back ---------------------------------------------------


async def test_killing_an_upstream_under_load_loses_no_request(nursery: trio.Nursery) -> None:
    ups = await start_upstreams(nursery, "a", "b", "c")
    victim = ups[1]
    args = upstream_args(ups)
    async with run_proxy(*args, *FAST_HEALTH, "--admin-port", "0", health_check=True) as proxy:
        admin = await admin_url(proxy)
        async with steady_load(proxy) as replies:
            await trio.sleep(1.0)
            before = len(replies)
            killed_at = trio.current_time()
            await victim.kill()
            off_at = await wait_until_status(
                admin, victim.url, False, key="candidate", within=FALL * INTERVAL + SLACK
            )
            down_at = await wait_until_status(
                admin, victim.url, False, key="healthy", within=FALL * INTERVAL + SLACK + 0.5
            )
            # Every attempt on the dead one was retried (and logged); once it is off the
            # candidates no request goes there, so the retries stop.
            await trio.sleep(0.3)
            retries = proxy.stderr().count("retrying ")
            await trio.sleep(1.0)
            retries_later = proxy.stderr().count("retrying ")
        after_kill = [r for r in replies if r.at >= killed_at]
    print(
        f"kill under load: {len(replies)} requests, {len(after_kill)} after the kill, "
        f"{retries} retried; off the candidates after {off_at - killed_at:.3f} s, "
        f"marked unhealthy after {down_at - killed_at:.3f} s"
    )
    assert before > 100 and len(after_kill) > 100, (before, len(after_kill))
    assert statuses(replies) == {200: len(replies)}, statuses(replies)
    assert down_at - killed_at <= FALL * INTERVAL + SLACK
    assert retries_later == retries
    # Once it is off, a and c answer everything (a little later: answers b sent just
    # before it died may still be on their way).
    assert {r.body for r in replies if r.at >= off_at + 0.1} == {b"a", b"c"}


async def _kill_and_restart(proxy: ProxyProcess, ups: list[Upstream]) -> tuple[float, list[Reply]]:
    """Kill ups[1] under load, wait until the probers mark it down, restart it: how long
    until it read a client request again (inf if not within rise * interval + SLACK)."""
    victim = ups[1]
    admin = await admin_url(proxy)
    async with steady_load(proxy) as replies:
        # A second of traffic first: the retry budget is a share of recent requests.
        await trio.sleep(1.0)
        await victim.kill()
        await wait_until_status(admin, victim.url, False, key="healthy", within=3)
        await trio.sleep(0.3)
        restarted_at = trio.current_time()
        await victim.restart()
        back_at = await first_request_since(victim, restarted_at, within=RISE * INTERVAL + SLACK)
        await trio.sleep(0.3)
    took = float("inf") if back_at is None else back_at - restarted_at
    print(f"restart: traffic back after {took:.3f} s; {len(replies)} requests")
    return took, replies


async def test_a_restarted_upstream_gets_traffic_back_within_rise_interval_from_probes(
    nursery: trio.Nursery,
) -> None:
    # Passive health off: the probers alone take it out and bring it back.
    ups = await start_upstreams(nursery, "a", "b", "c")
    args = upstream_args(ups)
    passive_off = ("--eject-after", "0", "--breaker-failures", "0")
    async with run_proxy(
        *args, *FAST_HEALTH, *passive_off, "--admin-port", "0", health_check=True
    ) as proxy:
        took, replies = await _kill_and_restart(proxy, ups)
    assert statuses(replies) == {200: len(replies)}, statuses(replies)
    assert took <= RISE * INTERVAL + SLACK


async def test_a_restarted_upstream_gets_traffic_back_within_rise_interval(
    nursery: trio.Nursery,
) -> None:
    # The defaults: live traffic ejected it (3 connect errors in a row) long before
    # the probers marked it down.
    ups = await start_upstreams(nursery, "a", "b", "c")
    args = upstream_args(ups)
    async with run_proxy(*args, *FAST_HEALTH, "--admin-port", "0", health_check=True) as proxy:
        took, replies = await _kill_and_restart(proxy, ups)
    assert statuses(replies) == {200: len(replies)}, statuses(replies)
    assert took <= RISE * INTERVAL + SLACK


# --- retries ---------------------------------------------------------------------------


async def test_a_post_that_reached_an_upstream_is_never_retried(nursery: trio.Nursery) -> None:
    # Every upstream reads the request and closes without answering.
    ups = await start_upstreams(nursery, "a", "b", "c", routes={"/drop": "drop"})
    async with (
        run_proxy(*upstream_args(ups), *QUIET) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        post = await client.request("POST", "/drop", b"pay once" * 10)
        posts = [s for u in ups for s in u.requests("/drop") if s.method == "POST"]
        assert post.status == 502
        assert len(posts) == 1 and posts[0].body == b"pay once" * 10
        # The same failure on a GET is retried on each of the others.
        get = await client.get("/drop")
        gets = [s for u in ups for s in u.requests("/drop") if s.method == "GET"]
        assert get.status == 502
        assert len(gets) == 3


async def test_a_post_the_upstream_never_saw_goes_elsewhere(nursery: trio.Nursery) -> None:
    dead, live = await start_upstreams(nursery, "dead", "live")
    await dead.kill()
    # Round robin tries the dead one first: connecting fails, nothing was sent.
    async with (
        run_proxy(*upstream_args([dead, live]), *QUIET) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        reply = await client.request("POST", "/who", b"once")
    assert (reply.status, reply.body) == (200, b"live")
    assert [s.body for s in live.requests("/who")] == [b"once"]


async def test_a_get_answered_503_is_retried_on_another_upstream(nursery: trio.Nursery) -> None:
    sick = Upstream("sick", routes={"/who": "503"})
    await sick.start(nursery)
    b, c = await start_upstreams(nursery, "b", "c")
    async with (
        run_proxy(*upstream_args([sick, b, c]), *QUIET) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        replies = [await client.get() for _ in range(3)]
    assert statuses(replies) == {200: 3}
    assert {r.body for r in replies} <= {b"b", b"c"}
    assert len(sick.requests("/who")) >= 1  # it was asked, and its 503 never went out


async def test_when_every_upstream_answers_503_the_last_answer_is_relayed(
    nursery: trio.Nursery,
) -> None:
    ups = await start_upstreams(nursery, "a", "b", "c", routes={"/who": "503"})
    async with (
        run_proxy(*upstream_args(ups), *QUIET) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        reply = await client.get()
    assert reply.status == 503
    assert reply.body.startswith(b"busy ")  # the upstream's own answer
    assert sorted(len(u.requests("/who")) for u in ups) == [1, 1, 1]


async def test_no_retry_once_response_bytes_reached_the_client(nursery: trio.Nursery) -> None:
    # Every upstream sends a 200 head and 10 of 1000 bytes, then closes.
    ups = await start_upstreams(nursery, "a", "b", "c", routes={"/cut": "truncate"})
    async with run_proxy(*upstream_args(ups), *QUIET) as proxy:
        raw = await raw_request(
            proxy.host, proxy.port, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=5
        )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert b"content-length: 1000" in head.lower()
    assert body == b"x" * 10  # then the proxy cut the connection: visibly truncated
    assert sum(len(u.requests("/cut")) for u in ups) == 1


# --- all down ---------------------------------------------------------------------------


async def test_all_upstreams_down_is_a_quick_503_with_retry_after(nursery: trio.Nursery) -> None:
    ups = await start_upstreams(nursery, "a", "b", "c")
    connect_timeout = 2.0
    args = upstream_args(ups)
    async with (
        run_proxy(
            *args, *FAST_HEALTH, "--connect-timeout", str(connect_timeout), health_check=True
        ) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        assert (await client.get()).status == 200
        for upstream in ups:
            await upstream.kill()
        # Before the probers noticed: connecting fails everywhere; never a hang.
        start = trio.current_time()
        early = await client.get()
        early_took = trio.current_time() - start
        assert early.status in (502, 503), early
        assert early_took < connect_timeout
        # Once they noticed: 503 with Retry-After, at once.
        await trio.sleep(FALL * INTERVAL + SLACK)
        start = trio.current_time()
        late = await client.get()
        late_took = trio.current_time() - start
    print(
        f"all down: before the probers noticed {early.status} in {early_took * 1000:.1f} ms; "
        f"after, {late.status} in {late_took * 1000:.1f} ms"
    )
    assert late.status == 503, late
    assert late.headers.get("retry-after") == "1"
    assert b"no upstream available" in late.body
    assert late_took < connect_timeout


# --- the health checker itself ------------------------------------------------------------


async def test_no_health_check_sends_no_probes(nursery: trio.Nursery) -> None:
    ups = await start_upstreams(nursery, "a", "b")
    args = upstream_args(ups)
    async with run_proxy(*args, "--no-health-check", "--health-interval", "0.05", *QUIET) as proxy:
        await trio.sleep(0.5)
        assert all(u.seen == [] for u in ups)
        async with Client(proxy.host, proxy.port) as client:
            assert (await client.get()).status == 200
    assert all(u.probes() == [] for u in ups)


async def test_the_first_probe_round_ends_before_the_proxy_listens(nursery: trio.Nursery) -> None:
    (slow,) = await start_upstreams(nursery, "slow", probe_delay=0.5)
    (own,) = await start_upstreams(nursery, "own")
    dead = Upstream("dead")
    await dead.start(nursery)
    await dead.kill()
    args = upstream_args([slow, own, dead], "", "health_path=/own/health")
    started = trio.current_time()
    async with run_proxy(*args, "--health-path", "/hz", health_check=True) as proxy:
        listening = trio.current_time()
        assert [(p.method, p.target) for p in slow.probes()] == [("HEAD", "/hz")]
        assert [(p.method, p.target) for p in own.probes()] == [("HEAD", "/own/health")]
        probed = slow.probes()[0].at
        # Its answer came 0.5 s after the probe, and the start waited for it.
        assert listening - probed >= 0.5
        assert listening - probed < 0.5 + 2.0
        # No cold start: the dead one was known to be down before the first client.
        async with Client(proxy.host, proxy.port) as client:
            replies = [await client.get() for _ in range(10)]
        assert statuses(replies) == {200: 10}
        assert {r.body for r in replies} == {b"slow", b"own"}
        assert "retrying" not in await proxy.settled_stderr()
    print(f"start with a 0.5 s probe answer: listening {listening - started:.3f} s after launch")


# --- out of the box: the default probe and --health-expect -------------------------------


async def test_the_default_probe_keeps_upstreams_whose_root_is_404_or_head_is_405(
    nursery: trio.Nursery,
) -> None:
    # Default flags: an API with nothing at / (FastAPI, vLLM, nginx with no / location)
    # and a server that answers HEAD with 405 are alive, and get their share.
    (api,) = await start_upstreams(nursery, "api", statuses={"/": 404})
    (get_only,) = await start_upstreams(nursery, "get-only", head_status=405)
    (plain,) = await start_upstreams(nursery, "plain")
    ups = [api, get_only, plain]
    async with (
        run_proxy(*upstream_args(ups), health_check=True) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        replies = [await client.get() for _ in range(30)]
        log = await proxy.settled_stderr()
    assert [(p.method, p.target) for u in ups for p in u.probes()] == [("HEAD", "/")] * 3
    assert statuses(replies) == {200: 30}
    assert [len(u.requests("/who")) for u in ups] == [10, 10, 10]
    assert "unhealthy" not in log, log


async def test_the_default_probe_still_takes_out_a_stopped_or_503_upstream(
    nursery: trio.Nursery,
) -> None:
    stopped, failing, healthy = await start_upstreams(nursery, "stopped", "failing", "healthy")
    args = upstream_args([stopped, failing, healthy])
    async with run_proxy(*args, *FAST_HEALTH, "--admin-port", "0", health_check=True) as proxy:
        admin = await admin_url(proxy)
        start = trio.current_time()
        await stopped.kill()
        failing.statuses.update({"/": 503, "/who": 503})
        within = FALL * INTERVAL + SLACK
        stopped_down = await wait_until_status(
            admin, stopped.url, False, key="healthy", within=within
        )
        failing_down = await wait_until_status(
            admin, failing.url, False, key="healthy", within=within
        )
        assert (await target_status(admin, healthy.url))["healthy"]
        async with Client(proxy.host, proxy.port) as client:
            replies = [await client.get() for _ in range(10)]
    print(
        f"default probe: stopped upstream down after {stopped_down - start:.3f} s, "
        f"503 upstream after {failing_down - start:.3f} s (fall x interval = {FALL * INTERVAL} s)"
    )
    assert {(r.status, r.body) for r in replies} == {(200, b"healthy")}


async def test_a_configured_health_path_answering_404_takes_the_upstream_out(
    nursery: trio.Nursery,
) -> None:
    (a,) = await start_upstreams(nursery, "a", statuses={"/healthz": 404})
    async with (
        run_proxy(*upstream_args([a]), "--health-path", "/healthz", health_check=True) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        reply = await client.get()
        log = await proxy.settled_stderr()
    assert reply.status == 503
    assert a.requests("/who") == []
    assert (
        f"{a.url} is unhealthy at start: status 404 on HEAD /healthz; set health.path "
        "(--health-path, or health_path= per server) and health.expect (--health-expect) "
        "to the statuses it answers"
    ) in log

    # Told that 404 is what its health endpoint answers, the proxy keeps it.
    async with (
        run_proxy(
            *upstream_args([a]),
            "--health-path",
            "/healthz",
            "--health-expect",
            "404",
            health_check=True,
        ) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        reply = await client.get()
    assert (reply.status, reply.body) == (200, b"a")


async def test_a_per_upstream_health_path_expects_200_to_399_from_that_upstream_only(
    nursery: trio.Nursery,
) -> None:
    (a,) = await start_upstreams(nursery, "a", statuses={"/ready": 404})
    (b,) = await start_upstreams(nursery, "b", statuses={"/": 404})
    args = upstream_args([a, b], "health_path=/ready")
    async with (
        run_proxy(*args, health_check=True) as proxy,
        Client(proxy.host, proxy.port) as client,
    ):
        replies = [await client.get() for _ in range(6)]
    assert [(p.method, p.target) for p in a.probes()] == [("HEAD", "/ready")]
    # b has no health path of its own: a liveness probe of /, which its 404 passes.
    assert {(r.status, r.body) for r in replies} == {(200, b"b")}
