"""What trioproxy.http.h11_impl assumes of h11's internals (pinned to 0.16.x).

The conformance suite checks the adapter's behaviour; these tests check the
private h11 details it leans on, so an h11 release that changes them fails here,
by name, rather than somewhere downstream.
"""

from __future__ import annotations

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer

from trioproxy.errors import RelayError
from trioproxy.http.h11_impl import H11Client, H11Server, _StrictReceiveBuffer
from trioproxy.http.protocol import PAUSED, RequestHead, ResponseHead

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def test_parsed_flag_skips_only_the_field_regexes() -> None:
    # A value h11's regex refuses goes through: this is the validation we skip...
    bad = [(b"x a", b"1")]
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(status_code=200, headers=bad)
    h11.Response(status_code=200, headers=bad, _parsed=True)
    # ...while framing fields are still normalised and checked...
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(
            status_code=200,
            headers=[(b"content-length", b"1"), (b"content-length", b"2")],
            _parsed=True,
        )
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(status_code=200, headers=[(b"transfer-encoding", b"gzip")], _parsed=True)
    # ...and so are the request line and Host.
    with pytest.raises(h11.LocalProtocolError):
        h11.Request(method=b"GET", target=b"/ x", headers=[(b"host", b"h")], _parsed=True)
    with pytest.raises(h11.LocalProtocolError):
        h11.Request(method=b"GET", target=b"/", headers=[], _parsed=True)


def test_parsed_heads_write_what_validated_ones_do() -> None:
    headers = [(b"host", b"h"), (b"content-length", b"2"), (b"x-a", b"1")]
    conns = [h11.Connection(h11.CLIENT) for _ in range(2)]
    plain = conns[0].send(h11.Request(method=b"POST", target=b"/", headers=headers))
    parsed = conns[1].send(h11.Request(method=b"POST", target=b"/", headers=headers, _parsed=True))
    assert plain == parsed
    assert conns[1].send(h11.Data(data=b"hi")) == b"hi"
    with pytest.raises(h11.LocalProtocolError):
        conns[1].send(h11.Data(data=b"x"))  # the state machine read Content-Length


def test_a_body_the_framing_does_not_allow_is_a_relay_error() -> None:
    client = H11Client(65536)
    client.send_head(RequestHead(b"GET", b"/", [(b"host", b"h")]))
    with pytest.raises(RelayError):
        client.send_body(b"x")  # a GET without Content-Length has no body


def test_strict_buffer_replaces_h11s() -> None:
    conn = h11.Connection(h11.SERVER)
    assert type(conn._receive_buffer) is ReceiveBuffer
    assert isinstance(conn._receive_buffer._data, bytearray)
    assert isinstance(H11Server(65536)._conn._receive_buffer, _StrictReceiveBuffer)


def _server_states() -> list[tuple[str, H11Server]]:
    out = []
    fresh = H11Server(65536)
    out.append(("fresh", fresh))
    for name, data in [
        ("half a head", b"GET / HTTP/1.1\r\nHo"),
        ("body pending", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"),
        ("empty body", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"),
        ("chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (
            "upgrade",
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ),
        ("done", GET),
    ]:
        server = H11Server(65536)
        server.receive_data(data)
        server.next_event()
        out.append((name, server))
    eof = H11Server(65536)
    eof.receive_data(b"")
    out.append(("eof", eof))
    cycled = H11Server(65536)
    cycled.receive_data(GET)
    while cycled.next_event() is not PAUSED and not cycled.peer_done:
        pass
    cycled.send_head(ResponseHead(200, [(b"content-length", b"0")]))
    cycled.send_end()
    cycled.start_next_cycle()
    out.append(("next cycle", cycled))
    return out


def _client_states() -> list[tuple[str, H11Client]]:
    out = [("fresh", H11Client(65536))]
    for name, data in [
        ("request sent", None),
        ("half a head", b"HTTP/1.1 200 OK\r\nCont"),
        ("body pending", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
        ("empty body", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ("to close", b"HTTP/1.1 200 OK\r\n\r\n"),
        ("eof", b""),
    ]:
        client = H11Client(65536)
        client.send_head(RequestHead(b"GET", b"/", [(b"host", b"h")]))
        client.send_end()
        if data is not None:
            client.receive_data(data)
        if data:
            client.next_event()
        out.append((name, client))
    return out


@pytest.mark.parametrize("case", range(9))
def test_need_data_shortcut_agrees_with_h11_server(case: int) -> None:
    name, server = _server_states()[case]
    shortcut = server._nothing_to_read()
    assert shortcut == (name in ("fresh", "next cycle")), name
    if shortcut:
        assert server._conn.next_event() is h11.NEED_DATA


@pytest.mark.parametrize("case", range(7))
def test_need_data_shortcut_agrees_with_h11_client(case: int) -> None:
    name, client = _client_states()[case]
    shortcut = client._nothing_to_read()
    assert shortcut == (name in ("fresh", "request sent")), name
    if shortcut:
        assert client._conn.next_event() is h11.NEED_DATA
