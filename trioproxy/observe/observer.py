"""The observer the engine and the front ends call at fixed points of an exchange.

* request head (``Engine.handle``): :meth:`Observer.start` decides whether the
  exchange is an LLM request to meter, and if so returns the
  :class:`~trioproxy.observe.meter.LlmMeter` that wraps its downstream (so it
  sees the request body, the response head and each response chunk, whichever
  relay carries them);
* end, with its outcome (the front end, where it writes the access log):
  :meth:`Observer.end` counts the exchange in the metrics and returns what the
  LLM meter read, for the log line.

The response head's time and status, the bytes and the retries are on the
exchange's :class:`~trioproxy.engine.ExchangeLog` already; nothing else is
called per request, and nothing per chunk unless the exchange is metered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from trioproxy.config.model import LlmSpec, ServerSettings
from trioproxy.http.protocol import RequestHead
from trioproxy.observe.llm import ModelLabels, openai_endpoint
from trioproxy.observe.meter import LlmMeter
from trioproxy.observe.metrics import LiveCollector, Metrics

if TYPE_CHECKING:
    from trioproxy.engine import ExchangeLog
    from trioproxy.snapshot import Route, Snapshot

_DEFAULT_LLM = LlmSpec()


@attrs.frozen
class LlmResult:
    """What the meter read on one exchange (for the access log)."""

    model: str
    ttft: float | None
    input_tokens: int | None
    output_tokens: int


class _LlmSeries:
    __slots__ = ("input", "output", "requests", "tpot", "tps", "ttft", "usage_missing")

    def __init__(self, metrics: Metrics, route: str, group: str, model: str, stream: str) -> None:
        owner = (route, group)
        child = metrics.owned_child
        self.ttft = child(owner, metrics.llm_ttft, route, group, model)
        self.tpot = child(owner, metrics.llm_tpot, route, group, model)
        self.tps = child(owner, metrics.llm_tps, route, group, model)
        self.input = child(owner, metrics.llm_tokens, route, group, model, "input")
        self.output = child(owner, metrics.llm_tokens, route, group, model, "output")
        self.requests = child(owner, metrics.llm_requests, route, group, model, stream)
        self.usage_missing = child(owner, metrics.llm_usage_missing, route, group)


class Observer:
    """Metrics and the LLM meter of one engine (see the module docstring)."""

    def __init__(self, server: ServerSettings) -> None:
        self.metrics = Metrics(server.metrics_buckets)
        self.models = ModelLabels()
        #: Open WebSocket tunnels by route name (read by the collector).
        self.tunnels: dict[str, int] = {}
        self._llm: dict[tuple[str, str, str, str], _LlmSeries] = {}
        self._now: Callable[[], float] = lambda: 0.0

    def bind(
        self,
        snapshot: Callable[[], Snapshot | None],
        now: Callable[[], float],
        open_connections: Callable[[], dict[str, int]],
    ) -> None:
        """Let scrapes read the live objects, and the meter the engine's clock."""
        self._now = now
        self.metrics.registry.register(LiveCollector(snapshot, now, open_connections, self.tunnels))

    # --- fixed points ---------------------------------------------------------------

    def start(self, request: RequestHead, route: Route, record: ExchangeLog) -> LlmMeter | None:
        """At the request head: the meter for an LLM request, or None."""
        spec = route.settings.llm
        found = openai_endpoint(request.method, request.target)
        if spec is not None:
            if request.method != b"POST":
                return None
            # Another path of an LLM route is named by the route, never by the path
            # (a label value from the request would be unbounded).
            endpoint = found.decode() if found is not None else route.name
        elif found is None:
            return None
        else:
            endpoint, spec = found.decode(), _DEFAULT_LLM
        meter = LlmMeter(
            endpoint,
            inject=spec.include_usage == "inject",
            models=spec.models,
            now=self._now,
        )
        record.llm = meter
        return meter

    def end(self, method: bytes, record: ExchangeLog, duration: float) -> LlmResult | None:
        """At the end, with its outcome on ``record``: count it; what the LLM meter
        read, if the exchange was metered."""
        meter: LlmMeter | None = record.llm
        self.metrics.observe_exchange(
            method, record, duration, meter.endpoint if meter is not None else None
        )
        if meter is None:
            return None
        return self._account(meter, record)

    def _account(self, meter: LlmMeter, record: ExchangeLog) -> LlmResult:
        fields = meter.fields
        model = self.models.label(fields.model, meter.models)
        route = "" if record.route == "-" else record.route
        stream = "true" if fields.stream else "false"
        key = (route, record.group, model, stream)
        series = self._llm.get(key)
        if series is None:
            series = self._llm[key] = _LlmSeries(self.metrics, *key)
        series.requests.inc()
        parser: Any = meter.sse or meter.json
        result = LlmResult(model=model, ttft=None, input_tokens=None, output_tokens=0)
        if parser is None or not 200 <= record.status < 300:
            return result  # no reply to read: an error answer
        usage = parser.usage
        output = usage.output_tokens if usage is not None else parser.content_events
        ttft = None
        sse = meter.sse
        if sse is not None and sse.first_content_at is not None:
            ttft = sse.first_content_at - record.started
            series.ttft.observe(ttft)
            last = sse.last_content_at
            assert last is not None
            decoding = last - sse.first_content_at
            if output > 1 and decoding > 0:
                series.tpot.observe(decoding / (output - 1))
                series.tps.observe((output - 1) / decoding)
        if usage is not None:
            series.input.inc(usage.input_tokens)
        else:
            series.usage_missing.inc()
        series.output.inc(output)
        return LlmResult(
            model=model,
            ttft=ttft,
            input_tokens=usage.input_tokens if usage is not None else None,
            output_tokens=output,
        )

    def reloaded(self, snapshot: Snapshot | None, ok: bool) -> None:
        """After a reload: count it; a good one drops the series of what it removed."""
        self.metrics.reloaded(ok)
        if ok and snapshot is not None:
            pairs = [
                (route.name, route.group.name if route.group is not None else "")
                for route in snapshot.routes
            ]
            self.metrics.retain(pairs)
            self._llm.clear()  # taken again from the families (see Metrics.retain)
