"""Active health checks: one prober task per target, in a nursery the service owns.

Each probe opens a *fresh* connection (a probe must test that the target still
accepts connections, which a pooled one would hide), sends ``HEAD`` (or ``GET``)
to the target's health path and expects an answer within ``timeout`` with a
status the settings expect for it (``health_rules``: with no health path
configured, any status below 500; with one, 200-399 or the configured ones).
A target flips to unhealthy after ``fall`` consecutive failed probes and back
after ``rise`` consecutive good ones; every probe's latency feeds the target's
EWMA (which the ``fastest`` strategy reads).

The first round of probes runs for all targets at once and finishes before
``run`` reports itself started, so the proxy never accepts a client while the
health of its targets is unknown: each target starts as its first probe found it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

import attrs
import trio

from trioproxy.balance.health_rules import HealthSettings
from trioproxy.balance.target import Target
from trioproxy.errors import LocalResourcesExhausted, ProxyError
from trioproxy.http.protocol import Body, ClientProtocol, EndOfMessage, RequestHead, ResponseHead
from trioproxy.upstream.connection import Connector, open_connection

__all__ = ["HealthService", "HealthSettings"]

log = logging.getLogger("trioproxy.health")

_MAX_PROBE_BODY = 1 << 16


@attrs.define
class _ProbeState:
    successes: int = 0
    failures: int = 0
    last_error: str = ""
    probes: int = 0


@attrs.define
class HealthService:
    """Runs the probers for a set of targets; ``run`` is a trio service."""

    targets: list[Target]
    settings: HealthSettings = attrs.Factory(HealthSettings)
    ssl_context: ssl.SSLContext | None = None
    connector: Connector | None = None
    protocol_factory: Callable[[int], ClientProtocol] | None = None
    #: Called when probes bring a target back (the balancer lifts what live
    #: traffic held against it, so it returns within rise x interval).
    on_recovered: Callable[[Target], None] | None = None
    #: Appended to the warning for a target that answered its first probe with a
    #: status not expected: how to tell the proxy what its health endpoint is
    #: (the CLI names its flags, the library its arguments).
    status_hint: str = ""
    _states: dict[int, _ProbeState] = attrs.field(factory=dict, init=False)

    def state(self, target: Target) -> _ProbeState:
        return self._states.setdefault(id(target), _ProbeState())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as first_round:
            for target in self.targets:
                first_round.start_soon(self._probe_and_judge, target, True)
        task_status.started()
        async with trio.open_nursery() as probers:
            for target in self.targets:
                probers.start_soon(self._prober, target)

    async def _prober(self, target: Target) -> None:
        while True:
            await trio.sleep(self.settings.interval)
            await self._probe_and_judge(target, False)

    async def _probe_and_judge(self, target: Target, first: bool) -> None:
        ok, latency, detail = await self.probe(target)
        if ok is None:
            # The probe could not be made (see probe): no verdict on the target.
            log.warning("health probe of %s not made: %s", target.name, detail)
            return
        state = self.state(target)
        state.probes += 1
        if latency is not None:
            target.record_latency(latency)
        if ok:
            state.successes += 1
            state.failures = 0
            state.last_error = ""
        else:
            state.failures += 1
            state.successes = 0
            state.last_error = detail
        settings = self.settings
        if first:
            target.healthy = ok
            if not ok:
                # A latency with a failure means the target answered, with a status
                # the settings do not expect: likely a health path to configure.
                hint = f"; {self.status_hint}" if latency is not None and self.status_hint else ""
                log.warning("%s is unhealthy at start: %s%s", target.name, detail, hint)
        elif target.healthy and state.failures >= settings.fall:
            target.healthy = False
            log.warning(
                "%s is now unhealthy after %d failed probes: %s",
                target.name,
                state.failures,
                detail,
            )
        elif not target.healthy and state.successes >= settings.rise:
            target.healthy = True
            log.warning("%s is healthy again after %d good probes", target.name, state.successes)
            if self.on_recovered is not None:
                self.on_recovered(target)

    async def probe(self, target: Target) -> tuple[bool | None, float | None, str]:
        """One probe: (status expected, latency in seconds or None, what went wrong).

        The first is ``None`` when the proxy itself lacked the resources to open the
        probe's connection (:class:`LocalResourcesExhausted`): that says nothing of the
        target, and must not mark it down.
        """
        settings = self.settings
        url = target.url
        own_path = target.spec.health_path
        path = settings.path_for(own_path)
        head = RequestHead(
            method=settings.method,
            target=url.upstream_target(path.encode("ascii")),
            headers=[
                (b"host", url.origin.host_header),
                (b"user-agent", b"trioproxy-health"),
                (b"connection", b"close"),
            ],
        )
        started = trio.current_time()
        with trio.move_on_after(settings.timeout):
            try:
                status = await self._exchange(target, head)
            except LocalResourcesExhausted as exc:
                return None, None, exc.detail
            except ProxyError as exc:
                return False, None, exc.detail
            latency = trio.current_time() - started
            if status in settings.expected_for(own_path):
                return True, latency, ""
            return False, latency, f"status {status} on {settings.method.decode()} {path}"
        return False, None, f"no answer within {settings.timeout} s"

    async def _exchange(self, target: Target, head: RequestHead) -> int:
        kwargs = {}
        if self.protocol_factory is not None:
            kwargs["protocol_factory"] = self.protocol_factory
        conn = await open_connection(
            target.url.origin,
            connect_timeout=self.settings.timeout,
            ssl_context=self.ssl_context,
            max_head_size=65536,
            connector=self.connector,
            **kwargs,
        )
        try:
            protocol = conn.protocol
            await conn.send_mapped(protocol.send_head(head) + protocol.send_end())
            event = await conn.next_event(self.settings.timeout)
            if not isinstance(event, ResponseHead):
                raise ProxyError(f"expected a response head, got {event!r}")
            status = event.status_code
            # Read a small body to its end so that the server is not reset mid-write.
            seen = 0
            while seen < _MAX_PROBE_BODY:
                event = await conn.next_event(self.settings.timeout)
                if type(event) is Body:
                    seen += len(event.data)
                elif type(event) is EndOfMessage:
                    break
                else:
                    break
            return status
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()
