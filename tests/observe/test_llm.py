"""The LLM meter's parser, without sockets (``trioproxy.observe.llm``)."""

from __future__ import annotations

import json
from typing import Any

from trioproxy.observe.llm import (
    MAX_MODELS,
    JsonMeter,
    ModelLabels,
    SseMeter,
    inject_include_usage,
    openai_endpoint,
    request_fields,
)


def event(document: dict[str, Any], newline: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(document).encode() + newline + newline


def token(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}], "usage": None})


USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"
STREAM = token("a") + token("b") + token("c") + USAGE + DONE


def test_pass_counts_content_and_usage_and_returns_the_same_bytes() -> None:
    meter = SseMeter()
    for i, byte in enumerate(STREAM):  # one byte at a time: events split anywhere
        data = bytes([byte])
        assert meter.feed(data, now=float(i)) is data
    assert meter.content_events == 3
    assert meter.usage is not None
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (7, 3)
    assert meter.done
    assert meter.first_content_at is not None and meter.last_content_at is not None
    assert meter.first_content_at < meter.last_content_at


def test_role_only_and_empty_chunks_are_not_content() -> None:
    meter = SseMeter()
    meter.feed(event({"choices": [{"delta": {"role": "assistant"}}]}), 0.0)
    meter.feed(event({"choices": [{"delta": {"content": ""}}]}), 0.0)
    meter.feed(b": keep-alive comment\n\n", 0.0)
    assert meter.content_events == 0 and meter.first_content_at is None
    meter.feed(event({"choices": [{"delta": {"tool_calls": [{"id": "x"}]}}]}), 1.0)
    meter.feed(event({"choices": [{"text": "completion text"}]}), 2.0)
    assert meter.content_events == 2 and meter.first_content_at == 1.0


def test_hiding_cuts_out_the_usage_chunk_only() -> None:
    meter = SseMeter(hide_usage=True)
    out = b"".join(meter.feed(bytes([b]), 0.0) for b in STREAM) + meter.end()
    assert out == token("a") + token("b") + token("c") + DONE
    assert meter.usage is not None and meter.usage.output_tokens == 3
    assert meter.content_events == 3


def test_hiding_passes_whole_events_at_once_and_holds_only_a_partial_one() -> None:
    meter = SseMeter(hide_usage=True)
    first = token("a")
    assert meter.feed(first, 0.0) == first
    half = token("b")[:10]
    assert meter.feed(half, 0.0) == b""
    assert meter.feed(token("b")[10:] + USAGE[:5], 0.0) == token("b")
    assert meter.feed(USAGE[5:] + DONE, 0.0) == DONE


def test_crlf_line_endings() -> None:
    meter = SseMeter(hide_usage=True)
    usage = event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, b"\r\n")
    stream = event({"choices": [{"delta": {"content": "x"}}]}, b"\r\n") + usage
    assert meter.feed(stream, 0.0) == stream[: len(stream) - len(usage)]
    assert meter.content_events == 1 and meter.usage is not None


def test_a_plain_reply_is_read_at_its_end() -> None:
    body = json.dumps(
        {
            "choices": [{"message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        }
    ).encode()
    meter = JsonMeter()
    meter.feed(body[:7])
    meter.feed(body[7:])
    meter.end()
    assert meter.usage is not None and meter.usage.output_tokens == 2
    assert meter.content_events == 1


def test_request_fields_and_injection() -> None:
    streamed = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    assert request_fields(streamed).model == "m"
    assert request_fields(streamed).stream
    injected = inject_include_usage(streamed)
    assert injected is not None
    assert json.loads(injected)["stream_options"] == {"include_usage": True}
    assert request_fields(injected).include_usage
    # Nothing to add: not streamed, asked already (either way), not JSON.
    assert inject_include_usage(b'{"model": "m"}') is None
    asked = b'{"stream": true, "stream_options": {"include_usage": false}}'
    assert inject_include_usage(asked) is None
    assert inject_include_usage(b"not json") is None
    assert request_fields(b"\xff not json") == request_fields(b"")


def test_openai_endpoints_are_recognised_by_path_suffix_on_post() -> None:
    assert openai_endpoint(b"POST", b"/v1/chat/completions") == b"/v1/chat/completions"
    assert openai_endpoint(b"POST", b"/inference/v1/completions?x=1") == b"/v1/completions"
    assert openai_endpoint(b"GET", b"/v1/chat/completions") is None
    assert openai_endpoint(b"POST", b"/v1/embeddings") is None


def test_model_labels_are_bounded() -> None:
    labels = ModelLabels()
    names = [f"model-{i}" for i in range(MAX_MODELS + 10)]
    assert [labels.label(n) for n in names[:MAX_MODELS]] == names[:MAX_MODELS]
    assert {labels.label(n) for n in names[MAX_MODELS:]} == {"other"}
    assert labels.label("model-3") == "model-3"
    assert labels.label(None) == "unknown"
    assert labels.label("gpt-x", ("gpt-x", "gpt-y")) == "gpt-x"
    assert labels.label("model-3", ("gpt-x", "gpt-y")) == "other"


def test_keys_inside_string_values_are_not_content() -> None:
    meter = SseMeter()
    quoted = json.dumps({"note": '"content":"not a token", "text": "nor this"'})
    chunk = b'data: {"choices":[{"delta":{"content":null}}],"extra":' + quoted.encode() + b"}\n\n"
    meter.feed(chunk, 0.0)
    meter.feed(event({"choices": [{"logprobs": {"content": [{"token": "x"}]}}]}), 0.0)
    assert meter.content_events == 0
    meter.feed(event({"choices": [{"delta": {"content": " spaced"}}]}), 0.0)
    assert meter.content_events == 1


def compact(document: dict[str, Any]) -> bytes:
    """An event as servers write it: one compact ``data:`` line, then the blank line."""
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}], **extra}


