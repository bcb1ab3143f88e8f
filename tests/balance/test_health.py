"""Active health checks over memory streams, with trio's autojump clock.

``HealthService`` is given a ``connector`` that hands each probe's connection to a
:class:`memory.FakeUpstream` (one per target host), so every probe is a real HTTP/1.1
exchange, and every interval and timeout passes instantly yet in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
from memory import FakeUpstream, Handler, ReceivedRequest, Reply, UpstreamPeer, ok

from trioproxy.balance.health import HealthService, HealthSettings
from trioproxy.balance.health_rules import StatusRanges
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.upstream.origin import Origin, UpstreamURL

pytestmark = pytest.mark.timeout(10)

App = Callable[[ReceivedRequest], Awaitable[Reply]]


class Upstreams:
    """One FakeUpstream per target host; ``connector`` is what the HealthService dials."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.by_host: dict[str, FakeUpstream] = {}

    def add(
        self,
        host: str,
        app: App | None = None,
        *,
        refuse: bool = False,
        handler: Handler | None = None,
    ) -> FakeUpstream:
        fake = FakeUpstream(self.nursery, handler, app=app or _ok, refuse=refuse)
        self.by_host[host] = fake
        return fake

    async def connector(self, origin: Origin) -> trio.abc.Stream:
        return await self.by_host[origin.host].connector(origin)


async def _ok(request: ReceivedRequest) -> Reply:
    return ok(b"fine")


def status_app(box: list[int], delay: float = 0.0) -> App:
    """Answers ``box[0]`` (change it to change the answer), after ``delay`` seconds."""

    async def app(request: ReceivedRequest) -> Reply:
        if delay:
            await trio.sleep(delay)
        return Reply(box[0], [(b"content-length", b"0")])

    return app


def target(host: str, *, health_path: str | None = None, prefix: str = "") -> Target:
    url = UpstreamURL.parse(f"http://{host}:8000{prefix}")
    return Target(TargetSpec(url=url, health_path=health_path))


def service(upstreams: Upstreams, targets: list[Target], **settings: object) -> HealthService:
    return HealthService(
        targets,
        HealthSettings(**settings),  # type: ignore[arg-type]
        connector=upstreams.connector,
    )


# --- the first round ------------------------------------------------------------------


