"""The metrics registry without sockets: label bounding, series per exchange, and the
series a reload drops (``trioproxy.observe.metrics``)."""

from __future__ import annotations

from e2e.metrics_helpers import parse

from trioproxy.engine import ExchangeLog
from trioproxy.observe.metrics import Metrics, method_label


def exchange(route: str = "users", group: str = "api", status: int = 200) -> ExchangeLog:
    return ExchangeLog(
        route=route,
        group=group,
        upstream="http://10.0.0.1:9000",
        status=status,
        bytes_out=10,
        started=1.0,
        head_at=1.25,
    )


def test_methods_outside_the_standard_set_are_other() -> None:
    for method in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"):
        assert method_label(method) == method.decode()
    for method in (b"PROPFIND", b"get", b"BREW", b"X" * 100):
        assert method_label(method) == "other"


def test_one_exchange_is_counted_once_in_each_family() -> None:
    metrics = Metrics(buckets=(0.1, 1.0))
    metrics.observe_exchange(b"GET", exchange(), 0.5, None)
    metrics.observe_exchange(b"BREW", exchange(status=418), 0.05, None)
    scrape = parse(metrics.exposition().decode())
    labels = {"route": "users", "upstream": "api"}
    assert scrape.value("trioproxy_requests_total", **labels, method="GET", code="200") == 1
    assert scrape.value("trioproxy_requests_total", **labels, method="other", code="418") == 1
    assert scrape.value("trioproxy_request_duration_seconds_bucket", **labels, le="0.1") == 1
    assert scrape.value("trioproxy_request_duration_seconds_bucket", **labels, le="1.0") == 2
    assert scrape.value("trioproxy_time_to_first_byte_seconds_sum", **labels) == 0.5
    assert scrape.value("trioproxy_response_bytes_total", route="users") == 20
    seed = {"url": "http://10.0.0.1:9000", "endpoint": "users"}
    assert scrape.value("request_duration_seconds_count", **seed) == 2


def test_a_reload_drops_the_series_of_removed_routes_only() -> None:
    metrics = Metrics()
    metrics.observe_exchange(b"GET", exchange("users", "api"), 0.1, None)
    metrics.observe_exchange(b"GET", exchange("orders", "api"), 0.1, None)
    metrics.observe_exchange(b"GET", exchange("orders", "api"), 0.1, "/v1/chat/completions")
    metrics.retain([("users", "api")])
    scrape = parse(metrics.exposition().decode())
    assert not [key for key in scrape.samples if ("route", "orders") in key[1]]
    assert not scrape.matching("request_duration_seconds_count", endpoint="orders")
    assert (
        scrape.value(
            "trioproxy_requests_total", route="users", upstream="api", method="GET", code="200"
        )
        == 1
    )
    # The kept route goes on counting into the same series.
    metrics.observe_exchange(b"GET", exchange("users", "api"), 0.1, None)
    scrape = parse(metrics.exposition().decode())
    assert (
        scrape.value(
            "trioproxy_requests_total", route="users", upstream="api", method="GET", code="200"
        )
        == 2
    )


def test_random_methods_add_neither_series_nor_cache_entries() -> None:
    metrics = Metrics()
    for i in range(1000):
        metrics.observe_exchange(f"M{i}".encode(), exchange(status=405), 0.01, None)
    series = metrics.series("users", "api")
    assert list(series.requests) == [("other", 405)]
    scrape = parse(metrics.exposition().decode())
    assert scrape.matching("trioproxy_requests_total") == {
        frozenset(
            {"route": "users", "upstream": "api", "method": "other", "code": "405"}.items()
        ): 1000
    }
