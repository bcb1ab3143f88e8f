"""WebSocket frames written by hand (RFC 6455 §5.2), for tests that must send exact bytes.

Independent of the proxy's own frame code, so that a test does not check that code
against itself.
"""

from __future__ import annotations

import struct

#: The masking key a test's frames carry unless it says otherwise.
KEY = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, key: bytes | None = KEY, rsv: int = 0
) -> bytes:
    """A frame, masked with ``key`` (as a client's) unless it is None (as a server's)."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if key is not None else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if key is None:
        return head + payload
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + key + masked
