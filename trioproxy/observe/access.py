"""The access log: one line per exchange, made here for every front end."""

from __future__ import annotations

import logging

from trioproxy.engine import ExchangeLog
from trioproxy.http.protocol import RequestHead

access_log = logging.getLogger("trioproxy.access")


def log_exchange(
    client: str, head: RequestHead, record: ExchangeLog, duration: float, note: str = ""
) -> None:
    """Log one exchange at INFO (``duration`` in seconds; ``note`` says how it ended
    when not with a whole response)."""
    if not access_log.isEnabledFor(logging.INFO):
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
