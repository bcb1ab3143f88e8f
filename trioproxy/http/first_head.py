"""Reading the one request head of a connection that answers once and closes
(the admin listener, ``tls.redirect_http``): the loop both would write."""

from __future__ import annotations

import trio

from trioproxy.http.protocol import NEED_DATA, RequestHead, ServerProtocol


async def read_request_head(
    stream: trio.abc.Stream, protocol: ServerProtocol, read_size: int
) -> RequestHead | None:
    """The first request head ``protocol`` parses from ``stream``; None when the peer
    closed first or its first event is not a head. The caller bounds the time.

    Raises:
        ProtocolError: the bytes are not a valid request head (as ``next_event``).
        trio.BrokenResourceError, trio.ClosedResourceError, OSError: from ``stream``.
    """
    while True:
        event = protocol.next_event()
        if event is NEED_DATA:
            data = await stream.receive_some(read_size)
            protocol.receive_data(data)
            if not data:
                return None
        elif type(event) is RequestHead:
            return event
        else:
            return None
