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

import statistics
import time
from collections.abc import Callable

import attrs
import h11
import httptools

from bench.servers import SMALL_BODY

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


def time_pair(pair: Callable[[], bytes], *, budget_s: float, batches: int = 5) -> float:
    """Median seconds per call of ``pair`` over ``batches`` batches filling ``budget_s``."""
    out = pair()  # also checks that it works before it is timed
    if SMALL_BODY not in out or b"GET /small" not in out:
        raise AssertionError("the pair did not carry the request and the body")
    n = 0
    started = time.perf_counter()
    while time.perf_counter() - started < 0.05:
        pair()
        n += 1
    per_batch = max(1, int(n / (time.perf_counter() - started) * budget_s / batches))
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            pair()
        samples.append((time.perf_counter() - t0) / per_batch)
    return statistics.median(samples)


IMPLEMENTATIONS: dict[str, Callable[[], Callable[[], bytes]]] = {
    "h11": h11_pair,
    "httptools": httptools_pair,
    "seam-h11": lambda: seam_pair("h11"),
    "seam-httptools": lambda: seam_pair("httptools"),
}


def measure(*, budget_s: float = 1.0) -> list[CycleCost]:
    """Time every implementation; one that cannot run is reported with its reason."""
    costs = []
    for name, make in IMPLEMENTATIONS.items():
        try:
            seconds = time_pair(make(), budget_s=budget_s)
        except (ImportError, AttributeError, TypeError, AssertionError, ValueError) as exc:
            # The seam is trioproxy's and moves with it: say why, do not guess a number.
            costs.append(CycleCost(name, None, f"n/a ({type(exc).__name__}: {exc})"))
            continue
        costs.append(CycleCost(name, seconds * 1e6))
    return costs


if __name__ == "__main__":
    for cost in measure():
        if cost.us_per_pair is None:
            print(f"{cost.name:16} {cost.reason}")
        else:
            print(
                f"{cost.name:16} {cost.us_per_pair:7.2f} µs/pair  {cost.ceiling_req_s:9.0f} req/s"
            )
