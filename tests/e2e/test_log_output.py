"""A stderr that nobody reads must not stop the proxy.

Run under a parent that pipes stderr and never reads it, a proxy whose log writes
block stops answering once the pipe is full (~400 access-log lines). The log goes
out through a queue and a writer thread instead: requests keep being answered, the
process still exits on SIGTERM, and the lines that could not be queued are counted.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import trio
from fixtures import REPO_ROOT

from trioproxy.observe.log_output import QueuedStderrHandler

pytestmark = pytest.mark.timeout(40)

#: Well past the 64 KiB a Linux pipe holds, at ~150 bytes per access-log line.
REQUESTS = 1500


async def _listening_port(stdout: trio.abc.ReceiveStream) -> int:
    seen = b""
    with trio.fail_after(15):
        while b"\n" not in seen:
            chunk = await stdout.receive_some()
            assert chunk, "the proxy exited before printing 'listening on'"
            seen += chunk
    match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", seen)
    assert match, seen
    return int(match.group(1))


async def test_proxy_keeps_answering_and_exits_with_stderr_never_read() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioproxy", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        port = await _listening_port(process.stdout)
        statuses: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(REQUESTS):
                with trio.fail_after(5):  # blocking log writes wedged at ~385 requests
                    response = await client.get("/api")
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert statuses == {200: REQUESTS}

        # Still unread: SIGTERM drains and exits, without waiting for stderr.
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
        assert process.returncode == 0

        # What reached the pipe (as much as it holds) is the first requests' lines; the
        # process may have exited mid-write, so only lines with their newline count.
        captured = b""
        with trio.fail_after(5):
            while chunk := await process.stderr.receive_some():
                captured += chunk
        complete = captured.decode().split("\n")[:-1]
        access = [line for line in complete if "trioproxy.access" in line]
        assert len(access) > 100, complete[:5]
        assert all('"GET /api HTTP/1.1" 200' in line for line in access)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _read_available(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _reported_drops(text: str) -> int:
    return sum(int(line.split()[0]) for line in text.splitlines() if "dropped" in line)


def test_records_are_dropped_and_counted_while_the_pipe_is_full() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    handler = QueuedStderrHandler(write_end, capacity=50)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("trioproxy.test.log_output")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        # 2000 lines of 101 bytes: far more than the pipe (64 KiB) and the queue (50
        # lines) hold, and nobody reads yet. No call may wait for a reader: the test's
        # timeout would catch it.
        for index in range(2000):
            logger.warning("line %05d %s", index, "x" * 90)
        assert handler.dropped > 0

        # Now read: the writer catches up and reports every dropped record.
        received = b""
        deadline = time.monotonic() + 10
        while _reported_drops(received.decode()) < handler.dropped:
            assert time.monotonic() < deadline, received[-300:]
            received += _read_available(read_end)
            time.sleep(0.01)
        handler.close()  # writes what is still queued (the pipe has room now)
        received += _read_available(read_end)

        text = received.decode()
        numbered = [line for line in text.splitlines() if line.startswith("line ")]
        indexes = [int(line.split()[1]) for line in numbered]
        assert indexes[0] == 0 and indexes == sorted(indexes)
        assert all(len(line) == len("line 00000 ") + 90 for line in numbered)
        assert _reported_drops(text) == handler.dropped
        assert len(numbered) + handler.dropped == 2000
        assert all(
            line.endswith("log records dropped: stderr was not taking them fast enough")
            for line in text.splitlines()
            if not line.startswith("line ")
        )
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(read_end)
        os.close(write_end)


def test_close_writes_the_last_lines_and_returns_at_once() -> None:
    """Closing while the writer gathers a batch (the exit right after a log line):
    the line is written and close() does not sit out its 1 s wait."""
    read_end, write_end = os.pipe()
    handler = QueuedStderrHandler(write_end)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.makeLogRecord({"msg": "stopped", "levelno": logging.INFO})
    try:
        for _ in range(5):
            handler.handle(record)
            time.sleep(0.01)  # the writer is now in its gather sleep
            started = time.monotonic()
            handler.close()
            took = time.monotonic() - started
            assert took < 0.5, f"close() took {took:.2f} s"
            handler = QueuedStderrHandler(write_end)
            handler.setFormatter(logging.Formatter("%(message)s"))
        os.set_blocking(read_end, False)
        assert _read_available(read_end) == b"stopped\n" * 5
    finally:
        handler.close()
        os.close(read_end)
        os.close(write_end)
