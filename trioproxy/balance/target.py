"""One upstream target as the balancer sees it: configuration plus live state.

Sans-I/O: nothing here reads a clock or a socket. Time comes in as ``now``
(seconds, any monotonic origin: ``trio.current_time()`` in the proxy, plain
floats in tests).
"""

from __future__ import annotations

import attrs

from trioproxy.upstream.origin import UpstreamURL


@attrs.frozen(kw_only=True)
class TargetSpec:
    """A target as configured: ``--upstream URL,weight=3,max_inflight=100,health_path=/x``."""

    url: UpstreamURL
    weight: int = 1
    max_inflight: int | None = None
    health_path: str | None = None


@attrs.define(eq=False)
class Target:
    """A target and what the proxy currently knows about it.

    ``inflight`` counts requests in flight *and* open WebSocket tunnels (for
    ``least_connections`` and ``max_inflight``). ``healthy`` is the active
    probers' verdict; ``ejected_until`` is passive health's (live traffic).
    """

    spec: TargetSpec
    healthy: bool = True
    ejected_until: float = 0.0
    inflight: int = 0
    tunnels: int = 0
    #: Latency EWMA in seconds (probes and live traffic); None until measured.
    latency: float | None = None
    last_latency: float | None = None
    consecutive_failures: int = 0
    requests: int = 0
    failures: int = 0

    @property
    def url(self) -> UpstreamURL:
        return self.spec.url

    @property
    def weight(self) -> int:
        return self.spec.weight

    @property
    def name(self) -> str:
        return self.spec.url.text

    def at_capacity(self) -> bool:
        cap = self.spec.max_inflight
        return cap is not None and self.inflight >= cap

    def record_latency(self, seconds: float, *, alpha: float = 0.3) -> None:
        """Fold one latency sample into the EWMA."""
        self.last_latency = seconds
        if self.latency is None:
            self.latency = seconds
        else:
            self.latency += alpha * (seconds - self.latency)
