"""The design's own ceiling: the CPU cost of the protocol work one proxied request needs.

A proxied request is two HTTP/1.1 cycles: a server-side one with the client (parse its
request, serialize our response) and a client-side one with the upstream (serialize the
request, parse its response). This module runs that pair in-process with no I/O, on the
exact bytes of the small-GET scenario (wrk's request, nginx's 100-byte response), and
times it:

``h11``
    the h11 library alone: ``receive_data`` / ``next_event`` / ``send`` for both roles.
``httptools``
    llhttp's parsers with a minimal hand serializer (no validation): a lower bound.
``seam-h11``, ``seam-httptools``
    the same pair through trioproxy's parser seam (``trioproxy.http.parsers``), which adds
    the proxy's own strictness checks; reported as "n/a" with the reason if the seam's
    API changed.

``1 / cost`` is the request rate a single core could reach if the proxy did nothing but
this work; ``trioproxy(h11) / ceiling(h11)`` tells how much of the core the rest (I/O,
trio scheduling, header rules, pooling) takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import h11
import httptools

from bench.servers import SMALL_BODY

REPO_DIR = Path(__file__).resolve().parent.parent

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Length: 100\r\n"
    b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "65920080-64"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
)
RESPONSE = RESPONSE_HEAD + SMALL_BODY


@attrs.frozen
class CycleCost:
    name: str
    us_per_pair: float | None
    reason: str = ""

    @property
    def ceiling_req_s(self) -> float | None:
        return None if self.us_per_pair is None else 1e6 / self.us_per_pair

    def to_json(self) -> dict[str, object]:
        return {
            "us_per_pair": self.us_per_pair,
            "ceiling_req_s": self.ceiling_req_s,
            "reason": self.reason,
        }


def h11_pair() -> Callable[[], bytes]:
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)

    def pair() -> bytes:
        server.receive_data(REQUEST)
        request = server.next_event()
        assert isinstance(request, h11.Request)
        assert isinstance(server.next_event(), h11.EndOfMessage)
        upstream = client.send(
            h11.Request(method=request.method, target=request.target, headers=request.headers)
        )
        upstream += client.send(h11.EndOfMessage()) or b""
        client.receive_data(RESPONSE)
        response = client.next_event()
        assert isinstance(response, h11.Response)
        body = b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        out = server.send(h11.Response(status_code=response.status_code, headers=response.headers))
        out += server.send(h11.Data(data=body)) or b""
        out += server.send(h11.EndOfMessage()) or b""
        server.start_next_cycle()
        client.start_next_cycle()
        return (upstream or b"") + (out or b"")

    return pair


class _Collect:
    """httptools callbacks shared by both roles."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False

    def reset(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def httptools_pair() -> Callable[[], bytes]:
    request_cb = _Collect()
    response_cb = _Collect()
    server = httptools.HttpRequestParser(request_cb)
    client = httptools.HttpResponseParser(response_cb)

    def pair() -> bytes:
        request_cb.reset()
        server.feed_data(REQUEST)
        assert request_cb.complete
        upstream = b"%s %s HTTP/1.1\r\n%s\r\n" % (
            server.get_method(),
            request_cb.url,
            b"".join(b"%s: %s\r\n" % h for h in request_cb.headers),
        )
        response_cb.reset()
        client.feed_data(RESPONSE)
        assert response_cb.complete
        out = b"HTTP/1.1 %d OK\r\n%s\r\n%s" % (
            client.get_status_code(),
            b"".join(b"%s: %s\r\n" % h for h in response_cb.headers),
            b"".join(response_cb.body),
        )
        return upstream + out

    return pair


def seam_pair(choice: str) -> Callable[[], bytes]:
    """The pair through trioproxy's parser seam (``h11`` or ``httptools``)."""
    from trioproxy.http import protocol as p
    from trioproxy.http.parsers import client_factory, server_factory

    server = server_factory(choice)(65536)
    client = client_factory(choice)(65536)

    def pair() -> bytes:
        server.receive_data(REQUEST)
        head = server.next_event()
        assert isinstance(head, p.RequestHead), head
        assert isinstance(server.next_event(), p.EndOfMessage)
        upstream = client.send_head(
            p.RequestHead(method=head.method, target=head.target, headers=head.headers)
        )
        upstream += client.send_end()
        client.receive_data(RESPONSE)
        response = client.next_event()
        assert isinstance(response, p.ResponseHead), response
        out = server.send_head(
            p.ResponseHead(
                status_code=response.status_code, headers=response.headers, reason=response.reason
            )
        )
        while True:
            event = client.next_event()
            if isinstance(event, p.Body):
                out += server.send_body(event.data)
            elif isinstance(event, p.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        out += server.send_end()
        server.start_next_cycle()
        client.start_next_cycle()
        return upstream + out

    return pair


def _calibrate(pair: Callable[[], bytes]) -> float:
    """Seconds per call of ``pair``, roughly (50 ms of calls); checks that it works."""
    out = pair()
    if SMALL_BODY not in out or b"GET /small" not in out:
        raise AssertionError("the pair did not carry the request and the body")
    n = 0
    started = time.perf_counter()
    while time.perf_counter() - started < 0.05:
        pair()
        n += 1
    return (time.perf_counter() - started) / n


IMPLEMENTATIONS: dict[str, Callable[[], Callable[[], bytes]]] = {
    "h11": h11_pair,
    "httptools": httptools_pair,
    "seam-h11": lambda: seam_pair("h11"),
    "seam-httptools": lambda: seam_pair("httptools"),
}

#: Batches per implementation; they are interleaved (h11, httptools, seam-h11,
#: seam-httptools, h11, ...), so that a disturbance lands on all of them alike.
BATCHES = 15


def measure(*, budget_s: float = 1.0, batches: int = BATCHES) -> list[CycleCost]:
    """Time every implementation, ``budget_s`` each, as the median of interleaved batches.

    One that cannot run is reported with its reason.
    """
    pairs: dict[str, tuple[Callable[[], bytes], int]] = {}
    costs: dict[str, CycleCost] = {}
    for name, make in IMPLEMENTATIONS.items():
        try:
            pair = make()
            per_batch = max(1, int(budget_s / batches / _calibrate(pair)))
        except (ImportError, AttributeError, TypeError, AssertionError, ValueError) as exc:
            # The seam is trioproxy's and moves with it: say why, do not guess a number.
            costs[name] = CycleCost(name, None, f"n/a ({type(exc).__name__}: {exc})")
            continue
        pairs[name] = (pair, per_batch)
    samples: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(batches):
        for name, (pair, per_batch) in pairs.items():
            t0 = time.perf_counter()
            for _ in range(per_batch):
                pair()
            samples[name].append((time.perf_counter() - t0) / per_batch)
    for name, taken in samples.items():
        costs[name] = CycleCost(name, statistics.median(taken) * 1e6)
    return [costs[name] for name in IMPLEMENTATIONS]


def measure_on_core(core: int | None, *, budget_s: float = 1.0) -> list[CycleCost]:
    """:func:`measure` in a fresh interpreter pinned to ``core`` (the contender's), with
    the collector set as trioproxy sets its own (``gc.freeze``, gen-0 threshold).

    The bench's own process is the wrong place: it shares core 0 with the load
    generators and back ends, and its heap grows over a run. Measured there, the same
    h11 pair took 154 to 302 µs from one repetition to the next.
    """
    argv = [sys.executable, "-m", "bench.ceiling", "--json", "--budget", str(budget_s)]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    try:
        done = subprocess.run(
            argv, cwd=REPO_DIR, capture_output=True, text=True, timeout=60 + 8 * budget_s
        )
    except subprocess.TimeoutExpired:
        reason = "n/a (the ceiling process did not finish)"
    else:
        try:
            data = json.loads(done.stdout)
            return [
                CycleCost(name, entry["us_per_pair"], entry["reason"])
                for name, entry in data.items()
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            reason = f"n/a (the ceiling process failed: {last[0]})"
    return [CycleCost(name, None, reason) for name in IMPLEMENTATIONS]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per implementation")
    parser.add_argument("--json", action="store_true", help="print JSON (for the bench)")
    args = parser.parse_args()
    from trioproxy.__main__ import tune_gc

    tune_gc()
    costs = measure(budget_s=args.budget)
    if args.json:
        print(json.dumps({cost.name: cost.to_json() for cost in costs}))
        return
    for cost in costs:
        if cost.us_per_pair is None:
            print(f"{cost.name:16} {cost.reason}")
        else:
            print(
                f"{cost.name:16} {cost.us_per_pair:7.2f} µs/pair  {cost.ceiling_req_s:9.0f} req/s"
            )


if __name__ == "__main__":
    main()
