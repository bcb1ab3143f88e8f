"""Prometheus metrics, kept with ``prometheus-client`` in a registry per engine.

The exposition format, the histogram math and the text parser are that
library's; what is ours is which series exist and what it costs to keep them.

Series. Label values come only from the configuration (route and upstream group
names, server URLs), from a bounded set (standard methods, else ``other``;
status codes; the model names of :class:`~trioproxy.observe.llm.ModelLabels`),
never from a request's path, host, client address or key. A request that no
route took is counted under ``route=""``, and so is a proxy-made answer's
``upstream``. A reload drops the series of routes (and route-to-group pairs) that
the new config no longer has (:meth:`Metrics.retain`).

Cost. Counting one exchange (:meth:`Metrics.observe_exchange`) takes the
children of its route from a dict of our own, so the hot path never calls
``labels()`` (which validates and formats its arguments under a lock) after a
series' first use. What is already kept by live objects (a server's health and
breaker, requests in flight, pooled connections, open client connections,
WebSocket tunnels) is read when Prometheus scrapes, by :class:`LiveCollector`,
and costs the proxy nothing in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from trioproxy.balance.breaker import BreakerState
from trioproxy.config.model import DEFAULT_BUCKETS

if TYPE_CHECKING:
    from trioproxy.engine import ExchangeLog
    from trioproxy.snapshot import Snapshot

__all__ = [
    "CONTENT_TYPE",
    "SEED_DURATION_BUCKETS",
    "SEED_TTFB_BUCKETS",
    "LiveCollector",
    "Metrics",
    "method_label",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()

#: The LLM-inference proxy's own families keep its buckets, so its dashboards work.
SEED_TTFB_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
SEED_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
#: Decoding throughput buckets (tokens per second).
TOKENS_PER_SECOND_BUCKETS = (1.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0)
#: Time per output token buckets (seconds).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)

_METHODS = {
    m: m.decode()
    for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE")
}
_METHODS[b"PATCH"] = "PATCH"
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def method_label(method: bytes) -> str:
    """The ``method`` label: a standard method (RFC 9110 §9, and PATCH), else ``other``."""
    return _METHODS.get(method, "other")


class _RouteSeries:
    """The children of one (route, upstream group) pair, taken once."""

    __slots__ = (
        "duration",
        "request_bytes",
        "requests",
        "response_bytes",
        "retries",
        "seed",
        "ttfb",
    )

    def __init__(self, metrics: Metrics, route: str, group: str) -> None:
        self.duration = metrics.child(metrics.duration, route, group)
        self.ttfb = metrics.child(metrics.ttfb, route, group)
        self.retries = metrics.child(metrics.retries, route, group)
        self.request_bytes = metrics.child(metrics.request_bytes, route)
        self.response_bytes = metrics.child(metrics.response_bytes, route)
        #: (method label, status) → trioproxy_requests_total's child.
        self.requests: dict[tuple[str, int], Any] = {}
        #: (server URL, endpoint) → the seed families' children (duration, ttfb).
        self.seed: dict[tuple[str, str], tuple[Any, Any]] = {}


class Metrics:
    """The registry of one engine and its families (see the module docstring)."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        # No ``*_created`` series: they double the output and no query of ours uses
        # them (process-wide in prometheus-client; the proxy is its only user here).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        rg = ["route", "upstream"]
        self.requests = Counter(
            "trioproxy_requests",
            "Requests answered, by route, upstream group, method and status",
            ["route", "upstream", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "trioproxy_request_duration_seconds",
            "Request head to the end of the response",
            rg,
            buckets=buckets,
            registry=r,
        )
        self.ttfb = Histogram(
            "trioproxy_time_to_first_byte_seconds",
            "Request head to the upstream's response head",
            rg,
            buckets=buckets,
            registry=r,
        )
        self.retries = Counter(
            "trioproxy_retries", "Attempts beyond the first, on another server", rg, registry=r
        )
        self.request_bytes = Counter(
            "trioproxy_request_bytes", "Request body bytes received", ["route"], registry=r
        )
        self.response_bytes = Counter(
            "trioproxy_response_bytes", "Response body bytes relayed", ["route"], registry=r
        )
        self.reloads = Counter(
            "trioproxy_config_reloads", "Config reloads, by result", ["result"], registry=r
        )
        self.last_reload = Gauge(
            "trioproxy_config_last_reload_success_timestamp_seconds",
            "When the config in use was loaded (Unix time)",
            registry=r,
            # With workers (trioproxy.observe.fleet): the newest of theirs.
            multiprocess_mode="max",
        )
        self.last_reload.set(time.time())
        for result in ("success", "failure"):
            self.reloads.labels(result)
        # The LLM-inference proxy's families, under its names and buckets.
        self.seed_ttfb = Histogram(
            "time_to_first_byte_seconds",
            "Time to first byte, by upstream server URL and endpoint",
            ["url", "endpoint"],
            buckets=SEED_TTFB_BUCKETS,
            registry=r,
        )
        self.seed_duration = Histogram(
            "request_duration_seconds",
            "Request duration, by upstream server URL and endpoint",
            ["url", "endpoint"],
            buckets=SEED_DURATION_BUCKETS,
            registry=r,
        )
        # The LLM stream meter's (trioproxy.observe.meter).
        rgm = ["route", "upstream", "model"]
        self.llm_ttft = Histogram(
            "trioproxy_llm_time_to_first_token_seconds",
            "Request head to the first content event",
            rgm,
            buckets=buckets,
            registry=r,
        )
        self.llm_tpot = Histogram(
            "trioproxy_llm_time_per_output_token_seconds",
            "First to last content event, per output token after the first",
            rgm,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.llm_tps = Histogram(
            "trioproxy_llm_output_tokens_per_second",
            "Decoding throughput: output tokens after the first per second of decoding",
            rgm,
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter(
            "trioproxy_llm_tokens",
            "Tokens, by type (input or output); from usage, else output = content events",
            [*rgm, "type"],
            registry=r,
        )
        self.llm_requests = Counter(
            "trioproxy_llm_requests", "LLM requests", [*rgm, "stream"], registry=r
        )
        self.llm_usage_missing = Counter(
            "trioproxy_llm_usage_missing",
            "LLM replies without usage (cut, or not sent by the upstream)",
            rg,
            registry=r,
        )
        self._series: dict[tuple[str, str], _RouteSeries] = {}
        #: (route, group) → every child made for it, to be removed with it.
        self._owned: dict[tuple[str, str], set[tuple[Any, tuple[str, ...]]]] = {}
        self._owner: tuple[str, str] = ("", "")

    # --- series -------------------------------------------------------------------

    def child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, remembered under the current owner for removal."""
        self._owned.setdefault(self._owner, set()).add((family, labels))
        return family.labels(*labels)

    def owned_child(self, owner: tuple[str, str], family: Any, *labels: str) -> Any:
        self._owner = owner
        return self.child(family, *labels)

    def series(self, route: str, group: str) -> _RouteSeries:
        key = (route, group)
        series = self._series.get(key)
        if series is None:
            self._owner = key
            series = self._series[key] = _RouteSeries(self, route, group)
        return series

    def retain(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop the series of (route, upstream group) pairs not in ``pairs`` (a reload)."""
        keep = set(pairs) | {("", ""), ("-", "")}
        for key in [key for key in self._owned if key not in keep]:
            for family, labels in self._owned.pop(key):
                try:
                    family.remove(*labels)
                except KeyError:
                    pass  # shared with another pair, and removed with it
        # Children cached for the pairs kept may have been shared with one removed
        # (a seed series): take them again from the families on next use.
        self._series.clear()

    # --- what the front end calls at an exchange's end ---------------------------

    def observe_exchange(
        self, method: bytes, record: ExchangeLog, duration: float, endpoint: str | None
    ) -> None:
        """Count one exchange (``duration`` in seconds); ``endpoint`` names an LLM
        request's OpenAI endpoint for the seed families (else the route name)."""
        route = record.route
        if route == "-":
            route = ""
        series = self.series(route, record.group)
        # Keyed by the label, not the bytes: h11 takes any token as a method, and
        # the cache must stay as bounded as the series.
        key = (_METHODS.get(method, "other"), record.status)
        counter = series.requests.get(key)
        if counter is None:
            self._owner = (route, record.group)
            counter = series.requests[key] = self.child(
                self.requests, route, record.group, key[0], str(record.status)
            )
        counter.inc()
        series.duration.observe(duration)
        if record.bytes_out:
            series.response_bytes.inc(record.bytes_out)
        if record.bytes_in:
            series.request_bytes.inc(record.bytes_in)
        if record.retries:
            series.retries.inc(record.retries)
        ttfb = record.head_at - record.started if record.head_at else None
        if ttfb is not None:
            series.ttfb.observe(ttfb)
        url = record.upstream
        if url != "-":
            seed_key = (url, endpoint or route)
            seed = series.seed.get(seed_key)
            if seed is None:
                self._owner = (route, record.group)
                seed = series.seed[seed_key] = (
                    self.child(self.seed_duration, *seed_key),
                    self.child(self.seed_ttfb, *seed_key),
                )
            seed[0].observe(duration)
            if ttfb is not None:
                seed[1].observe(ttfb)

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.last_reload.set(time.time())

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class LiveCollector(Collector):
    """The gauges read from live objects when Prometheus scrapes (see the module
    docstring): nothing is kept for them between scrapes."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        now: Callable[[], float],
        open_connections: Callable[[], dict[str, int]],
        tunnels: dict[str, int],
    ) -> None:
        self._snapshot = snapshot
        self._now = now
        self._open_connections = open_connections
        self._tunnels = tunnels

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(())  # the families are made on each collect

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "trioproxy_upstream_server_up",
            "1 while the server takes requests (healthy and not ejected), else 0",
            labels=["upstream", "server"],
        )
        breaker = GaugeMetricFamily(
            "trioproxy_upstream_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            labels=["upstream", "server"],
        )
        inflight = GaugeMetricFamily(
            "trioproxy_upstream_requests_in_flight",
            "Requests (and WebSocket tunnels) under way on the server",
            labels=["upstream", "server"],
        )
        connections = GaugeMetricFamily(
            "trioproxy_upstream_connections",
            "Pooled upstream connections, idle or active",
            labels=["upstream", "state"],
        )
        snapshot = self._snapshot()
        now = self._now()
        if snapshot is not None:
            for name, group in snapshot.groups.items():
                balancer = group.balancer
                idle = active = 0
                origins = set()
                for target in balancer.targets:
                    server = target.name
                    up.add_metric(
                        [name, server],
                        1.0 if target.healthy and now >= target.ejected_until else 0.0,
                    )
                    state = balancer.breaker(target).state
                    breaker.add_metric([name, server], _BREAKER_VALUE.get(state, 0))
                    inflight.add_metric([name, server], target.inflight)
                    origins.add(target.url.origin)
                for origin in origins:
                    idle += group.pool.idle_count(origin)
                    active += group.pool.in_use_count(origin)
                connections.add_metric([name, "idle"], idle)
                connections.add_metric([name, "active"], active)
        yield up
        yield breaker
        yield inflight
        yield connections
        listeners = GaugeMetricFamily(
            "trioproxy_open_connections", "Open client connections", labels=["listener"]
        )
        for listener, count in self._open_connections().items():
            listeners.add_metric([listener], count)
        yield listeners
        tunnels = GaugeMetricFamily(
            "trioproxy_websocket_tunnels", "Open WebSocket tunnels", labels=["route"]
        )
        routes = {route.name for route in snapshot.routes} if snapshot is not None else set()
        for route in routes:
            tunnels.add_metric([route], self._tunnels.get(route, 0))
        yield tunnels
        # Rate limits (trioproxy.edge.limits): counts kept by the limiters, across
        # reloads by route name; a removed route's series goes with it.
        rejected = CounterMetricFamily(
            "trioproxy_ratelimit_rejected",
            "Requests refused with 429 by a route's rate limits",
            labels=["route"],
        )
        store_errors = CounterMetricFamily(
            "trioproxy_ratelimit_store_errors",
            "Rate limit checks the Redis store failed or was too slow for",
        )
        if snapshot is not None:
            edge = snapshot.edge
            for route, counts in edge.counters.items():
                rejected.add_metric([route], counts.rejected)
            store_errors.add_metric([], edge.redis.errors if edge.redis is not None else 0)
        yield rejected
        yield store_errors
