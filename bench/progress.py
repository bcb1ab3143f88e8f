"""The live progress display, on stderr.

On a terminal one status line is redrawn in place twice a second (step, elapsed time,
repetition, scenario, contender, phase) and each finished measurement is printed above
it; in a log (not a terminal) the same events come as plain lines.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import attrs


@attrs.define
class Progress:
    total: int
    stream: TextIO = sys.stderr
    done: int = 0
    started: float = attrs.field(factory=time.monotonic)
    _status: str = ""
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def live(self) -> bool:
        return self.stream.isatty()

    def __enter__(self) -> Progress:
        if self.live:
            self._thread = threading.Thread(target=self._redraw_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.live:
            self._write("\r\x1b[K")

    def _redraw_loop(self) -> None:
        while not self._stop.wait(0.5):
            self._write(f"\r\x1b[K{self._prefix()} {self._status}")

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()

    def _prefix(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"[{self.done:>3}/{self.total} {elapsed:5.0f}s]"

    def status(self, text: str) -> None:
        """What is running now (replaces the previous status)."""
        self._status = text
        if self.live:
            self._write(f"\r\x1b[K{self._prefix()} {text}")
        else:
            self._write(f"{self._prefix()} {text}\n")

    def finished(self, text: str) -> None:
        """One step is over: print its outcome (the status line is redrawn below it)."""
        self.done += 1
        self.note(f"{self._prefix()} {text}")

    def note(self, text: str) -> None:
        if self.live:
            self._write(f"\r\x1b[K{text}\n{self._prefix()} {self._status}")
        else:
            self._write(f"{text}\n")
