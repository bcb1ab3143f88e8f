"""Running wrk and reading its report.

wrk counts what must fail a measurement itself: ``Socket errors: connect C, read R,
write W, timeout T`` and ``Non-2xx or 3xx responses: N`` (statuses above 399); both
lines are absent when zero. :func:`parse` reads them with the rest, and the caller
refuses to report numbers from a run that has any.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import attrs

from bench.procs import CORE_LOAD, BenchError, pinned

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}

UPLOAD_SCRIPT = """\
-- POST the same {size}-byte body on every request.
wrk.method = "POST"
wrk.body = string.rep("u", {size})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


@attrs.frozen
class WrkResult:
    requests: int
    duration_s: float
    req_s: float
    read_bytes_s: float
    p50_ms: float
    p99_ms: float
    socket_errors: dict[str, int]
    non_2xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"wrk: cannot read the time {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def _bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text)
    if match is None:
        raise BenchError(f"wrk: cannot read the size {text!r}")
    return float(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse(output: str) -> WrkResult:
    """Read wrk's report (run with ``--latency``).

    Raises:
        BenchError: a line that every report has is missing.
    """

    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise BenchError(f"wrk: no line matching {pattern!r} in:\n{output}")
        return match

    total = need(r"^\s*(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read")
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock is not None:
        errors = dict(zip(errors, (int(g) for g in sock.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(total.group(1)),
        duration_s=_ms(total.group(2)) / 1e3,
        req_s=float(need(r"^Requests/sec:\s+([\d.]+)").group(1)),
        read_bytes_s=_bytes(need(r"^Transfer/sec:\s+([\d.]+\w+)").group(1)),
        p50_ms=_ms(need(r"^\s+50%\s+([\d.]+\w+)").group(1)),
        p99_ms=_ms(need(r"^\s+99%\s+([\d.]+\w+)").group(1)),
        socket_errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run(
    wrk: str,
    url: str,
    *,
    connections: int,
    duration: float,
    script: Path | None = None,
    timeout_s: float = 30.0,
    headers: tuple[str, ...] = (),
) -> WrkResult:
    """One wrk run, one thread, pinned to the load core.

    Raises:
        BenchError: wrk failed or its report could not be read.
    """
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={round(timeout_s)}s",
        "--latency",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            pinned(argv, CORE_LOAD),
            capture_output=True,
            text=True,
            timeout=duration + timeout_s + 30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish in {time.monotonic() - started:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with status {proc.returncode}: {proc.stderr or proc.stdout}")
    return parse(proc.stdout)


def write_upload_script(directory: Path, size: int) -> Path:
    path = directory / f"upload-{size}.lua"
    path.write_text(UPLOAD_SCRIPT.format(size=size))
    return path
