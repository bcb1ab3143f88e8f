"""The LLM stream meter through the real proxy, with the official ``openai`` client
(and the ASGI app under hypercorn, for the cases that take ``front_end``).

The upstream is a stub OpenAI-style server on a raw socket (so that its timing
and its faults are exact): a streamed chat completion's first token comes 300 ms
after the request, then 49 more 20 ms apart (50 in all), then the usage chunk
when the request asked for it (``stream_options.include_usage``), then
``[DONE]``. The client runs in a thread (the ``openai`` client is synchronous
here); both sides stamp each event with ``time.monotonic()``.
"""

from __future__ import annotations

import itertools
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from e2e.conftest import FrontEnd
from e2e.metrics_helpers import Scrape, scrape_when
from fixtures import read_head, reset, run_proxy, serve_tcp_handler

pytestmark = pytest.mark.timeout(60)

TOKENS = 50
FIRST_TOKEN_AFTER = 0.3
TOKEN_INTERVAL = 0.02
PROMPT = "one two three four five six seven"
PROMPT_TOKENS = len(PROMPT.split())


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


@attrs.define
class StubLLM:
    """An OpenAI-style upstream (see the module docstring); ``cut_after`` tokens, if
    set, it resets the connection instead of finishing the stream."""

    cut_after: int | None = None
    #: Send the stream with a Content-Length instead of chunked (the engine relays a
    #: body of known length on the exchange's own task, not the stream hub).
    content_length: bool = False
    requests: list[dict[str, Any]] = attrs.Factory(list)
    #: monotonic time each request's body was read, and each token was sent.
    received_at: list[float] = attrs.Factory(list)
    sent_at: list[list[float]] = attrs.Factory(list)
    url: str = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        data = await read_head(stream)
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += await stream.receive_some(65536)
        self.received_at.append(time.monotonic())
        request = json.loads(body)
        self.requests.append(request)
        model = request["model"]
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": TOKENS,
            "total_tokens": PROMPT_TOKENS + TOKENS,
        }
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        if not request.get("stream"):
            reply = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "t " * TOKENS},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            ).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(reply) + reply
            )
            return
        events: list[bytes] = []
        for i in range(TOKENS):
            delta = {"content": f"t{i} "} if i else {"role": "assistant", "content": "t0 "}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            events.append(_event({**base, "choices": [choice], "usage": None}))
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        tail = [_event({**final, "usage": None})]
        if (request.get("stream_options") or {}).get("include_usage"):
            tail.append(_event({**base, "choices": [], "usage": usage}))
        tail.append(b"data: [DONE]\n\n")
        if self.content_length:
            size = sum(map(len, events + tail))
            framing = b"content-length: %d\r\n" % size
            frame = bytes
        else:
            framing = b"transfer-encoding: chunked\r\n"
            frame = _chunk
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n" + framing + b"\r\n"
        )
        sent: list[float] = []
        self.sent_at.append(sent)
        await trio.sleep(FIRST_TOKEN_AFTER)
        for i, data in enumerate(events):
            if i:
                await trio.sleep(TOKEN_INTERVAL)
            if self.cut_after is not None and i == self.cut_after:
                await reset(stream)
                return
            sent.append(time.monotonic())
            await stream.send_all(frame(data))
        await stream.send_all(
            b"".join(map(frame, tail)) + (b"" if self.content_length else b"0\r\n\r\n")
        )


async def start_stub(nursery: trio.Nursery, **kwargs: Any) -> StubLLM:
    stub = StubLLM(**kwargs)
    host, port = await serve_tcp_handler(stub.handle, nursery)
    stub.url = f"http://{host}:{port}"
    return stub


@attrs.frozen
class Streamed:
    contents: list[str]
    received_at: list[float]
    usage: Any
    chunks: int


