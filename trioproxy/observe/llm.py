"""Reading OpenAI-style LLM traffic as it passes: sans-I/O, no clock, no sockets.

What an LLM gateway's operator wants to see (time to first token, decoding
speed, tokens in and out per model) is in the bytes the proxy relays anyway:

* the request JSON names the ``model`` and whether the reply is a ``stream``;
* a streamed reply is server-sent events (the WHATWG HTML "Server-sent events"
  format): ``data: {json}`` lines, an event ending at a blank line, and a last
  ``data: [DONE]``. A chunk whose ``choices`` carry text (``delta.content``,
  ``delta.reasoning_content``, ``delta.tool_calls``, or a completion's ``text``)
  is a *content event*; with ``stream_options.include_usage`` the upstream sends
  one more chunk, ``"choices": []`` with the ``usage`` totals;
* a plain reply is one JSON object with ``usage``.

:class:`SseMeter` is fed each body chunk as it goes to the client and returns
the bytes to send: the same object, unchanged, unless it was told to hide the
usage chunk (``include_usage = "inject"``: the proxy asked for it, the client
did not). Hiding is the one case where bytes wait: an *incomplete* event is held
until its blank line arrives (a complete one is never held), so that the usage
event can be cut out whole. Upstreams flush one whole event per write, so in
practice nothing waits.

Memory is bounded: a partial line or event (``MAX_PENDING``), the request body
read for its fields and a plain reply read for its usage (``MAX_JSON``); past
those the meter stops reading and says so in its result (``usage`` missing).
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

#: The OpenAI endpoints metered without configuration, as path suffixes.
OPENAI_ENDPOINTS = (b"/v1/chat/completions", b"/v1/completions")
#: The most of a request body or a plain JSON reply kept to be parsed.
MAX_JSON = 1 << 20
#: The most of an incomplete SSE line or event kept.
MAX_PENDING = 1 << 20
#: Distinct model label values kept when ``llm.models`` is not configured.
MAX_MODELS = 32
OTHER = "other"
UNKNOWN = "unknown"

_EVENT_END = re.compile(rb"\r?\n\r?\n")
#: A chunk carries text: a non-empty string under one of these keys, or tool calls.
#: Matched on the bytes (an escaped key inside a string value has a backslash
#: before its closing quote, so it does not match), which costs a tenth of parsing
#: the JSON; only a chunk with a ``usage`` object is parsed.
_CONTENT = re.compile(
    rb'"(?:content|text|reasoning_content|reasoning)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{'
)
_USAGE = re.compile(rb'"usage"\s*:\s*\{')


def _has_text(payload: bytes) -> bool:
    """Whether an event's JSON (or its ``data:`` line) carries text: see :data:`_CONTENT`.

    The compact ``"content":"`` that servers write is found with one substring search
    (``find`` and an index: bytes' ``in`` costs more in CPython 3.11, where it first
    tries the needle as an integer and formats the error); an empty content, or
    any other form, is left to the regex.
    """
    value = payload.find(b'"content":"') + 11  # 10: not found
    if 10 < value < len(payload) and payload[value] != 0x22:  # 0x22: '"', an empty string
        return True
    return _CONTENT.search(payload) is not None


def openai_endpoint(method: bytes, target: bytes) -> bytes | None:
    """The OpenAI endpoint a request calls, recognised without configuration (a POST
    whose path ends with one of :data:`OPENAI_ENDPOINTS`, any prefix before it), or
    None."""
    if method != b"POST":
        return None
    path = target.partition(b"?")[0].rstrip(b"/")
    for endpoint in OPENAI_ENDPOINTS:
        if path.endswith(endpoint):
            return endpoint
    return None


@attrs.define
class ModelLabels:
    """The ``model`` label's values, bounded: the configured names, else the first
    :data:`MAX_MODELS` names seen; anything else is ``other``."""

    limit: int = MAX_MODELS
    seen: set[str] = attrs.Factory(set)

    def label(self, model: str | None, allowed: tuple[str, ...] = ()) -> str:
        if model is None:
            return UNKNOWN
        if allowed:
            return model if model in allowed else OTHER
        if model in self.seen:
            return model
        if len(self.seen) < self.limit:
            self.seen.add(model)
            return model
        return OTHER


@attrs.define
class RequestFields:
    """What the meter takes from the request JSON."""

    model: str | None = None
    stream: bool = False
    #: The request asked for the usage chunk itself (``stream_options.include_usage``).
    include_usage: bool = False


def request_fields(body: bytes) -> RequestFields:
    """``model``, ``stream`` and ``stream_options.include_usage`` of a request body
    (defaults for anything that is not a JSON object)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return RequestFields()
    if not isinstance(document, dict):
        return RequestFields()
    model = document.get("model")
    options = document.get("stream_options")
    return RequestFields(
        model=model if isinstance(model, str) else None,
        stream=document.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def inject_include_usage(body: bytes) -> bytes | None:
    """The request body with ``stream_options.include_usage = true`` added, for a
    streamed request that lacks it; None when there is nothing to add (not JSON, not
    streamed, or already asked for)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or document.get("stream") is not True:
        return None
    options = document.get("stream_options")
    if options is None:
        options = document["stream_options"] = {}
    if not isinstance(options, dict) or "include_usage" in options:
        return None
    options["include_usage"] = True
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


@attrs.define
class Usage:
    input_tokens: int
    output_tokens: int


def _usage(document: dict[str, Any]) -> Usage | None:
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def _has_content(document: dict[str, Any]) -> bool:
    choices = document.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content")
            or delta.get("reasoning_content")
            or delta.get("reasoning")
            or delta.get("tool_calls")
        ):
            return True
    return False


class SseMeter:
    """Counts an OpenAI event stream's content events and reads its usage.

    ``feed(data, now)`` for each body chunk, in order; it returns the bytes to send
    on (``data`` itself unless ``hide_usage``). ``end()`` once the body ended: what
    is still held is returned.
    """

    __slots__ = (
        "_pending",
        "content_events",
        "done",
        "first_content_at",
        "hide_usage",
        "last_content_at",
        "overflow",
        "usage",
    )

    def __init__(self, *, hide_usage: bool = False) -> None:
        self.hide_usage = hide_usage
        self.content_events = 0
        self.first_content_at: float | None = None
        self.last_content_at: float | None = None
        self.usage: Usage | None = None
        #: ``data: [DONE]`` was seen.
        self.done = False
        #: A line or event grew past MAX_PENDING: what followed was not read.
        self.overflow = False
        self._pending = b""

    def feed(self, data: bytes, now: float) -> bytes:
        if self.hide_usage:
            return self._feed_events(data, now)
        self._feed_lines(data, now)
        return data

    def relay(self, chunks: list[bytes], end: bool, now: float) -> list[bytes]:
        """Read the body ``chunks`` of one write (``end``: the body ends with them),
        at time ``now``; returns the chunks to send (``chunks`` itself unless the usage
        chunk is hidden).

        This runs once per event on every metered stream, and at 1000 streams whose
        events come in one burst, each event waits for the meter's work on the ones
        before it: so the usual chunk, one whole ``data: {...}`` event, is read here
        with three searches of its bytes, no list, no copy and no call
        (``_feed_lines`` does the same work for any other shape, a line at a time).
        """
        if self.hide_usage:
            out = [sent for chunk in chunks if (sent := self._feed_events(chunk, now))]
            if end and (held := self.end()):
                out.append(held)
            return out
        for data in chunks:
            if (
                data[:7] != b"data: {"
                # one line, then the blank line that ends the event
                or data.find(b"\n") != len(data) - 2
                or data[-1] != 0x0A
                or self._pending
                or self.overflow
            ):
                self._feed_lines(data, now)
                continue
            at = data.find(b'"usage"')
            if at >= 0 and _USAGE.match(data, at) is not None:
                self._data(data[6:-2].rstrip(), now)  # a usage object: parsed
                continue
            # _has_text, inlined: the index is in the line (it ends before "\n\n").
            value = data.find(b'"content":"') + 11  # 10: not found
            if (value != 10 and data[value] != 0x22) or _CONTENT.search(data) is not None:
                self.content_events += 1
                if self.first_content_at is None:
                    self.first_content_at = now
                self.last_content_at = now
        return chunks

    def end(self) -> bytes:
        """The bytes still held (an incomplete last event, when hiding)."""
        held, self._pending = self._pending, b""
        return held if self.hide_usage else b""

    # --- pass: read lines, send everything at once --------------------------------

    def _feed_lines(self, data: bytes, now: float) -> None:
        if self.overflow:
            return
        buffer = self._pending + data if self._pending else data
        lines = buffer.split(b"\n")
        self._pending = tail = lines.pop()
        if len(tail) > MAX_PENDING:
            self._pending = b""
            self.overflow = True
        for line in lines:
            if line.startswith(b"data:"):
                self._data(line[5:].strip(), now)

    def _data(self, payload: bytes, now: float) -> bool:
        """Account one ``data:`` payload; True if it is the usage chunk alone."""
        if not payload.startswith(b"{"):
            if payload == b"[DONE]":
                self.done = True
            return False
        at = payload.find(b'"usage"')
        if at < 0 or _USAGE.match(payload, at) is None:
            # The common case, a token: no JSON parsing.
            if _has_text(payload):
                self._content(now)
            return False
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(document, dict):
            return False
        if _has_content(document):
            self._content(now)
        usage = _usage(document)
        if usage is None:
            return False
        self.usage = usage
        return document.get("choices") == []

    def _content(self, now: float) -> None:
        self.content_events += 1
        if self.first_content_at is None:
            self.first_content_at = now
        self.last_content_at = now

    # --- hide the usage chunk: pass whole events, cut that one out ----------------

    def _feed_events(self, data: bytes, now: float) -> bytes:
        buffer = self._pending + data if self._pending else data
        kept: list[bytes] = []
        start = 0
        dropped = False
        for match in _EVENT_END.finditer(buffer):
            event = buffer[start : match.end()]
            start = match.end()
            if self._usage_only(event, now):
                dropped = True
            else:
                kept.append(event)
        self._pending = buffer[start:]
        if len(self._pending) > MAX_PENDING:
            # Not an event stream we can read: send it on and stop hiding.
            kept.append(self._pending)
            self._pending = b""
            self.hide_usage = False
            self.overflow = True
        if not dropped and start == len(buffer) and buffer is data:
            return data  # whole events, none hidden: the chunk as it came
        return b"".join(kept)

    def _usage_only(self, event: bytes, now: float) -> bool:
        hidden = False
        for line in event.splitlines():
            if line.startswith(b"data:") and self._data(line[5:].strip(), now):
                hidden = True
        return hidden


class JsonMeter:
    """Reads a plain (not streamed) reply's ``usage``: the body is copied as it passes,
    up to :data:`MAX_JSON`, and parsed at its end."""

    __slots__ = ("_chunks", "_size", "content_events", "overflow", "usage")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflow = False
        self.usage: Usage | None = None
        self.content_events = 0

    def feed(self, data: bytes) -> None:
        if self.overflow:
            return
        self._size += len(data)
        if self._size > MAX_JSON:
            self.overflow = True
            self._chunks.clear()
        else:
            self._chunks.append(data)

    def end(self) -> None:
        if self.overflow or not self._chunks:
            return
        try:
            document = json.loads(b"".join(self._chunks))
        except (ValueError, UnicodeDecodeError):
            return
        finally:
            self._chunks.clear()
        if isinstance(document, dict):
            self.usage = _usage(document)
            self.content_events = 1 if _has_content(document) else 0
            if not self.content_events:
                choices = document.get("choices")
                if isinstance(choices, list) and any(
                    isinstance(c, dict)
                    and isinstance(c.get("message"), dict)
                    and c["message"].get("content")
                    for c in choices
                ):
                    self.content_events = 1
