"""Running h2load (nghttp2's load generator) and reading its report.

h2load speaks HTTP/2 with prior knowledge over cleartext (``http://`` URLs: h2c) and,
with ``--h1``, HTTP/1.1 over the same code path: the pair measures what HTTP/2 costs a
server against HTTP/1.1 with the load generator held the same. It reports the mean
time per request, not percentiles; a run with failed, errored or timed-out requests,
or any status but 2xx, must not report numbers (the caller checks).

Warm-up and measurement are one run (``--warm-up-time``), not two: hypercorn 0.18's
trio worker stops serving after h2load ends a run with streams in flight (its HTTP/2
send path raises ``trio.BusyResourceError: another task is currently sending data on
this SocketStream`` and the server no longer answers; hypercorn alone, with no proxy
in it, does the same), so each contender gets one h2load run per start.
"""

from __future__ import annotations

import re
import subprocess
import time

import attrs

from bench.procs import CORE_LOAD, BenchError, pinned

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@attrs.frozen
class H2loadResult:
    requests: int
    req_s: float
    mean_ms: float
    failed: int
    non_2xx: int
    #: The report as printed, for a failure's message.
    output: str = ""


def parse(output: str) -> H2loadResult:
    """Read h2load's report.

    Raises:
        BenchError: a line that every report has is missing.
    """

    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise BenchError(f"h2load: no line matching {pattern!r} in:\n{output}")
        return match

    rate = need(r"^finished in [\d.]+\w+, ([\d.]+) req/s")
    counts = need(
        r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout"
    )
    statuses = need(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    mean = need(r"^time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)")
    return H2loadResult(
        requests=int(counts.group(3)),
        req_s=float(rate.group(1)),
        mean_ms=float(mean.group(1)) * _TIME_UNITS[mean.group(2)],
        failed=int(counts.group(4)) + int(counts.group(5)) + int(counts.group(6)),
        non_2xx=sum(int(statuses.group(i)) for i in (2, 3, 4)),
        output=output,
    )


def run(
    h2load: str,
    url: str,
    *,
    connections: int,
    duration: float,
    warmup: float = 0.0,
    h1: bool = False,
) -> H2loadResult:
    """One h2load run (``warmup`` seconds not counted, then ``duration``), one thread,
    one stream per connection, pinned to the load core.

    Raises:
        BenchError: h2load failed or its report could not be read.
    """
    argv = [h2load, "-t1", f"-c{connections}", "-m1", f"-D{max(1, round(duration))}"]
    if warmup:
        argv.append(f"--warm-up-time={max(1, round(warmup))}")
    if h1:
        argv.append("--h1")
    argv.append(url)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            pinned(argv, CORE_LOAD), capture_output=True, text=True, timeout=warmup + duration + 60,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"h2load did not finish in {time.monotonic() - started:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(
            f"h2load exited with status {proc.returncode}: {proc.stderr or proc.stdout}"
        )
    return parse(proc.stdout)
