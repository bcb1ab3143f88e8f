"""The checks behind every configuration value, written once (sans-I/O).

Each function takes a value as a source gives it — a TOML value (int, float,
str, bool, list, table) or a string from the environment or the command line —
and returns it in the model's terms, or raises :class:`Invalid` with a short
reason such as ``must be 0..65535, got "70000"``. Where the value came from
(file and key path, environment variable, flag) is the loader's to add
(:mod:`trioproxy.config.load`), so that the same check serves every source.

Durations are seconds: a number, or a string with a unit (``"250ms"``,
``"2s"``, ``"5m"``, ``"1h"``). Sizes are bytes: a whole number, or a string
with a binary multiple (``"64k"``, ``"10m"``, ``"1g"``; ``"64KiB"`` too).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trioproxy.balance.health_rules import StatusRanges
from trioproxy.balance.strategies import make_strategy
from trioproxy.balance.target import TargetSpec
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import RateLimitSpec, RedirectHTTP, SniCertificate
from trioproxy.edge.identity import FORWARDED_MODES
from trioproxy.http.parsers import httptools_available
from trioproxy.upstream.origin import BadUpstreamURL, UpstreamURL

T = TypeVar("T")

#: A check: a raw value in, the model's value out, or :class:`Invalid`.
Convert = Callable[[Any], Any]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
HTTP_PARSERS = ("auto", "h11", "httptools")
HEALTH_METHODS = ("HEAD", "GET")


class Invalid(ValueError):
    """A value a check refused: ``problems`` are ``(where inside the value, reason)`` pairs.

    ``where`` is ``""`` for the value itself, or a key path below it
    (``"[1].weight"`` for the second server's weight), which the loader appends
    to the value's own path.
    """

    def __init__(self, reason: str, at: str = "") -> None:
        super().__init__(reason)
        self.problems: list[tuple[str, str]] = [(at, reason)]

    @classmethod
    def many(cls, problems: Sequence[tuple[str, str]]) -> Invalid:
        error = cls(problems[0][1], problems[0][0])
        error.problems = list(problems)
        return error


def show(value: object) -> str:
    """A value as a message quotes it: TOML-like (``"text"``, ``3``, ``true``, ``[1, 2]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {show(item)}" for key, item in value.items()) + " }"
    return repr(value)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean "x"?)`` for the closest choice, or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --- numbers ------------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmg])(?:i?b)?)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _number(value: object) -> float | None:
    """An int or float from TOML (never a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _at_least(value: float, raw: object, minimum: float, strict: bool) -> None:
    if strict and not value > minimum:
        raise Invalid(f"must be > {minimum:g}, got {show(raw)}")
    if not strict and not value >= minimum:
        raise Invalid(f"must be >= {minimum:g}, got {show(raw)}")


def duration(value: object, *, positive: bool = False) -> float:
    """Seconds: ``2``, ``0.5``, ``"250ms"``, ``"2s"``, ``"5m"``, ``"1h"``; never negative."""
    seconds = _number(value)
    if seconds is None and isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            seconds = float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()]
    if seconds is None or math.isnan(seconds):
        raise Invalid(
            f'must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got {show(value)}'
        )
    if math.isinf(seconds):
        raise Invalid(f"must be finite, got {show(value)}")
    _at_least(seconds, value, 0, strict=positive)
    return float(seconds)


def positive_duration(value: object) -> float:
    return duration(value, positive=True)


def size(value: object, *, positive: bool = False) -> int:
    """Bytes: ``65536``, ``"64k"``, ``"10m"``, ``"1g"`` (binary multiples); never negative."""
    result: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            result = int(match[1]) * (_SIZE_UNITS[match[2].lower()] if match[2] else 1)
    if result is None:
        raise Invalid(f'must be a size in bytes (like 65536, "64k", "10m"), got {show(value)}')
    _at_least(result, value, 0, strict=positive)
    return result


def positive_size(value: object) -> int:
    return size(value, positive=True)


def integer(value: object) -> int:
    """Any whole number (``priority``): an int, or its decimal digits with an optional sign."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    raise Invalid(f"must be a whole number, got {show(value)}")