def stream_chat(base_url: str, model: str, include_usage: bool | None) -> Streamed:
    """Stream one chat completion with the official client (run in a thread)."""
    with httpx.Client(trust_env=False, timeout=20) as http:
        client = openai.OpenAI(
            base_url=base_url, api_key="sk-test", max_retries=0, http_client=http
        )
        extra: dict[str, Any] = {}
        if include_usage is not None:
            extra["stream_options"] = {"include_usage": include_usage}
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], stream=True, **extra
        )
        contents: list[str] = []
        received: list[float] = []
        usage = None
        chunks = 0
        for chunk in stream:
            now = time.monotonic()
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    contents.append(choice.delta.content)
                    received.append(now)
    return Streamed(contents, received, usage, chunks)


def assert_each_event_within_10ms(sent: list[float], received: list[float]) -> None:
    assert len(sent) == len(received) == TOKENS
    lags = [(r - s) * 1000 for s, r in zip(sent, received, strict=True)]
    # As tests/e2e/test_sse.py: a proxy that holds events back delays runs of them;
    # a shared machine stalls one now and then. At most 2 of 50 over 10 ms, none
    # over 250 ms, never two in a row.
    late = [(i, round(ms, 1)) for i, ms in enumerate(lags) if ms > 10]
    assert len(late) <= 2, f"events later than 10 ms (index, ms): {late}"
    assert all(ms <= 250 for _, ms in late), late
    assert not any(b == a + 1 for (a, _), (b, _) in itertools.pairwise(late)), late


def llm(scrape: Scrape, name: str, route: str, model: str, **labels: str) -> float:
    return scrape.get(name, 0.0, route=route, upstream="llm", model=model, **labels)