async def test_first_round_completes_before_started(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    # Probed all at once: three 1 s answers take 1 s in all, not 3.
    fakes = [upstreams.add(host, status_app([200], delay=1.0)) for host in "abc"]
    targets = [target(host) for host in "abc"]
    health = service(upstreams, targets, interval=10.0, timeout=2.0)
    start = trio.current_time()
    await nursery.start(health.run)
    assert trio.current_time() - start == pytest.approx(1.0)
    for fake, t in zip(fakes, targets, strict=True):
        assert len(fake.requests) == 1
        assert health.state(t).probes == 1
        assert t.healthy
        assert t.last_latency == pytest.approx(1.0)


async def test_a_target_failing_its_first_probe_starts_unhealthy(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    upstreams.add("good")
    upstreams.add("refused", refuse=True)
    upstreams.add("erroring", status_app([500]))
    upstreams.add("silent", status_app([200], delay=60.0))
    good, refused, erroring, silent = (target(h) for h in ("good", "refused", "erroring", "silent"))
    # fall=3, but at start one probe is all there is to go by.
    health = service(upstreams, [good, refused, erroring, silent], fall=3, timeout=2.0)
    start = trio.current_time()
    await nursery.start(health.run)
    # The round waits for the silent one's timeout, no longer.
    assert trio.current_time() - start == pytest.approx(2.0)
    assert good.healthy
    assert not refused.healthy
    assert not erroring.healthy
    assert not silent.healthy
    assert health.state(erroring).last_error == "status 500 on HEAD /"
    assert "no answer within 2.0 s" in health.state(silent).last_error
    assert health.state(refused).last_error


async def test_an_unhealthy_start_needs_rise_good_probes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    box = [503]
    upstreams.add("a", status_app(box))
    a = target("a")
    await nursery.start(service(upstreams, [a], interval=5.0, rise=3).run)
    assert not a.healthy
    box[0] = 200
    await trio.sleep(5.0 * 2 + 1)  # two good probes
    assert not a.healthy
    await trio.sleep(5.0)  # the third
    assert a.healthy


# --- rise and fall ----------------------------------------------------------------------


async def test_fall_failures_in_a_row_flip_it_unhealthy_and_rise_successes_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    box = [200]
    fake = upstreams.add("a", status_app(box))
    a = target("a")
    interval = 5.0
    health = service(upstreams, [a], interval=interval, fall=3, rise=2)
    await nursery.start(health.run)
    assert a.healthy
    await trio.sleep(interval / 2)  # between probes from here on

    box[0] = 500
    for _ in range(2):
        await trio.sleep(interval)
        assert a.healthy
    await trio.sleep(interval)  # the third failure in a row
    assert not a.healthy
    assert health.state(a).failures == 3

    box[0] = 200
    await trio.sleep(interval)
    assert not a.healthy
    await trio.sleep(interval)  # the second success in a row
    assert a.healthy
    assert len(fake.requests) == 1 + 3 + 2


async def test_an_interrupted_run_of_failures_does_not_flip_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    box = [200]
    upstreams.add("a", status_app(box))
    a = target("a")
    interval = 1.0
    await nursery.start(service(upstreams, [a], interval=interval, fall=3, rise=2).run)
    await trio.sleep(interval / 2)
    for answers in ([500, 500, 200] * 3, [500] * 2):
        for status in answers:
            box[0] = status
            await trio.sleep(interval)
            assert a.healthy, status
    box[0] = 500
    await trio.sleep(interval)
    assert not a.healthy
    # And the same for rise: a failure in between starts the count again.
    for status in (200, 500, 200, 500):
        box[0] = status
        await trio.sleep(interval)
        assert not a.healthy
    box[0] = 200
    await trio.sleep(interval * 2)
    assert a.healthy


# --- what counts as a good answer ----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "good"),
    [(200, True), (302, True), (404, True), (405, True), (499, True), (500, False), (503, False)],
)
async def test_with_no_health_path_any_answer_below_500_passes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, status: int, good: bool
) -> None:
    # The default probe is liveness: an API whose / is 404, or a server answering
    # HEAD with 405, is up; a 5xx says it cannot serve.
    upstreams = Upstreams(nursery)
    upstreams.add("a", status_app([status]))
    a = target("a")
    health = service(upstreams, [a])
    result, latency, detail = await health.probe(a)
    assert (result, detail) == (good, "" if good else f"status {status} on HEAD /")
    assert latency == 0.0  # an answer, good or bad, is measured (memory streams: no time)


@pytest.mark.parametrize(
    ("status", "good"),
    [(200, True), (204, True), (302, True), (399, True), (404, False), (500, False), (503, False)],
)
@pytest.mark.parametrize("where", ["global", "per-target"])
async def test_a_configured_health_path_expects_200_to_399(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    status: int,
    good: bool,
    where: str,
) -> None:
    upstreams = Upstreams(nursery)
    upstreams.add("a", status_app([status]))
    a = target("a", health_path=None if where == "global" else "/healthz")
    health = service(upstreams, [a], path="/healthz" if where == "global" else None)
    result, _, detail = await health.probe(a)
    assert (result, detail) == (good, "" if good else f"status {status} on HEAD /healthz")


