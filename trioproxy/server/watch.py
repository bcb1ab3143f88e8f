"""``--watch``: reload when a file the configuration comes from changes.

Polled once a second (``os.stat``: no inotify dependency, and it works on every
filesystem, network ones included); a burst of writes is taken as one change
once the files stay still for half a second, since an editor or a certificate
renewal writes in several steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

log = logging.getLogger("trioproxy.server")

Stamps = dict[str, tuple[int, int] | None]

POLL_INTERVAL = 1.0
SETTLE_INTERVAL = 0.5


def stamps(paths: Sequence[str]) -> Stamps:
    """(mtime in ns, size) of each file; None for one that cannot be read now."""
    found: Stamps = {}
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            found[path] = None
        else:
            found[path] = (status.st_mtime_ns, status.st_size)
    return found


async def watch_files(
    paths: Callable[[], Sequence[str]], reload: Callable[[], Awaitable[object]], message: str
) -> None:
    """Call ``reload`` (after logging ``message``) each time one of ``paths()``
    changes; ``paths`` is asked again after each reload, which may name others."""
    seen = stamps(paths())
    while True:
        await trio.sleep(POLL_INTERVAL)
        now = stamps(paths())
        if now == seen:
            continue
        while True:  # debounce
            await trio.sleep(SETTLE_INTERVAL)
            settled = stamps(paths())
            if settled == now:
                break
            now = settled
        log.info("%s", message)
        await reload()
        seen = stamps(paths())