def config(tmp_path: Path, stub: str) -> str:
    path = tmp_path / "trioproxy.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            metrics_path = "/metrics"
            log_format = "json"

            [upstreams.llm]
            servers = ["{stub}"]
            health = false
            retry = {{ attempts = 0 }}

            [routes.inject]
            upstream = "llm"
            match = {{ path_prefix = "/inject/" }}
            rewrite = {{ strip_prefix = "/inject" }}
            llm = {{ api = "openai", include_usage = "inject" }}

            [routes.plain]
            upstream = "llm"
            """
        )
    )
    return str(path)


async def test_openai_client_streams_through_the_meter(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    stub = await start_stub(nursery)
    access_log = tmp_path / "access.log"
    async with front_end(
        "--config", config(tmp_path, stub.url), "--access-log", str(access_log),
        "--log-level", "debug",
    ) as proxy:  # fmt: skip
        metrics = f"{proxy.url}/metrics"

        # 1. Recognised without config (a POST to .../v1/chat/completions); the
        #    client asks for usage itself.
        with trio.fail_after(20):
            got = await trio.to_thread.run_sync(stream_chat, f"{proxy.url}/v1", "model-pass", True)
        assert got.contents == [f"t{i} " for i in range(TOKENS)]
        assert got.usage is not None and got.usage.completion_tokens == TOKENS
        assert_each_event_within_10ms(stub.sent_at[0], got.received_at)
        after = await scrape_when(
            http_client,
            metrics,
            lambda s: llm(s, "trioproxy_llm_requests_total", "plain", "model-pass", stream="true"),
        )
        ttft = llm(after, "trioproxy_llm_time_to_first_token_seconds_sum", "plain", "model-pass")
        assert (
            llm(after, "trioproxy_llm_time_to_first_token_seconds_count", "plain", "model-pass")
            == 1
        )
        upstream_ttft = stub.sent_at[0][0] - stub.received_at[0]
        print(f"TTFT observed {ttft * 1000:.1f} ms; at the stub {upstream_ttft * 1000:.1f} ms")
        assert 0.30 <= ttft <= max(0.33, upstream_ttft + 0.03), (ttft, upstream_ttft)
        assert llm(after, "trioproxy_llm_tokens_total", "plain", "model-pass", type="output") == 50
        assert llm(after, "trioproxy_llm_tokens_total", "plain", "model-pass", type="input") == 7
        assert llm(after, "trioproxy_llm_requests_total", "plain", "model-pass", stream="true") == 1
        assert after.get("trioproxy_llm_usage_missing_total", route="plain", upstream="llm") == 0
        tpot = llm(after, "trioproxy_llm_time_per_output_token_seconds_sum", "plain", "model-pass")
        assert 0.015 <= tpot <= 0.06, tpot
        tps = llm(after, "trioproxy_llm_output_tokens_per_second_sum", "plain", "model-pass")
        assert 16 <= tps <= 55, tps
        # The seed's families: endpoint is the OpenAI endpoint path.
        assert (
            after.value(
                "request_duration_seconds_count", url=stub.url, endpoint="/v1/chat/completions"
            )
            == 1
        )

        # 2. include_usage = "inject": the client did not ask, the upstream was asked,
        #    and the client never sees the usage chunk.
        with trio.fail_after(20):
            got = await trio.to_thread.run_sync(
                stream_chat, f"{proxy.url}/inject/v1", "model-inject", None
            )
        assert stub.requests[1]["stream_options"] == {"include_usage": True}
        assert got.usage is None
        assert got.chunks == TOKENS + 1  # the tokens and the finish chunk: no usage chunk
        assert got.contents == [f"t{i} " for i in range(TOKENS)]
        assert_each_event_within_10ms(stub.sent_at[1], got.received_at)
        after = await scrape_when(
            http_client,
            metrics,
            lambda s: llm(
                s, "trioproxy_llm_requests_total", "inject", "model-inject", stream="true"
            ),
        )
        ttft = llm(after, "trioproxy_llm_time_to_first_token_seconds_sum", "inject", "model-inject")
        upstream_ttft = stub.sent_at[1][0] - stub.received_at[1]
        assert 0.30 <= ttft <= max(0.33, upstream_ttft + 0.03), (ttft, upstream_ttft)
        assert (
            llm(after, "trioproxy_llm_tokens_total", "inject", "model-inject", type="output") == 50
        )
        assert llm(after, "trioproxy_llm_tokens_total", "inject", "model-inject", type="input") == 7
        assert after.get("trioproxy_llm_usage_missing_total", route="inject", upstream="llm") == 0

        # 3. A client that asked for usage on the inject route still gets it.
        with trio.fail_after(20):
            got = await trio.to_thread.run_sync(
                stream_chat, f"{proxy.url}/inject/v1", "model-inject", True
            )
        assert got.usage is not None and got.usage.prompt_tokens == PROMPT_TOKENS

        # Every LLM family has samples now.
        names = {name for name, _ in after.samples}
        for family in (
            "trioproxy_llm_time_to_first_token_seconds",
            "trioproxy_llm_time_per_output_token_seconds",
            "trioproxy_llm_output_tokens_per_second",
            "trioproxy_llm_tokens_total",
            "trioproxy_llm_requests_total",
            "trioproxy_llm_usage_missing_total",
        ):
            assert any(name.startswith(family) for name in names), family

        # The stream went through the stream hub's relay, and the meter saw it there
        # (the ASGI app has no hub: the server owns the client socket).
        if front_end is run_proxy:
            assert "relayed by the hub" in await proxy.settled_stderr()
        # The lines are written by a thread (within FLUSH_EVERY_S): read them before
        # the proxy stops, since hypercorn --workers 0 installs no SIGTERM handler and
        # so dies with what is queued.
        with trio.fail_after(5):
            while access_log.read_text().count("/chat/completions") < 3:  # noqa: ASYNC110
                await trio.sleep(0.05)

    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    chat = [line for line in lines if line["target"].endswith("/chat/completions")]
    assert len(chat) == 3
    for line in chat:
        assert line["status"] == 200
        assert line["output_tokens"] == TOKENS
        assert line["input_tokens"] == PROMPT_TOKENS
        assert 300 <= line["ttft_ms"] < 1000
        assert line["model"] in ("model-pass", "model-inject")
        assert line["upstream"] == "llm" and line["server"] == stub.url


async def test_a_cut_stream_counts_a_miss_and_the_tokens_that_passed(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    stub = await start_stub(nursery, cut_after=20)
    async with front_end("--config", config(tmp_path, stub.url)) as proxy:
        for base, route in ((f"{proxy.url}/v1", "plain"), (f"{proxy.url}/inject/v1", "inject")):
            with pytest.raises((openai.APIError, httpx.HTTPError)):
                with trio.fail_after(20):
                    await trio.to_thread.run_sync(stream_chat, base, "model-cut", None)
            after = await scrape_when(
                http_client,
                f"{proxy.url}/metrics",
                lambda s, route=route: s.get(
                    "trioproxy_llm_usage_missing_total", route=route, upstream="llm"
                ),
            )
            assert after.get("trioproxy_llm_usage_missing_total", route=route, upstream="llm") == 1
            assert llm(after, "trioproxy_llm_tokens_total", route, "model-cut", type="output") == 20
            assert llm(after, "trioproxy_llm_tokens_total", route, "model-cut", type="input") == 0


async def test_a_plain_reply_is_metered_from_its_usage(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    stub = await start_stub(nursery)
    async with front_end("--config", config(tmp_path, stub.url)) as proxy:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            response = await client.post(
                f"{proxy.url}/inference/v1/chat/completions",
                json={"model": "model-json", "messages": [{"role": "user", "content": PROMPT}]},
            )
            assert response.json()["usage"]["completion_tokens"] == TOKENS
            # Other paths of an LLM route: the seed's endpoint is the route's name,
            # never the path (random paths add no series).
            for i in range(5):
                response = await client.post(
                    f"{proxy.url}/inject/v1/other/{i}",
                    json={"model": "model-json", "messages": []},
                )
                assert response.status_code == 200
        after = await scrape_when(
            http_client,
            f"{proxy.url}/metrics",
            lambda s: sum(s.matching("request_duration_seconds_count").values()) == 6,
        )
    assert llm(after, "trioproxy_llm_requests_total", "plain", "model-json", stream="false") == 1
    assert llm(after, "trioproxy_llm_tokens_total", "plain", "model-json", type="output") == 50
    assert llm(after, "trioproxy_llm_tokens_total", "plain", "model-json", type="input") == 7
    # A prefix before /v1/... counts; the seed's endpoint label is the OpenAI path.
    assert (
        after.value(
            "time_to_first_byte_seconds_count", url=stub.url, endpoint="/v1/chat/completions"
        )
        == 1
    )
    assert after.value("time_to_first_byte_seconds_count", url=stub.url, endpoint="inject") == 5
    endpoints = {dict(k)["endpoint"] for k in after.matching("request_duration_seconds_count")}
    assert endpoints == {"/v1/chat/completions", "inject"}, endpoints
    assert llm(after, "trioproxy_llm_tokens_total", "inject", "model-json", type="output") == 250


async def test_a_stream_of_known_length_is_metered_on_the_exchanges_own_task(
    tmp_path: Path, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    """A body with a Content-Length is relayed by the exchange's task, not the hub:
    the meter sees it there too, and hiding the usage chunk drops the length (the
    client gets it chunked)."""
    stub = await start_stub(nursery, content_length=True)
    async with run_proxy("--config", config(tmp_path, stub.url), "--log-level", "debug") as proxy:
        with trio.fail_after(20):
            got = await trio.to_thread.run_sync(stream_chat, f"{proxy.url}/v1", "model-cl", True)
        assert got.usage is not None and got.contents == [f"t{i} " for i in range(TOKENS)]
        assert_each_event_within_10ms(stub.sent_at[0], got.received_at)
        with trio.fail_after(20):
            hidden = await trio.to_thread.run_sync(
                stream_chat, f"{proxy.url}/inject/v1", "model-cl", None
            )
        assert hidden.usage is None and hidden.chunks == TOKENS + 1
        after = await scrape_when(
            http_client,
            f"{proxy.url}/metrics",
            lambda s: llm(s, "trioproxy_llm_requests_total", "inject", "model-cl", stream="true"),
        )
        assert "relayed by the hub" not in await proxy.settled_stderr()
    for route in ("plain", "inject"):
        assert llm(after, "trioproxy_llm_tokens_total", route, "model-cl", type="output") == 50
        assert llm(after, "trioproxy_llm_tokens_total", route, "model-cl", type="input") == 7
        ttft = llm(after, "trioproxy_llm_time_to_first_token_seconds_sum", route, "model-cl")
        assert 0.30 <= ttft < 1.0, ttft
