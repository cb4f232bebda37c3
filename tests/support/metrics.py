"""Reading a gate's ``/metrics`` the way Prometheus would: prometheus-client's own parser.

Owns scraping and looking up samples, so tests say ``scrape(gate).value(
"registry_gate_requests_total", route="manifest")`` and compare two scrapes instead of
matching exposition text. Values of matching samples are summed (a lookup that names
only some labels adds up the rest); a family that was never touched counts as 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support.wire import request

__all__ = ["Scrape", "scrape", "wait_for_value"]


@dataclass(frozen=True)
class Scrape:
    """One parsed exposition: every sample of every family."""

    samples: tuple[Sample, ...]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value ``label`` takes on samples called ``name``."""
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}

    def gate_samples(self) -> Iterator[Sample]:
        """The gate's own samples (``registry_gate_*``), not the process collectors'."""
        return (s for s in self.samples if s.name.startswith("registry_gate_"))


def scrape(base_url: str) -> Scrape:
    """GET ``/metrics`` and parse it (text format 0.0.4, the default answer)."""
    reply = request(base_url, "GET", "/metrics")
    assert reply.status == 200, reply
    text = reply.body.decode()
    samples = tuple(s for family in text_string_to_metric_families(text) for s in family.samples)
    return Scrape(samples, text)


def wait_for_value(
    base_url: str,
    name: str,
    accept: Callable[[float], bool],
    timeout: float = 10.0,
    **labels: str,
) -> Scrape:
    """Scrape until ``accept(value)`` holds (e.g. a reload counter moved); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        current = scrape(base_url)
        if accept(current.value(name, **labels)):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name}{labels} stayed at {current.value(name, **labels)} for {timeout} s"
            )
        time.sleep(0.1)