def count(value: object, *, minimum: int = 0) -> int:
    """A whole number ``>= minimum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and value.strip().isdigit():
        result = int(value)
    else:
        raise Invalid(f"must be a whole number >= {minimum}, got {show(value)}")
    if result < minimum:
        raise Invalid(f"must be a whole number >= {minimum}, got {show(value)}")
    return result


def positive_count(value: object) -> int:
    return count(value, minimum=1)


def workers(value: object) -> int:
    """``[server] workers``: a whole number >= 1, or ``"auto"`` = the CPUs this
    process may run on (``os.sched_getaffinity``, else ``os.cpu_count``)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpus_available()
    try:
        return count(value, minimum=1)
    except Invalid:
        raise Invalid(f'must be a whole number >= 1 or "auto", got {show(value)}') from None


def cpus_available() -> int:
    """The CPUs this process may run on (what ``workers = "auto"`` takes)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def port(value: object) -> int:
    """A TCP port, 0..65535 (0: the system picks one, where that makes sense)."""
    result: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and value.strip().isdigit():
        result = int(value)
    if result is None or not 0 <= result <= 65535:
        raise Invalid(f"must be 0..65535, got {show(value)}")
    return result


def ratio(value: object) -> float:
    """A share, 0..1 (``retry.budget``)."""
    result = _number(value)
    if result is None and isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            result = None
    if result is None or not 0 <= result <= 1:
        raise Invalid(f"must be a number between 0 and 1, got {show(value)}")
    return float(result)


def boolean(value: object) -> bool:
    """true or false; from text also 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
    raise Invalid(f"must be true or false, got {show(value)}")


def status(value: object) -> int:
    """A final HTTP status code, 200..599 (``respond.status``)."""
    if isinstance(value, int) and not isinstance(value, bool) and 200 <= value <= 599:
        return value
    if isinstance(value, str) and value.strip().isdigit() and 200 <= int(value) <= 599:
        return int(value)
    raise Invalid(f"must be an HTTP status 200..599, got {show(value)}")


def statuses(value: object) -> StatusRanges:
    """``health.expect``: a status, a ``"low-high"`` range, or a list of them
    (``[200]``, ``[200, "300-399"]``); on the command line, ``200,204`` or ``200-299``."""
    try:
        if isinstance(value, str):
            return StatusRanges.parse(value)
        items = _as_list(value)
        if any(isinstance(item, bool) or not isinstance(item, int | str) for item in items):
            raise ValueError("not a status")
        return StatusRanges.of(items)
    except ValueError:
        raise Invalid(
            f'must be HTTP statuses 100..599 or ranges like "200-299", got {show(value)}'
        ) from None


# --- text -------------------------------------------------------------------------