#: Chunks of every shape the meter tells apart, compact and spaced: whole events one
#: per write take ``relay``'s quick path, anything else the line reader.
SHAPES: list[bytes] = [
    compact(chunk({"role": "assistant", "content": ""})),
    compact(chunk({"content": "Hel"})),
    event(chunk({"content": "lo"})),
    compact(chunk({"content": "!"}, usage=None)),
    compact(chunk({"content": ""}, usage=None)),
    compact(chunk({"content": "", "reasoning_content": "thinking"})),
    compact(chunk({"content": None, "reasoning_content": "more"})),
    compact(chunk({"tool_calls": [{"index": 0, "id": "call_1"}]})),
    compact(chunk({"content": 'say "content":"x"'})),
    compact({"choices": [{"index": 0, "text": "completion"}]}),
    compact(chunk({}, finish_reason="stop")),
    b": keep-alive\n\n",
    b"data:" + compact(chunk({"content": "no space"}))[6:],
    compact(chunk({"content": "crlf"}))[:-2] + b"\r\n\r\n",
    compact(chunk({"content": "a"})) + compact(chunk({"content": "b"})),
    compact(chunk({"content": "with usage"}, usage={"prompt_tokens": 4, "completion_tokens": 1})),
    compact({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}),
    DONE,
]


def read(meter: SseMeter) -> tuple[object, ...]:
    usage = meter.usage
    return (
        meter.content_events,
        (usage.input_tokens, usage.output_tokens) if usage is not None else None,
        meter.done,
        meter.first_content_at,
        meter.last_content_at,
    )


def test_relay_reads_whole_events_as_the_line_reader_does() -> None:
    quick = SseMeter()
    for i, data in enumerate(SHAPES):
        chunks = [data]
        assert quick.relay(chunks, False, float(i)) is chunks  # sent on as they came
    lines = SseMeter()
    for i, data in enumerate(SHAPES):
        for byte in data:  # one byte at a time: never one whole event
            lines.relay([bytes([byte])], False, float(i))
    assert read(quick) == read(lines)
    # Content: Hel, lo, !, thinking, more, the tool call, the quoted key, the
    # completion, no space, crlf, a, b, with usage.
    assert read(quick) == (13, (4, 9), True, 1.0, 15.0)


def test_relay_after_a_partial_line_reads_the_rest_as_lines() -> None:
    meter = SseMeter()
    first, second = compact(chunk({"content": "x"})), compact(chunk({"content": "y"}))
    meter.relay([first[:9]], False, 0.0)
    meter.relay([first[9:] + second[:4]], False, 1.0)
    meter.relay([second[4:]], False, 2.0)
    meter.relay([compact(chunk({"content": "z"}))], False, 3.0)
    assert read(meter) == (3, None, False, 1.0, 3.0)


def test_relay_hides_the_usage_chunk_when_told() -> None:
    meter = SseMeter(hide_usage=True)
    usage = compact({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    token_event = compact(chunk({"content": "x"}))
    assert meter.relay([token_event, usage[:10]], False, 0.0) == [token_event]
    assert meter.relay([usage[10:], DONE], True, 1.0) == [DONE]
    assert read(meter) == (1, (2, 1), True, 0.0, 0.0)
