"""What a configured header name, header value or path may hold (RFC 9110, RFC 3986).

Config values end up on the wire byte for byte, so they are checked once, when
the config is compiled, against the grammar they will have to satisfy; the
request path never pays for it. Each check returns a problem string (without
the key path, which the caller prepends) or ``None``.
"""

from __future__ import annotations

import json
import re
from typing import Final

__all__ = ["field_value_problem", "is_token", "key", "path_problem", "quoted"]

# RFC 9110 §5.6.2: token = 1*tchar;
# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~"
#         / DIGIT / ALPHA. Field names (§5.1) and methods (§9.1) are tokens.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# RFC 9110 §5.5: a field value is VCHAR, obs-text, SP and HTAB; every other
# control character (CR and LF above all) could end the line early.
_CTL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# RFC 3986 §3.3: a path is printable ASCII; "?" starts the query and "#" the
# fragment, so neither can be part of a path the client sends.
_NOT_IN_PATH: Final = re.compile(r"[^\x21-\x7e]|[?#]")


# TOML bare keys (TOML 1.0 "Keys"); anything else is written quoted.
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def key(name: str) -> str:
    """``name`` as one part of a TOML key path: ``users``, ``"api.v1"``."""
    return name if _BARE_KEY.fullmatch(name) else quoted(name)


def quoted(value: str) -> str:
    """``value`` as a TOML basic string, the way the operator wrote it: ``"^(("``."""
    return json.dumps(value, ensure_ascii=False)


def is_token(text: str) -> bool:
    """Tell whether ``text`` is an RFC 9110 token (a field name, a method)."""
    return _TOKEN.fullmatch(text) is not None


def field_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a field value, or ``None`` if it can (RFC 9110 §5.5)."""
    bad = _CTL.search(value)
    if bad is not None:
        char = bad.group()
        return f"control character {char!r} not allowed in a header value, got {quoted(value)}"
    return None


def path_problem(path: str) -> str | None:
    """Why ``path`` can never equal a client's path as sent, or ``None`` if it can.

    Paths are compared with the raw bytes of the request-target, so a
    configured path must be written as clients send it: starting with ``/``,
    in printable ASCII, non-ASCII and spaces percent-encoded (``%C3%A9``).
    """
    if not path.startswith("/"):
        return f'must start with "/", got {quoted(path)}'
    bad = _NOT_IN_PATH.search(path)
    if bad is not None:
        char = bad.group()
        if char in "?#":
            return f"{char!r} ends a path (query and fragment are not in it), got {quoted(path)}"
        return f"{char!r} must be percent-encoded as clients send it, got {quoted(path)}"
    return None
