"""The bench must not rot: ``python -m bench --smoke`` runs end to end in the test suite.

The smoke run needs nothing outside the project's virtualenv (no nginx, no wrk, no
peers): trioproxy, with each parser and with the 50-route config of
``bench/gateway.py``, behind the bench's own Python back end, loaded by the bench's own
Python client for two seconds. It must exit 0 and report a request rate
above zero with zero errors. The parser of wrk's report, which a full run relies on to
refuse numbers from a run with errors, is checked on fixed texts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import REPO_ROOT

# bench/ is a tool beside the package, not installed with it: import it from the tree
# (``python -m pytest`` from the root has it on sys.path already; ``pytest`` may not).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import wrk

#: The smoke run's own budget is < 30 s; this leaves room for a slow CI machine.
SMOKE_TIMEOUT = 60.0


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_smoke_run_reports_requests_and_no_errors(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=SMOKE_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench stops the servers it started on its way out.
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"python -m bench --smoke took more than {SMOKE_TIMEOUT:.0f} s")
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "req/s" in stdout

    data = json.loads((tmp_path / "latest.json").read_text())
    measurements = data["measurements"]
    assert {(m["scenario"], m["contender"]) for m in measurements} == {
        ("smoke-get-16", "trioproxy"),
        ("smoke-get-16", "trioproxy-h11"),
        # The 50-route config: a request that missed its route would get a 404.
        ("smoke-routes-16", "trioproxy-50routes"),
    }
    for m in measurements:
        assert m["status"] == "ok", m
        assert m["metrics"]["req_s"] > 0, m
        assert m["metrics"]["errors"] == 0, m
    ceilings = dict(data["ceiling"])
    assert ceilings["h11"]["us_per_pair"] > 0
    assert ceilings["httptools"]["us_per_pair"] > 0


WRK_CLEAN = """\
Running 3s test @ http://127.0.0.1:8080/small
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.51ms  300.23us   9.87ms   90.12%
    Req/Sec    42.50k     2.01k   45.10k    70.00%
  Latency Distribution
     50%    1.48ms
     75%    1.60ms
     90%    1.75ms
     99%    2.95ms
  127000 requests in 3.00s, 42.63MB read
Requests/sec:  42333.33
Transfer/sec:     14.21MB
"""

WRK_ERRORS = """\
Running 3s test @ http://127.0.0.1:8080/small
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   850.00us  100.00us   2.00s    99.00%
    Req/Sec     1.20k   100.00     1.30k    70.00%
  Latency Distribution
     50%  800.00us
     75%  900.00us
     90%    1.00ms
     99%    1.50s
  3600 requests in 3.00s, 1.02MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:   1200.00
Transfer/sec:    348.16KB
"""


def test_wrk_report_is_read() -> None:
    result = wrk.parse(WRK_CLEAN)
    assert result.requests == 127000
    assert result.req_s == pytest.approx(42333.33)
    assert result.read_bytes_s == pytest.approx(14.21 * (1 << 20))
    assert result.p50_ms == pytest.approx(1.48)
    assert result.p99_ms == pytest.approx(2.95)
    assert result.errors == 0
    assert result.non_2xx == 0


def test_wrk_errors_are_read() -> None:
    result = wrk.parse(WRK_ERRORS)
    assert result.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 2}
    assert result.errors == 5
    assert result.non_2xx == 7
    assert result.p50_ms == pytest.approx(0.8)
    assert result.p99_ms == pytest.approx(1500.0)
    assert result.read_bytes_s == pytest.approx(348.16 * 1024)