async def test_a_per_target_health_path_leaves_the_others_on_liveness(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    upstreams.add("own", status_app([404]))
    upstreams.add("plain", status_app([404]))
    own, plain = target("own", health_path="/ready"), target("plain")
    await nursery.start(service(upstreams, [own, plain]).run)
    assert not own.healthy
    assert plain.healthy


@pytest.mark.parametrize("path", [None, "/healthz"])
async def test_expected_statuses_can_be_set(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, path: str | None
) -> None:
    upstreams = Upstreams(nursery)
    box = [302]
    upstreams.add("a", status_app(box))
    a = target("a")
    health = service(upstreams, [a], path=path, expect=StatusRanges.parse("200-299,404"))
    assert (await health.probe(a))[0] is False
    box[0] = 404
    assert (await health.probe(a))[0] is True


async def test_garbage_instead_of_http_fails_the_default_probe(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def not_http(peer: UpstreamPeer) -> None:
        await peer.receive_some()
        await peer.send(b"SSH-2.0-OpenSSH_9.6\r\n")
        await peer.aclose()

    upstreams = Upstreams(nursery)
    upstreams.add("ssh", handler=not_http)
    ssh = target("ssh")
    result, latency, detail = await service(upstreams, [ssh]).probe(ssh)
    assert (result, latency) == (False, None)
    assert detail


async def test_the_first_round_warning_names_the_status_and_the_fix(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstreams = Upstreams(nursery)
    upstreams.add("a", status_app([404]))
    upstreams.add("dead", refuse=True)
    a, dead = target("a"), target("dead")
    health = HealthService(
        [a, dead],
        HealthSettings(path="/healthz"),
        connector=upstreams.connector,
        status_hint="set --health-path and --health-expect",
    )
    with caplog.at_level("WARNING", logger="trioproxy.health"):
        await nursery.start(health.run)
    lines = {record.getMessage() for record in caplog.records}
    assert (
        "http://a:8000 is unhealthy at start: status 404 on HEAD /healthz; "
        "set --health-path and --health-expect"
    ) in lines
    # A refused connection is no matter of paths or statuses: no such advice.
    (refused,) = [line for line in lines if line.startswith("http://dead:8000")]
    assert "--health-path" not in refused


async def test_a_probe_slower_than_the_timeout_fails(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    box = [200]
    delay = [0.5]

    async def app(request: ReceivedRequest) -> Reply:
        await trio.sleep(delay[0])
        return Reply(box[0], [(b"content-length", b"0")])

    upstreams.add("a", app)
    a = target("a")
    interval = 5.0
    health = service(upstreams, [a], interval=interval, timeout=1.0, fall=2)
    await nursery.start(health.run)
    assert a.healthy and a.last_latency == pytest.approx(0.5)
    delay[0] = 1.5
    start = trio.current_time()
    assert await health.probe(a) == (False, None, "no answer within 1.0 s")
    assert trio.current_time() - start == pytest.approx(1.0)
    await trio.sleep(interval + 0.1)
    await trio.sleep(interval + 1.0)
    assert not a.healthy  # two timeouts in a row
    # A timed-out probe has no latency to report; the last measured one stays.
    assert a.last_latency == pytest.approx(0.5)


# --- what a probe sends -------------------------------------------------------------


async def test_probe_request_head_and_a_fresh_connection_each_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    fake = upstreams.add("a")
    a = target("a")
    health = service(upstreams, [a], interval=1.0)
    await nursery.start(health.run)
    await trio.sleep(2.5)
    assert fake.accepted == 3  # one connection per probe: it must test accepting
    for request in fake.requests:
        assert request.method == b"HEAD"
        assert request.target == b"/"
        assert request.header(b"host") == b"a:8000"
        assert request.header(b"user-agent") == b"trioproxy-health"
        assert request.header(b"connection") == b"close"


async def test_probe_method_and_paths(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    plain, own, prefixed = upstreams.add("plain"), upstreams.add("own"), upstreams.add("prefixed")
    targets = [
        target("plain"),
        target("own", health_path="/v1/status"),
        target("prefixed", prefix="/api"),
    ]
    health = service(upstreams, targets, method=b"GET", path="/healthz")
    await nursery.start(health.run)
    assert [(r.method, r.target) for r in plain.requests] == [(b"GET", b"/healthz")]
    # The target's own health path overrides the global one.
    assert [r.target for r in own.requests] == [b"/v1/status"]
    # A target with a path prefix is probed under it, as its requests are.
    assert [r.target for r in prefixed.requests] == [b"/api/healthz"]
    assert all(t.healthy for t in targets)


async def test_probe_latency_feeds_the_targets_ewma(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)
    delay = [0.010]

    async def app(request: ReceivedRequest) -> Reply:
        await trio.sleep(delay[0])
        return ok(b"")

    upstreams.add("a", app)
    a = target("a")
    await nursery.start(service(upstreams, [a], interval=1.0).run)
    assert a.latency == pytest.approx(0.010) and a.last_latency == pytest.approx(0.010)
    delay[0] = 0.030
    await trio.sleep(1.5)
    assert a.last_latency == pytest.approx(0.030)
    assert a.latency == pytest.approx(0.010 + 0.3 * (0.030 - 0.010))


async def test_a_probe_reads_a_body_to_its_end(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstreams = Upstreams(nursery)

    async def app(request: ReceivedRequest) -> Reply:
        body = [b"x" * 1000] * 10
        return Reply(200, [(b"content-length", b"10000")], body)

    upstreams.add("a", app)
    a = target("a")
    health = service(upstreams, [a], method=b"GET")
    assert (await health.probe(a))[0] is True
