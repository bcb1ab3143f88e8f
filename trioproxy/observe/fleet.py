"""One ``/metrics`` for several worker processes.

Counters and histograms: prometheus-client's multiprocess mode. The supervisor
gives every worker ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory of its own),
so each worker's counters and histogram buckets are kept in memory-mapped files,
one per process, and the supervisor's ``/metrics`` sums them with
``MultiProcessCollector``. The files of a dead worker stay, so a worker's
restart (a SIGKILL included: nothing is lost since its last request) does not
reset a total. The per-engine registry of :mod:`trioproxy.observe.metrics` works
unchanged: in this mode a family writes its values to the files whichever
registry it is in. The one gauge kept that way,
``trioproxy_config_last_reload_success_timestamp_seconds``, is the newest of
the workers' (``multiprocess_mode="max"``).

Live gauges (:class:`~trioproxy.observe.metrics.LiveCollector`: upstream health,
breakers, requests in flight, pooled and client connections, tunnels, and the
rate limiters' counts) are read from each worker's own ``/metrics`` when
Prometheus scrapes, and shown per worker with a ``worker`` label: a breaker or a
health verdict is each worker's own (see README, "Workers"), and summing a
breaker state would mean nothing. ``sum without (worker)`` adds them up where
that makes sense (requests in flight, connections). A dead worker's live series
are gone until it is back, and its rate limiter counts restart from 0.

``trioproxy_config_reloads_total`` is the supervisor's own count: a reload is
checked once, there, and one that is refused never reaches a worker.

Cost. The library's multiprocess value takes a lock and calls ``os.getpid()`` (a
system call) on every increment, to guard against threads and ``fork``; that made
counting one exchange 10.1 µs instead of 3.7 µs (``Metrics.observe_exchange``,
measured in-process), about 7 % of a proxied request's CPU. A worker has neither:
its metrics are touched by the trio thread only, and it never forks. So a worker
installs :func:`install_worker_values`, the same value writing through to the same
file without them: 4.05 µs per exchange. Every increment still reaches the file at
once, so a SIGKILL loses nothing.

On the proxy's port (``[server] metrics_path``, a ``handler = "metrics"`` route) a
worker answers for the whole fleet too (:func:`worker_exposition`): the summed
counters and histograms, so that every scrape sees the same totals whichever
worker takes it (one worker's own counts, alternating between scrapes, would
look like counter resets to ``rate()``), and the live gauges of the worker that
answered, with its ``worker`` label; the admin listener has every worker's.

What multiprocess mode does not do: a series a reload dropped in a worker
(a removed route) stays in the files, with its last values, until the
supervisor restarts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, values
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

RELOADS = "trioproxy_config_reloads"

#: (the multiprocess directory, this worker's number) in a worker process, set by
#: :func:`install_worker_values`; None in any other process.
_worker: tuple[str, int] | None = None

#: The families :class:`~trioproxy.observe.metrics.LiveCollector` makes, shown per worker.
LIVE_FAMILIES = frozenset(
    {
        "trioproxy_upstream_server_up",
        "trioproxy_upstream_breaker_state",
        "trioproxy_upstream_requests_in_flight",
        "trioproxy_upstream_connections",
        "trioproxy_open_connections",
        "trioproxy_websocket_tunnels",
        "trioproxy_ratelimit_rejected",
        "trioproxy_ratelimit_store_errors",
    }
)


class WorkerLiveCollector(Collector):
    """The live families of each worker's own exposition, with a ``worker`` label."""

    def __init__(self, expositions: Mapping[int, str]) -> None:
        self._expositions = expositions

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, text in sorted(self._expositions.items()):
            for family in text_string_to_metric_families(text):
                if family.name not in LIVE_FAMILIES:
                    continue
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for sample in family.samples:
                    labels = {**sample.labels, "worker": str(worker)}
                    into.add_sample(sample.name, labels, sample.value)
        yield from merged.values()


class _Without(Collector):
    """Another collector's families but those named in ``names``."""

    def __init__(self, inner: Collector, names: frozenset[str]) -> None:
        self._inner = inner
        self._names = names

    def collect(self) -> Iterator[Metric]:
        return (family for family in self._inner.collect() if family.name not in self._names)


class _Reloads(Collector):
    """``trioproxy_config_reloads_total`` as the supervisor counts them: one per
    reload of the whole fleet (the workers would count each once per worker, and
    never see a refused one)."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(RELOADS, "Config reloads, by result", labels=["result"])
        for result, count in sorted(self._counts.items()):
            family.add_metric([result], count)
        yield family


def fleet_exposition(
    directory: str, expositions: Mapping[int, str], reloads: Mapping[str, int]
) -> bytes:
    """The summed counters and histograms of every worker that wrote to
    ``directory`` (alive or not), the live gauges of ``expositions`` (worker
    number → that worker's ``/metrics`` text), and the supervisor's ``reloads``
    (result → count), in Prometheus' text format."""
    summed = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    registry.register(_Without(summed, frozenset({RELOADS})))
    registry.register(_Reloads(reloads))
    registry.register(WorkerLiveCollector(expositions))
    return generate_latest(registry)


def worker_exposition(own: bytes) -> bytes | None:
    """In a worker, what it answers on the proxy's port for ``/metrics`` (see the
    module docstring), from ``own``, its own exposition; None in any other process.

    Its config reloads are its own count: every worker takes each reload the
    supervisor let through, and never sees a refused one.
    """
    if _worker is None:
        return None
    directory, worker = _worker
    text = own.decode("utf-8", "replace")
    reloads = {
        sample.labels.get("result", ""): int(sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == RELOADS
        for sample in family.samples
        if sample.name == RELOADS + "_total"
    }
    return fleet_exposition(directory, {worker: text}, reloads)


def install_worker_values(directory: str, worker: int) -> None:
    """Make the metrics created from now on keep their values as a worker's should
    (see "Cost" in the module docstring), in ``directory``
    (``PROMETHEUS_MULTIPROC_DIR``), and this process answer ``/metrics`` on the
    proxy's port for the whole fleet as worker ``worker``.

    Safe only in a process whose metrics one thread touches and that does not fork
    between creating a metric and using it: a worker process.
    """
    global _worker
    _worker = (directory, worker)
    base: Any = values.MultiProcessValue()  # type: ignore[no-untyped-call]

    class WorkerValue(base):  # type: ignore[misc]
        """The library's mmap-backed value, written through without lock or pid check."""

        def inc(self, amount: float) -> None:
            self._value += amount
            self._timestamp = 0.0
            self._file.write_value(self._key, self._value, 0.0)

    values.ValueClass = WorkerValue