def text(value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {show(value)}")
    if not value.strip():
        raise Invalid("must not be empty")
    return value


def any_text(value: object) -> str:
    """A string, possibly empty (``respond.body``)."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {show(value)}")
    return value


def choice(choices: Sequence[str], *, fold: Callable[[str], str] = str.lower) -> Convert:
    """A check that the value is one of ``choices`` (compared after ``fold``)."""

    def check(value: object) -> str:
        if isinstance(value, str) and fold(value.strip()) in choices:
            return fold(value.strip())
        raise Invalid(f"must be one of {', '.join(choices)}; got {show(value)}")

    return check


log_level = choice(LOG_LEVELS)
health_method = choice(HEALTH_METHODS, fold=str.upper)


def http_parser(value: object) -> str:
    """``auto``, ``h11`` or ``httptools`` (this one only where it is installed)."""
    result: str = choice(HTTP_PARSERS)(value)
    if result == "httptools" and not httptools_available():
        raise Invalid('"httptools" is not installed (pip install httptools)')
    return result


def url_path(value: object) -> str:
    """A path as a request-target has it: starts with ``/``."""
    result = text(value)
    if not result.startswith("/"):
        raise Invalid(f'must start with "/", got {show(value)}')
    if any(ch.isspace() for ch in result):
        raise Invalid(f"must not contain white space, got {show(value)}")
    return result


def regex(value: object) -> str:
    """A Python regular expression that compiles."""
    result = text(value)
    try:
        re.compile(result)
    except re.error as exc:
        raise Invalid(f"not a valid regular expression ({exc}), got {show(value)}") from None
    return result


_IMPORT_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_ref(value: object) -> str:
    """``package.module:name`` (the syntax only: importing is the caller's business)."""
    if not isinstance(value, str) or not _IMPORT_REF.fullmatch(value.strip()):
        raise Invalid(f'must be "package.module:function", got {show(value)}')
    return value.strip()


def strategy(value: object) -> str:
    """A balancing strategy name, or ``package.module:Name`` (imported to check it)."""
    name = text(value)
    try:
        make_strategy(name)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return name


# --- lists and tables -------------------------------------------------------------

# RFC 9110 §5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST_PATTERN = re.compile(
    r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?(:\d+)?"
)
_ORIGIN = re.compile(r"https?://[^/\s?#]+", re.IGNORECASE)


def _as_list(value: object) -> list[Any]:
    """A TOML array, or one value standing for a list of one."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        raise Invalid(f"must be a list, got {show(value)}")
    return [value]


def _table(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"must be a table, got {show(value)}")
    return value


def _each(value: object, check: Callable[[Any], T]) -> tuple[T, ...]:
    """``check`` on every item of a list, every failure kept (with the item's index)."""
    items = _as_list(value)
    results: list[T] = []
    problems: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        try:
            results.append(check(item))
        except Invalid as exc:
            suffix = f"[{index}]" if isinstance(value, list) else ""
            problems.extend((suffix + at, reason) for at, reason in exc.problems)
    if problems:
        raise Invalid.many(problems)
    return tuple(results)


def header_name(value: object) -> str:
    """A header field name (an RFC 9110 token), lower-cased."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise Invalid(f"must be a header name, got {show(value)}")
    return value.lower()


def header_value(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {show(value)}")
    if any(ch in value for ch in "\r\n\0"):
        raise Invalid(f"must not contain CR, LF or NUL, got {show(value)}")
    return value


def header_names(value: object) -> tuple[str, ...]:
    return _each(value, header_name)


def header_table(value: object) -> tuple[tuple[str, str], ...]:
    """``{ "X-Name" = "value", ... }`` → ``(("x-name", "value"), ...)`` in file order."""
    return _pair_table(value, header_name, header_value)


def path_table(value: object) -> tuple[tuple[str, str], ...]:
    """``{ "/from" = "/to", ... }`` → pairs in file order; both sides paths."""
    return _pair_table(value, url_path, url_path)


def _pair_table(
    value: object, check_key: Callable[[str], str], check_item: Callable[[object], str]
) -> tuple[tuple[str, str], ...]:
    """A table's (key, item) pairs in file order, each side checked; every bad
    entry is reported, at its key."""
    problems: list[tuple[str, str]] = []
    pairs: list[tuple[str, str]] = []
    for key, item in _table(value).items():
        try:
            pairs.append((check_key(key), check_item(item)))
        except Invalid as exc:
            problems.extend((f".{_key(key)}", reason) for _, reason in exc.problems)
    if problems:
        raise Invalid.many(problems)
    return tuple(pairs)


def _key(name: str) -> str:
    """A key as a TOML path writes it: bare if it can be, else quoted."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def method(value: object) -> str:
    """An HTTP method (a token), upper-cased."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise Invalid(f"must be an HTTP method, got {show(value)}")
    return value.upper()


def methods(value: object) -> tuple[str, ...]:
    return _each(value, method)


def host_pattern(value: object) -> str:
    """A host name, or ``*.domain`` for any name under it; lower-cased."""
    if isinstance(value, str) and _HOST_PATTERN.fullmatch(value.lower()):
        return value.lower()
    raise Invalid(f'must be a host name or "*.domain", got {show(value)}')


def host_patterns(value: object) -> tuple[str, ...]:
    return _each(value, host_pattern)


def origin(value: object) -> str:
    """A CORS origin, ``scheme://host[:port]``, or ``*``."""
    if isinstance(value, str) and (value == "*" or _ORIGIN.fullmatch(value)):
        return value
    raise Invalid(f'must be "*" or an origin like "https://app.example.com", got {show(value)}')


def origins(value: object) -> tuple[str, ...]:
    return _each(value, origin)


# --- upstream servers -------------------------------------------------------------

_TARGET_OPTIONS = ("weight", "max_inflight", "health_path")


def parse_target(text: str) -> TargetSpec:
    """``URL[,weight=N][,max_inflight=N][,health_path=/p]`` → TargetSpec.

    Raises:
        ConfigError: one line naming the value and what is wrong with it.
    """
    url_text, *options = text.split(",")
    try:
        url = UpstreamURL.parse(url_text)
    except BadUpstreamURL as exc:
        raise ConfigError(str(exc)) from None
    values: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in _TARGET_OPTIONS:
            raise ConfigError(
                f"{text!r}: unknown option {option!r} (use {', '.join(_TARGET_OPTIONS)})"
            )
        if key == "health_path":
            if not value.startswith("/"):
                raise ConfigError(f"{text!r}: health_path must start with '/', got {value!r}")
            values[key] = value
        else:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{text!r}: {key} must be a whole number >= 1, got {value!r}")
            values[key] = int(value)
    return TargetSpec(url=url, **values)  # type: ignore[arg-type]


def _unknown_keys(table: dict[str, Any], known: Sequence[str]) -> list[tuple[str, str]]:
    """A problem for each key of an inline table that is not one of ``known``."""
    return [
        (f".{_key(key)}", "unknown key" + did_you_mean(key, known))
        for key in table
        if key not in known
    ]


def _inline_table(
    table: dict[str, Any], checks: dict[str, Convert]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """An inline table's values, each key that is there checked by its ``checks``
    entry: (the values, the problems: unknown keys, then bad values)."""
    problems = _unknown_keys(table, list(checks))
    fields: dict[str, Any] = {}
    for key, check in checks.items():
        if key in table:
            try:
                fields[key] = check(table[key])
            except Invalid as exc:
                problems.extend((f".{key}", reason) for _, reason in exc.problems)
    return fields, problems


def server(value: object) -> TargetSpec:
    """One entry of ``servers``: a URL string (``--upstream`` syntax: options after
    commas work too), or ``{ url = ..., weight = N, max_inflight = N, health_path = "/p" }``."""
    if isinstance(value, str):
        try:
            return parse_target(value)
        except ConfigError as exc:
            raise Invalid(str(exc)) from None
    table = _table(value)
    fields, problems = _inline_table(table, _SERVER_CHECKS)
    if "url" not in table:
        problems.append(("", 'needs a "url"'))
    if problems:
        raise Invalid.many(problems)
    return TargetSpec(**fields)


def _upstream_url(value: object) -> UpstreamURL:
    try:
        return UpstreamURL.parse(text(value))
    except BadUpstreamURL as exc:
        raise Invalid(str(exc)) from None


_SERVER_CHECKS: dict[str, Convert] = {
    "url": _upstream_url,
    "weight": positive_count,
    "max_inflight": positive_count,
    "health_path": url_path,
}


def servers(value: object) -> tuple[TargetSpec, ...]:
    return _each(value, server)


_LIST_SPLIT = re.compile(r"[\s,]+")


def server_list_text(value: str) -> list[str]:
    """``TRIOPROXY_UPSTREAM``: servers separated by white space or commas.

    A comma followed by ``weight=``, ``max_inflight=`` or ``health_path=`` is an
    option of the server before it, as in ``--upstream``.
    """
    items: list[str] = []
    for word in _LIST_SPLIT.split(value.strip()):
        if not word:
            continue
        if items and re.match(r"(weight|max_inflight|health_path)=", word):
            items[-1] += "," + word
        else:
            items.append(word)
    return items


# --- rate limits (trioproxy.edge) ---------------------------------------------------

RATE_LIMIT_KEYS = ("ip", "route", "api_key", "header:NAME")
RATE_LIMIT_STORES = ("memory", "redis")
STORE_ERROR_CHOICES = ("allow", "deny")

store_error_choice = choice(STORE_ERROR_CHOICES)


def rate_limit_key(value: object) -> str:
    """``ip``, ``route``, ``api_key`` or ``header:NAME`` (NAME lower-cased)."""
    if isinstance(value, str):
        word = value.strip()
        if word in ("ip", "route", "api_key"):
            return word
        kind, sep, name = word.partition(":")
        if kind == "header" and sep and _TOKEN.fullmatch(name):
            return f"header:{name.lower()}"
    raise Invalid(f"must be one of {', '.join(RATE_LIMIT_KEYS)}; got {show(value)}")


_RATE_LIMIT_CHECKS: dict[str, Convert] = {
    "average": positive_count,
    "period": positive_duration,
    "burst": positive_count,
    "key": rate_limit_key,
    "store": choice(RATE_LIMIT_STORES),
}


def rate_limit(value: object) -> RateLimitSpec:
    """One entry of ``rate_limit``: ``{ average = N, period = "1m", burst = N,
    key = "ip", store = "memory" }`` (``average`` required)."""
    table = _table(value)
    fields, problems = _inline_table(table, _RATE_LIMIT_CHECKS)
    if "average" not in table:
        problems.append(("", 'needs "average", the requests allowed per period'))
    if problems:
        raise Invalid.many(problems)
    return RateLimitSpec(**fields)


def rate_limits(value: object) -> tuple[RateLimitSpec, ...]:
    """``rate_limit = [{...}, ...]`` (or one table)."""
    if isinstance(value, dict):
        value = [value]
    return _each(value, rate_limit)


def redis_url(value: object) -> str:
    """``redis://[user:password@]host[:port][/db]`` (or ``rediss://`` for TLS)."""
    result = text(value)
    if not re.fullmatch(r"rediss?://[^\s/]+(/\d*)?", result.strip()):
        raise Invalid(f'must be like "redis://127.0.0.1:6379/0", got {show(value)}')
    return result.strip()


# --- networks (trusted_proxies, allow, deny) ---------------------------------------


def cidr(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network, ``"10.0.0.0/8"`` or ``"2001:db8::/32"``; a bare address is a /32 (/128).
    Host bits must be zero (``"10.0.0.1/8"`` is refused: it likely means something else)."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip())
        except ValueError:
            pass
    raise Invalid(f'must be an IP network like "10.0.0.0/8" or "2001:db8::/32", got {show(value)}')


def cidrs(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of networks; from the environment, separated by commas or white space."""
    if isinstance(value, str):
        value = [part for part in _LIST_SPLIT.split(value.strip()) if part]
    return _each(value, cidr)


forwarded_mode = choice(FORWARDED_MODES)


# --- TLS (server.tls) ----------------------------------------------------------------

_SNI_KEYS = ("hosts", "cert", "key")


def _sni_entry(value: object) -> SniCertificate:
    """``{ hosts = [...], cert = "a.pem", key = "a.key" }`` (file names as written)."""
    table = _table(value)
    problems = _unknown_keys(table, _SNI_KEYS)
    fields: dict[str, Any] = {}
    for key, check in (("hosts", host_patterns), ("cert", text), ("key", text)):
        if key not in table:
            problems.append(("", f'needs "{key}"'))
            continue
        try:
            fields[key] = check(table[key])
        except Invalid as exc:
            problems.extend((f".{key}{at}", reason) for at, reason in exc.problems)
    if problems:
        raise Invalid.many(problems)
    return SniCertificate(**fields)


def sni_entries(value: object) -> tuple[SniCertificate, ...]:
    """``[[server.tls.sni]]``: a list of tables."""
    if not isinstance(value, list):
        raise Invalid(f"must be a list of tables ([[server.tls.sni]]), got {show(value)}")
    return _each(value, _sni_entry)


def redirect_http(value: object) -> RedirectHTTP:
    """``tls.redirect_http``: a port (on the server's host) or ``"host:port"``."""
    if isinstance(value, str) and ":" in value:
        host, _, port_text = value.rpartition(":")
        host = host.strip().removeprefix("[").removesuffix("]")
        try:
            return RedirectHTTP(host=host or None, port=port(port_text))
        except Invalid:
            pass
        raise Invalid(f'must be a port or "host:port", got {show(value)}')
    try:
        return RedirectHTTP(port=port(value))
    except Invalid:
        raise Invalid(f'must be a port or "host:port", got {show(value)}') from None


# --- observability ------------------------------------------------------------------

LOG_FORMATS = ("text", "json")
HANDLERS = ("metrics", "health", "ping")
log_format = choice(LOG_FORMATS)
handler = choice(HANDLERS)
llm_api = choice(("openai",))
include_usage = choice(("pass", "inject"))


def buckets(value: object) -> tuple[float, ...]:
    """Histogram bucket bounds: durations in increasing order (``[0.01, "1s", "5m"]``;
    from text ``0.01,1,300``)."""
    if isinstance(value, str):
        value = [word for word in _LIST_SPLIT.split(value.strip()) if word]
    bounds = _each(value, positive_duration)
    if not bounds:
        raise Invalid("must list at least one bucket")
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise Invalid(f"must be in increasing order, got {show(value)}")
    return bounds


def model_names(value: object) -> tuple[str, ...]:
    """``llm.models``: model names, each a non-empty string."""
    return _each(value, text)
