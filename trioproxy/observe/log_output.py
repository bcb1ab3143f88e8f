"""Log output that never makes the proxy wait for stderr.

A ``logging`` handler that writes to stderr blocks the thread that logs once the
pipe behind stderr is full. For an event loop that is every connection at once:
run with ``stderr=PIPE`` by a parent that does not read it, the proxy stopped
answering after ~400 access-log lines (64 KiB).

:class:`QueuedStderrHandler` formats each record where it is logged and appends
the line to a bounded deque. The first line after the writer thread last took
the deque wakes it; it gathers lines for ``FLUSH_EVERY_S`` and writes them with one
``os.write``. So the logging side wakes the writer at most ~20 times a second under
load, and an idle proxy's writer sleeps (a ``queue.Queue`` that woke the writer per
record cost ~70 µs of CPU per request at ``--log-level info``, +25 %). When stderr
is not being read
the writer waits in the kernel, the deque fills, and further records are counted
and dropped, never waited for; once stderr takes bytes again the writer says how
many were lost.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import sys
import threading
import time

#: Lines held for the writer thread before records are dropped (~1.5 MiB of
#: access-log lines).
QUEUE_LINES = 10_000
#: How long the writer thread gathers lines once woken: about the most a line waits
#: to be written.
FLUSH_EVERY_S = 0.05
#: How long closing waits for the writer thread to write what is queued.
CLOSE_WAIT_S = 1.0


class QueuedStderrHandler(logging.Handler):
    """Format in the logging thread, write from a thread of its own, drop rather
    than wait when ``capacity`` lines are waiting."""

    def __init__(self, fd: int, *, capacity: int = QUEUE_LINES) -> None:
        super().__init__()
        self._fd = fd
        self._capacity = capacity
        # deque.append and popleft are atomic: neither side takes a lock.
        self._lines: collections.deque[str] = collections.deque()
        #: Records dropped because ``capacity`` lines were waiting; only the logging
        #: side writes it.
        self.dropped = 0
        # Set by the first line the writer has not been woken for; cleared when it
        # takes the deque. ``_woken`` spares the logging side all but that one set().
        self._wake = threading.Event()
        self._woken = False
        self._stopping = False
        self._writer = threading.Thread(
            target=self._write_lines, name="trioproxy-log-writer", daemon=True
        )
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) < self._capacity:
            self._lines.append(line)
        else:
            self.dropped += 1
        if not self._woken:
            self._woken = True
            self._wake.set()

    def close(self) -> None:
        """Write what is queued, waiting at most ``CLOSE_WAIT_S``: an exit never
        hangs on a stderr that nobody reads."""
        if not self._stopping:
            self._stopping = True
            self._wake.set()
            self._writer.join(CLOSE_WAIT_S)
        super().close()

    def _write_lines(self) -> None:
        reported = 0
        lines = self._lines
        while True:
            self._wake.wait()
            if not self._stopping:
                time.sleep(FLUSH_EVERY_S)  # let a batch gather
            # Cleared before the deque is taken: a line added after this wakes us again.
            self._wake.clear()
            self._woken = False
            batch = [lines.popleft() for _ in range(len(lines))]
            lost = self.dropped - reported
            if lost:
                reported += lost
                batch.append(self._dropped_line(lost))
            if batch:
                self._write("\n".join(batch) + "\n")
            # Read now, not before the sleep: close() may have set it (and the wake
            # we just cleared) meanwhile.
            if self._stopping and not lines:
                return

    def _dropped_line(self, lost: int) -> str:
        record = logging.LogRecord(
            "trioproxy.log",
            logging.WARNING,
            __file__,
            0,
            "%d log records dropped: stderr was not taking them fast enough",
            (lost,),
            None,
        )
        return self.format(record)

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        while data:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                # Somebody made the descriptor non-blocking: wait until it takes bytes.
                select.select([], [self._fd], [])
                continue
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone (EPIPE, EBADF, EIO...): the lines have nowhere to go
            data = data[written:]


def install(level: str, fmt: str, *, logger: str = "") -> logging.Handler:
    """Route the root logger (or only ``logger``, which then stops propagating) to
    stderr through a :class:`QueuedStderrHandler`.

    Falls back to a plain stream handler when stderr has no descriptor (e.g. under a
    test runner that replaced it).
    """
    handler: logging.Handler
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = QueuedStderrHandler(fd)
    handler.setFormatter(logging.Formatter(fmt))
    if not logger:
        logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
        return handler
    ours = logging.getLogger(logger)
    ours.addHandler(handler)
    ours.setLevel(level.upper())
    ours.propagate = False
    return handler


def install_access(path: str | None, log_format: str, fmt: str) -> logging.Handler | None:
    """Give the access log (``trioproxy.access``) a handler of its own when it goes to
    a file (``--access-log PATH``, appended to) or is JSON (one object per line, with
    no prefix); None when it simply follows the root logger.

    The file is written as stderr is, by a :class:`QueuedStderrHandler`: a slow disk
    costs dropped lines (counted in the file), never a waiting proxy.

    Raises:
        OSError: the file cannot be opened for appending.
    """
    if path is None and log_format != "json":
        return None
    if path is None:
        fd = sys.stderr.fileno()
    else:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    handler = QueuedStderrHandler(fd)
    handler.setFormatter(logging.Formatter("%(message)s" if log_format == "json" else fmt))
    logger = logging.getLogger("trioproxy.access")
    logger.addHandler(handler)
    logger.propagate = False
    return handler
