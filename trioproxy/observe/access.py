"""The access log: one line per exchange, made here for every front end.

Two formats (``[server] log_format``): ``text`` (below) and ``json``, one object
per line with ``time``, ``client``, ``method``, ``target``, ``status``,
``bytes_sent``, ``duration_ms``, ``ttfb_ms``, ``route``, ``upstream`` (the group),
``server`` (the URL that answered), ``request_id`` and ``retries``; a metered LLM
request adds ``model``, ``ttft_ms``, ``input_tokens`` and ``output_tokens``, and an
exchange that did not end with a whole response says how in ``error``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from trioproxy.engine import ExchangeLog
from trioproxy.http.protocol import RequestHead

if TYPE_CHECKING:
    from trioproxy.observe.observer import LlmResult

access_log = logging.getLogger("trioproxy.access")

#: ``text`` or ``json`` (see :func:`set_format`).
_format = "text"
#: This process's worker number, when it is one of several (see :func:`set_worker`).
_worker: int | None = None


def set_format(log_format: str) -> None:
    """Write the lines as ``text`` or ``json`` from now on."""
    global _format
    _format = log_format


def set_worker(worker: int | None) -> None:
    """Tag JSON lines with ``"worker": N`` (a text line carries it in the log
    line's prefix, ``trioproxy.access[worker N]``)."""
    global _worker
    _worker = worker


def log_exchange(
    client: str,
    head: RequestHead,
    record: ExchangeLog,
    duration: float,
    note: str = "",
    llm: LlmResult | None = None,
) -> None:
    """Log one exchange at INFO (``duration`` in seconds; ``note`` says how it ended
    when not with a whole response)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    if _format == "json":
        access_log.info("%s", json_line(client, head, record, duration, note, llm))
        return
    access_log.info(
        '%s "%s %s HTTP/%s" %d %d %.1fms route=%s upstream=%s request_id=%s%s',
        client,
        head.method.decode("latin-1"),
        head.target.decode("latin-1"),
        head.http_version.decode("latin-1"),
        record.status,
        record.bytes_out,
        duration * 1000,
        record.route,
        record.upstream,
        record.request_id.decode("latin-1"),
        f" ({note})" if note else "",
    )


def json_line(
    client: str,
    head: RequestHead,
    record: ExchangeLog,
    duration: float,
    note: str = "",
    llm: LlmResult | None = None,
) -> str:
    """One exchange as a JSON object on one line (see the module docstring)."""
    now = time.time()
    line: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now % 1 * 1000):03d}Z",
        "client": client,
        "method": head.method.decode("latin-1"),
        "target": head.target.decode("latin-1"),
        "status": record.status,
        "bytes_sent": record.bytes_out,
        "duration_ms": round(duration * 1000, 3),
        "ttfb_ms": round((record.head_at - record.started) * 1000, 3) if record.head_at else None,
        "route": None if record.route == "-" else record.route,
        "upstream": record.group or None,
        "server": None if record.upstream == "-" else record.upstream,
        "request_id": record.request_id.decode("latin-1"),
        "retries": record.retries,
    }
    if llm is not None:
        line["model"] = llm.model
        line["ttft_ms"] = round(llm.ttft * 1000, 3) if llm.ttft is not None else None
        line["input_tokens"] = llm.input_tokens
        line["output_tokens"] = llm.output_tokens
    if note:
        line["error"] = note
    if _worker is not None:
        line["worker"] = _worker
    return json.dumps(line, ensure_ascii=False)
