"""Reading ``/metrics`` as Prometheus does (with ``prometheus_client.parser``), and
the admin listener's ``/status`` and ``/metrics`` of a proxy under test."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import httpx
import trio
from fixtures import ProxyProcess, raw_request
from prometheus_client.parser import text_string_to_metric_families

_ADMIN = re.compile(r"admin listening on http://([\d.]+):(\d+)")


@attrs.frozen
class Scrape:
    """One parsed scrape: family names, and every sample by (name, labels)."""

    families: frozenset[str]
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name{labels}`` (exactly those labels); KeyError if absent."""
        return self.samples[(name, frozenset(labels.items()))]

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), default)

    def matching(self, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return {key[1]: v for key, v in self.samples.items() if key[0] == name and want <= key[1]}

    def series_count(self) -> int:
        return len(self.samples)


def parse(text: str) -> Scrape:
    families: set[str] = set()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(frozenset(families), samples)


async def scrape(client: httpx.AsyncClient, url: str) -> Scrape:
    response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def scrape_when(
    client: httpx.AsyncClient, url: str, counted: Callable[[Scrape], bool], within: float = 5
) -> Scrape:
    """The first scrape for which ``counted(scrape)`` holds. An exchange is counted at
    its end, just after its last bytes went to the client: a scrape sent as soon as
    the client has them may be answered first (more so under ASGI, where the count
    follows the server's ``send``). The failure shows the last scrape."""
    last: Scrape | None = None
    with trio.move_on_after(within):
        # Polling another process: no trio.Event to wait on.
        while not counted(last := await scrape(client, url)):  # noqa: ASYNC110
            await trio.sleep(0.02)
        return last
    raise AssertionError(f"not counted within {within} s; last scrape: {last}")


async def _admin_get(proxy: ProxyProcess, path: str) -> bytes:
    """The body of ``GET path`` on the proxy's admin listener (from its log line)."""
    with trio.fail_after(5):
        log = await proxy.wait_for_stderr("admin listening on")
    match = _ADMIN.search(log)
    assert match, log
    request = f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    raw = await raw_request(match[1], int(match[2]), request, read_timeout=2)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


async def admin_status(proxy: ProxyProcess) -> dict[str, Any]:
    return json.loads(await _admin_get(proxy, "/status"))  # type: ignore[no-any-return]


async def admin_scrape(proxy: ProxyProcess) -> Scrape:
    return parse((await _admin_get(proxy, "/metrics")).decode())
