"""One /metrics for several workers (trioproxy.observe.fleet); the processes
themselves: tests/e2e/test_workers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from trioproxy.observe.fleet import fleet_exposition

# A worker: its values kept by install_worker_values, its exchanges counted, and
# it dies without any flush or cleanup (os._exit, as good as SIGKILL here).
_WORKER = """
import os, sys
from trioproxy.observe.fleet import install_worker_values
install_worker_values(os.environ["PROMETHEUS_MULTIPROC_DIR"], 0)
from trioproxy.engine import ExchangeLog
from trioproxy.observe.metrics import Metrics
metrics = Metrics()
record = ExchangeLog(route="r", upstream="http://u", status=200, bytes_out=10,
                     started=1.0, head_at=1.5, group="g")
for _ in range(int(sys.argv[1])):
    metrics.observe_exchange(b"GET", record, 2.0, None)
os._exit(0)
"""


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counts_of_dead_workers_are_summed(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in (3, 4):
        subprocess.run([sys.executable, "-c", _WORKER, str(count)], env=env, check=True)
    text = fleet_exposition(str(tmp_path), {}, {"success": 2, "failure": 1}).decode()
    samples = _samples(text)
    labels = {("route", "r"), ("upstream", "g"), ("method", "GET"), ("code", "200")}
    assert samples[("trioproxy_requests_total", frozenset(labels))] == 7
    rg = frozenset({("route", "r"), ("upstream", "g")})
    assert samples[("trioproxy_request_duration_seconds_count", rg)] == 7
    assert samples[("trioproxy_request_duration_seconds_sum", rg)] == 14.0
    assert samples[("trioproxy_response_bytes_total", frozenset({("route", "r")}))] == 70
    # Reloads are the supervisor's, not the workers' (which counted none here).
    assert samples[("trioproxy_config_reloads_total", frozenset({("result", "success")}))] == 2
    assert samples[("trioproxy_config_reloads_total", frozenset({("result", "failure")}))] == 1


def test_live_gauges_carry_the_worker_and_other_families_are_not_taken(tmp_path: Path) -> None:
    def worker(connections: int) -> str:
        return (
            "# HELP trioproxy_open_connections Open client connections\n"
            "# TYPE trioproxy_open_connections gauge\n"
            f'trioproxy_open_connections{{listener="proxy"}} {connections}\n'
            "# HELP trioproxy_requests_total Requests answered\n"
            "# TYPE trioproxy_requests_total counter\n"
            'trioproxy_requests_total{code="200"} 99\n'
        )

    text = fleet_exposition(str(tmp_path), {0: worker(3), 1: worker(5)}, {}).decode()
    samples = _samples(text)
    assert (
        samples[("trioproxy_open_connections", frozenset({("listener", "proxy"), ("worker", "0")}))]
        == 3
    )
    assert (
        samples[("trioproxy_open_connections", frozenset({("listener", "proxy"), ("worker", "1")}))]
        == 5
    )
    # Counters come from the files only (none here), never from a worker's own text.
    assert not [key for key in samples if key[0] == "trioproxy_requests_total"]
