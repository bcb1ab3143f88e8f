"""Reading ``/metrics`` as Prometheus does: with ``prometheus_client.parser``."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import httpx
from prometheus_client.parser import text_string_to_metric_families


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
