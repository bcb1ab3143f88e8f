"""Log output that never makes the proxy wait for stderr.

A ``logging`` handler that writes to stderr blocks the thread that logs once the
pipe behind stderr is full. For an event loop that is every connection at once:
run with ``stderr=PIPE`` by a parent that does not read it, the proxy stopped
answering after ~400 access-log lines (64 KiB).

:class:`QueuedStderrHandler` formats each record where it is logged and appends
the line to a bounded deque; one writer thread wakes every ``FLUSH_EVERY_S``, takes
what is there and writes it with one ``os.write``. The logging side takes no lock
and wakes no thread (a ``queue.Queue`` that woke the writer per record cost ~70 µs
of CPU per request at ``--log-level info``, +25 %). When stderr is not being read
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

#: Lines held for the writer thread before records are dropped (~1.5 MiB of
#: access-log lines).
QUEUE_LINES = 10_000
#: How often the writer thread looks for lines: the most a line waits to be written.
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
        self._stopping = threading.Event()
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

    def close(self) -> None:
        """Write what is queued, waiting at most ``CLOSE_WAIT_S``: an exit never
        hangs on a stderr that nobody reads."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._writer.join(CLOSE_WAIT_S)
        super().close()

    def _write_lines(self) -> None:
        reported = 0
        lines = self._lines
        while True:
            stop = self._stopping.wait(FLUSH_EVERY_S)
            batch = [lines.popleft() for _ in range(len(lines))]
            lost = self.dropped - reported
            if lost:
                reported += lost
                batch.append(self._dropped_line(lost))
            if batch:
                self._write("\n".join(batch) + "\n")
            if stop and not lines:
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


def install(level: str, fmt: str) -> logging.Handler:
    """Route the root logger to stderr through a :class:`QueuedStderrHandler`.

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
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return handler
