"""Build the configuration from its layers, and say precisely what is wrong with it.

Layers, lowest to highest precedence::

    model defaults < TOML file < .env < environment < command line

- The **file** is ``--config FILE``, else ``TRIOPROXY_CONFIG`` (from the
  environment or ``.env``); relative paths inside it (``tls.ca``) are taken
  from the file's directory.
- **.env** is ``--env-file PATH`` (which must exist) or ``./.env`` (if it
  exists), read with python-dotenv's ``dotenv_values``, so its quoting,
  ``export`` and ``${VAR}`` rules are the ones FastAPI users already write;
  ``os.environ`` is never changed.
- The **environment**: ``TRIOPROXY_<KEY>`` for every scalar key of
  ``[server]`` (``TRIOPROXY_PORT``, ``TRIOPROXY_LOG_LEVEL``...), plus
  ``TRIOPROXY_ADMIN_HOST`` / ``TRIOPROXY_ADMIN_PORT``, ``TRIOPROXY_CONFIG``
  and ``TRIOPROXY_UPSTREAM`` (servers of the ``default`` group, separated by
  white space or commas). An empty variable counts as unset. Other
  ``TRIOPROXY_*`` names are left alone: the prefix is shared (the test
  suite's ``TRIOPROXY_WSTEST``).
- The **command line**: server flags override ``[server]`` keys; upstream
  group flags (``--strategy``, ``--health-*``, ``--retries``...) override
  that key in *every* group; ``--upstream`` (or ``TRIOPROXY_UPSTREAM``) gives
  the servers of the group ``default`` and cannot be combined with a file
  that defines routes.

When no route is defined and a ``default`` group exists (from the file,
``TRIOPROXY_UPSTREAM`` or ``--upstream``), the route ``default`` sends every
request to it: the command lines of before the file keep their meaning.

How it works: each layer becomes a flat map from key paths
(``("routes", "users", "rewrite", "strip_prefix")``) to :class:`Value`
(the raw value plus where it came from); unknown keys are refused while the
file is walked. The maps are merged in order, then each model class is built
from its keys with the checks of :mod:`trioproxy.config.values`. Every
problem found is kept, as one line naming source, key path and value, and
they are raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import dotenv

from trioproxy.balance.balancer import BreakerSettings
from trioproxy.balance.health_rules import HealthSettings
from trioproxy.config import values as v
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import (
    AdminSettings,
    AuthSpec,
    Config,
    CorsSpec,
    HeaderRules,
    LlmSpec,
    MatchSpec,
    PassiveSettings,
    PoolSettings,
    RedisSettings,
    RespondSpec,
    RetrySettings,
    RewriteSpec,
    RouteSettings,
    RouteTimeouts,
    ServerSettings,
    ServerTLS,
    SniCertificate,
    Timeouts,
    UpstreamGroup,
    UpstreamTLS,
)

__all__ = [
    "ENV_PREFIX",
    "SERVER_ENV",
    "CliValue",
    "ConfigSources",
    "Value",
    "load_config",
]

Path_ = tuple[str, ...]

# --- the schema: every key of the file, and the check of its value ---------------


@attrs.frozen
class Table:
    """A TOML table and its keys; ``switch``: ``key = false`` turns the whole thing off."""

    fields: Mapping[str, v.Convert | Table | Named]
    switch: bool = False

    def scalars(self) -> dict[str, v.Convert]:
        return {
            key: check for key, check in self.fields.items() if not isinstance(check, Table | Named)
        }


@attrs.frozen
class Named:
    """A table of tables named by the user (``[upstreams.NAME]``, ``[routes.NAME]``)."""

    table: Table


HEADERS = Table(
    {
        "request_set": v.header_table,
        "request_add": v.header_table,
        "request_remove": v.header_names,
        "response_set": v.header_table,
        "response_add": v.header_table,
        "response_remove": v.header_names,
    }
)
ADMIN = Table({"host": v.text, "port": v.port})
REDIS = Table(
    {"url": v.redis_url, "timeout": v.positive_duration, "on_store_error": v.store_error_choice}
)
SERVER_TLS = Table(
    {"cert": v.text, "key": v.text, "sni": v.sni_entries, "redirect_http": v.redirect_http}
)
SERVER = Table(
    {
        "host": v.text,
        "port": v.port,
        "http": v.http_parser,
        "log_level": v.log_level,
        "grace": v.duration,
        "workers": v.workers,
        "header_timeout": v.positive_duration,
        "body_timeout": v.positive_duration,
        "keepalive_timeout": v.duration,
        "max_header_size": v.positive_size,
        "max_body_size": v.size,
        "ws_max_message_size": v.positive_size,
        "ws_idle_timeout": v.duration,
        "admin": ADMIN,
        "headers": HEADERS,
        "redis": REDIS,
        "rate_limit_max_keys": v.positive_count,
        "trusted_proxies": v.cidrs,
        "forwarded": v.forwarded_mode,
        "tls": SERVER_TLS,
        "metrics": v.boolean,
        "metrics_path": v.url_path,
        "metrics_buckets": v.buckets,
        "log_format": v.log_format,
        "access_log": v.text,
    }
)
HEALTH = Table(
    {
        "path": v.url_path,
        "method": v.health_method,
        "interval": v.positive_duration,
        "timeout": v.positive_duration,
        "rise": v.positive_count,
        "fall": v.positive_count,
        "expect": v.statuses,
    },
    switch=True,
)
PASSIVE = Table({"eject_after": v.count, "eject_for": v.duration})
BREAKER = Table(
    {
        "failures": v.count,
        "window": v.positive_duration,
        "open_for": v.positive_duration,
        "half_open": v.positive_count,
        "successes": v.positive_count,
    }
)
RETRY = Table({"attempts": v.count, "budget": v.ratio, "replay_limit": v.size})
POOL = Table(
    {
        "max_connections": v.positive_count,
        "idle_timeout": v.positive_duration,
        "timeout": v.positive_duration,
    }
)
TIMEOUTS = Table({"connect": v.positive_duration, "read": v.positive_duration})
TLS = Table({"verify": v.boolean, "ca": v.text, "cert": v.text, "key": v.text})
GROUP = Table(
    {
        "servers": v.servers,
        "strategy": v.strategy,
        "health": HEALTH,
        "passive": PASSIVE,
        "breaker": BREAKER,
        "retry": RETRY,
        "pool": POOL,
        "timeouts": TIMEOUTS,
        "tls": TLS,
        "preserve_host": v.boolean,
    }
)
MATCH = Table(
    {
        "host": v.host_patterns,
        "path": v.url_path,
        "path_prefix": v.url_path,
        "path_regex": v.regex,
        "methods": v.methods,
        "headers": v.header_table,
    }
)
REWRITE = Table(
    {
        "strip_prefix": v.url_path,
        "add_prefix": v.url_path,
        "regex": v.regex,
        "replacement": v.any_text,
        "paths": v.path_table,
    }
)
CORS = Table(
    {
        "allow_origins": v.origins,
        "allow_methods": v.methods,
        "allow_headers": v.header_names,
        "expose_headers": v.header_names,
        "allow_credentials": v.boolean,
        "max_age": v.count,
    }
)
RESPOND = Table({"status": v.status, "body": v.any_text, "content_type": v.text})
AUTH = Table(
    {
        "api_keys_file": v.text,
        "api_keys_env": v.text,
        "header": v.header_name,
        "forward_key": v.boolean,
    }
)
LLM = Table({"api": v.llm_api, "models": v.model_names, "include_usage": v.include_usage})
ROUTE = Table(
    {
        "upstream": v.text,
        "respond": RESPOND,
        "priority": v.integer,
        "match": MATCH,
        "rewrite": REWRITE,
        "headers": HEADERS,
        "cors": CORS,
        "timeouts": Table({"connect": v.positive_duration, "read": v.positive_duration}),
        "max_body_size": v.size,
        "body_transform": v.import_ref,
        "body_transform_limit": v.positive_size,
        "rate_limit": v.rate_limits,
        "max_inflight": v.positive_count,
        "allow": v.cidrs,
        "deny": v.cidrs,
        "auth": AUTH,
        "handler": v.handler,
        "llm": LLM,
    }
)
FILE = Table({"server": SERVER, "upstreams": Named(GROUP), "routes": Named(ROUTE)})

ENV_PREFIX = "TRIOPROXY_"
#: Environment variable → key path, for every scalar of ``[server]`` and the admin listener.
SERVER_ENV: Mapping[str, Path_] = {
    **{f"{ENV_PREFIX}{key.upper()}": ("server", key) for key in SERVER.scalars()},
    f"{ENV_PREFIX}ADMIN_HOST": ("server", "admin", "host"),
    f"{ENV_PREFIX}ADMIN_PORT": ("server", "admin", "port"),
}
ENV_CONFIG = f"{ENV_PREFIX}CONFIG"
ENV_UPSTREAM = f"{ENV_PREFIX}UPSTREAM"
DEFAULT = "default"


# --- where a value came from ---------------------------------------------------------


@attrs.frozen
class Value:
    """A raw value and its origin.

    ``source`` is the file path as given, ``environment TRIOPROXY_X``,
    ``.env TRIOPROXY_X`` or ``--flag``; ``path`` the dotted key path inside a
    file (None for the others); ``base`` the directory a relative file name
    in the value is taken from.
    """

    raw: Any
    source: str
    path: str | None = None
    base: Path = Path()

    def where(self, at: str = "") -> str:
        return self.source if self.path is None else f"{self.source}: {self.path}{at}"


@attrs.frozen
class CliValue:
    """One command line flag as given: ``path`` below ``[server]``'s root, or, with
    ``every_group``, below each ``[upstreams.NAME]``."""

    flag: str
    path: Path_
    raw: Any
    every_group: bool = False


@attrs.frozen(kw_only=True)
class ConfigSources:
    """Everything the configuration is read from; :func:`load_config` of the same
    sources again (on reload) re-reads the file and ``.env``."""

    #: ``--config``: wins over ``TRIOPROXY_CONFIG``.
    config_file: str | None = None
    #: ``--env-file``: must exist; else ``./.env`` is read if it exists.
    env_file: str | None = None
    environ: Mapping[str, str] = attrs.field(factory=dict)
    #: Relative paths given on the command line and in the environment start here.
    cwd: str = "."
    cli: tuple[CliValue, ...] = ()
    #: ``--watch``: reload on file change.
    watch: bool = False
    #: The built-in demo upstreams once started (``--demo``), kept on reload.
    demo_urls: tuple[str, ...] = ()


def _dotted(path: Path_) -> str:
    return ".".join(part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else f'"{part}"' for part in path)


# --- reading the layers -------------------------------------------------------------


class _Problems:
    """Error lines in the order found, each once (a flag that every group reads
    would otherwise be reported once per group)."""

    def __init__(self) -> None:
        self.lines: dict[str, None] = {}

    def add(self, line: str) -> None:
        self.lines.setdefault(line, None)

    def invalid(self, value: Value, exc: v.Invalid) -> None:
        for at, reason in exc.problems:
            self.add(f"{value.where(at)}: {reason}")


def _read_file(
    name: str, named_by: str, cwd: Path, problems: _Problems
) -> tuple[dict[str, Any] | None, Path]:
    """The TOML document ``name`` (relative to ``cwd``), or None if it cannot be
    read, and its directory."""
    path = cwd / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.add(f"{named_by}: cannot read {v.show(name)}: {exc.strerror or exc}")
        return None, path.parent
    try:
        return tomllib.loads(data.decode("utf-8")), path.parent
    except UnicodeDecodeError:
        problems.add(f"{name}: not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", message)
        if match:
            message = f"{match[2]}: {match[1][:1].lower()}{match[1][1:]}"
        problems.add(f"{name}: {message}")
    return None, path.parent


def _walk(
    doc: Mapping[str, Any],
    table: Table,
    prefix: Path_,
    make: Callable[[Path_, Any], Value],
    out: dict[Path_, Value],
    problems: _Problems,
) -> None:
    """Flatten a TOML table into ``out`` by its schema; unknown keys are problems."""
    for key, raw in doc.items():
        path = (*prefix, key)
        field = table.fields.get(key)
        value = make(path, raw)
        if field is None:
            problems.add(f"{value.where()}: unknown key{v.did_you_mean(key, list(table.fields))}")
        elif isinstance(field, Named):
            if not isinstance(raw, dict):
                problems.add(f"{value.where()}: must be a table of named tables, got {v.show(raw)}")
                continue
            out[path] = value
            for name, item in raw.items():
                item_path = (*path, name)
                if not isinstance(item, dict):
                    problems.add(
                        f"{make(item_path, item).where()}: must be a table, got {v.show(item)}"
                    )
                    continue
                out[item_path] = make(item_path, item)
                _walk(item, field.table, item_path, make, out, problems)
        elif isinstance(field, Table):
            if isinstance(raw, dict):
                out[path] = value
                _walk(raw, field, path, make, out, problems)
            elif field.switch and isinstance(raw, bool):
                out[path] = value
            else:
                expected = "a table or false" if field.switch else "a table"
                problems.add(f"{value.where()}: must be {expected}, got {v.show(raw)}")
        else:
            out[path] = value


def _file_layer(
    doc: Mapping[str, Any], name: str, base: Path, problems: _Problems
) -> dict[Path_, Value]:
    out: dict[Path_, Value] = {}

    def make(path: Path_, raw: Any) -> Value:
        return Value(raw, name, _dotted(path), base)

    _walk(doc, FILE, (), make, out, problems)
    return out


def _env_layer(env: Mapping[str, str | None], label: str, base: Path) -> dict[Path_, Value]:
    out: dict[Path_, Value] = {}
    for name, raw in env.items():
        if not raw or not name.startswith(ENV_PREFIX):
            continue
        source = f"{label} {name}"
        if name in SERVER_ENV:
            out[SERVER_ENV[name]] = Value(raw, source, base=base)
        elif name == ENV_UPSTREAM:
            servers = v.server_list_text(raw)
            out[("upstreams", DEFAULT, "servers")] = Value(servers, source, base=base)
    return out


def _read_env_file(
    name: str, named_by: str, cwd: Path, problems: _Problems
) -> dict[str, str | None]:
    try:
        with open(cwd / name, encoding="utf-8") as stream:
            return dotenv.dotenv_values(stream=stream)
    except OSError as exc:
        problems.add(f"{named_by}: cannot read {v.show(name)}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        problems.add(f"{name}: not UTF-8 text")
    return {}


# --- building the model ---------------------------------------------------------------


_MISSING: Any = object()


class _Builder:
    """Reads the merged layers by key path and converts, keeping every problem."""

    def __init__(
        self,
        merged: Mapping[Path_, Value],
        every_group: Mapping[Path_, Value],
        problems: _Problems,
        environ: Mapping[str, str | None] | None = None,
    ) -> None:
        self.merged = merged
        self.every_group = every_group
        self.problems = problems
        #: .env under the environment, for values the config names (``api_keys_env``).
        self.environ = environ or {}

    def get(self, path: Path_) -> Value | None:
        if len(path) > 2 and path[0] == "upstreams" and path[2:] in self.every_group:
            return self.every_group[path[2:]]
        return self.merged.get(path)

    def convert(self, path: Path_, check: v.Convert) -> Any:
        value = self.get(path)
        if value is None:
            return _MISSING
        try:
            return check(value.raw)
        except v.Invalid as exc:
            self.problems.invalid(value, exc)
            return _MISSING

    def fields(
        self, path: Path_, table: Table, rename: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """The table's scalar keys that are given (and valid), by model field name."""
        result: dict[str, Any] = {}
        for key, check in table.scalars().items():
            converted = self.convert((*path, key), check)
            if converted is not _MISSING:
                result[(rename or {}).get(key, key)] = converted
        return result

    def fail(self, path: Path_, reason: str, fallback: Value | None = None) -> None:
        value = self.get(path) or fallback
        assert value is not None
        self.problems.add(f"{value.where()}: {reason}")


def _server(b: _Builder) -> ServerSettings:
    fields = b.fields(("server",), SERVER)
    admin = None
    if b.get(("server", "admin")) is not None or b.get(("server", "admin", "port")) is not None:
        admin = AdminSettings(**b.fields(("server", "admin"), ADMIN))
        port = fields.get("port", ServerSettings().port)
        if admin.port == port and port != 0:
            b.fail(
                ("server", "admin", "port"),
                f"same port as the proxy's ({port})",
                b.get(("server", "admin")),
            )
    demo = b.get(("server", "demo"))
    return ServerSettings(
        **fields,
        admin=admin,
        headers=HeaderRules(**b.fields(("server", "headers"), HEADERS)),
        demo=bool(demo and demo.raw),
        redis=_optional(b, ("server", "redis"), REDIS, RedisSettings),
        tls=_server_tls(b),
    )


def _file_at(value: Value, name: str, at: str, b: _Builder) -> str | None:
    """``name`` (given in ``value``, at ``at`` below its path) resolved against its
    source's directory; None, with the problem noted, if it cannot be read."""
    full = value.base / os.path.expanduser(name)
    try:
        with open(full, "rb"):
            pass
    except OSError as exc:
        b.problems.add(f"{value.where(at)}: cannot read {v.show(name)}: {exc.strerror or exc}")
        return None
    return str(full)


def _server_tls(b: _Builder) -> ServerTLS | None:
    """``[server] tls`` (or ``--certfile``/``--keyfile``), its files read and each
    certificate checked against its key, so that ``--check-config`` finds a bad one."""
    from trioproxy.edge.tls import CertificateError, server_context

    path = ("server", "tls")
    given = [b.get(p) for p in (path, (*path, "cert"), (*path, "key"))]
    anchor = next((value for value in given if value is not None), None)
    if anchor is None:
        return None
    fields = b.fields(path, SERVER_TLS)
    if b.get((*path, "cert")) is None or b.get((*path, "key")) is None:
        b.fail(path, 'needs both "cert" and "key" (--certfile and --keyfile)', anchor)
        return None
    cert = _readable_file(b, (*path, "cert"))
    key = _readable_file(b, (*path, "key"))
    sni: list[SniCertificate] = []
    sni_value = b.get((*path, "sni"))
    for index, entry in enumerate(fields.get("sni", ())):
        assert sni_value is not None
        entry_cert = _file_at(sni_value, entry.cert, f"[{index}].cert", b)
        entry_key = _file_at(sni_value, entry.key, f"[{index}].key", b)
        if entry_cert is None or entry_key is None:
            continue
        try:
            server_context(entry_cert, entry_key)
        except CertificateError as exc:
            b.problems.add(f"{sni_value.where(f'[{index}].cert')}: {v.show(entry.cert)}: {exc}")
            continue
        sni.append(attrs.evolve(entry, cert=entry_cert, key=entry_key))
    if cert is None or key is None:
        return None
    try:
        server_context(cert, key)
    except CertificateError as exc:
        name = b.get((*path, "cert"))
        assert name is not None
        b.fail((*path, "cert"), f"{v.show(name.raw)}: {exc}")
        return None
    return ServerTLS(cert=cert, key=key, sni=tuple(sni), redirect_http=fields.get("redirect_http"))


def _health(b: _Builder, path: Path_) -> HealthSettings:
    switch = b.get(path)
    fields = b.fields(path, HEALTH)
    if "method" in fields:
        fields["method"] = fields["method"].encode("ascii")
    return HealthSettings(enabled=not (switch is not None and switch.raw is False), **fields)


_BREAKER_FIELDS = {
    "failures": "failure_threshold",
    "half_open": "half_open_max",
    "successes": "success_threshold",
}


def _readable_file(b: _Builder, path: Path_) -> str | None:
    """A file name from the config, resolved against its source's directory; must be readable."""
    name = b.convert(path, v.text)
    if name is _MISSING:
        return None
    value = b.get(path)
    assert value is not None
    full = value.base / os.path.expanduser(name)
    try:
        with open(full, "rb"):
            pass
    except OSError as exc:
        b.fail(path, f"cannot read {v.show(name)}: {exc.strerror or exc}")
        return None
    return str(full)


def _group(b: _Builder, name: str, demo: bool) -> UpstreamGroup:
    path = ("upstreams", name)
    fields = b.fields(path, GROUP)
    if not (demo and name == DEFAULT):
        if b.get((*path, "servers")) is None:
            b.fail(path, 'needs "servers", a list of at least one server')
        elif fields.get("servers") == ():  # (a list that failed its check was reported)
            b.fail((*path, "servers"), "must list at least one server")
    tls = b.fields((*path, "tls"), TLS)
    if b.get((*path, "tls", "ca")) is not None:
        tls["ca"] = _readable_file(b, (*path, "tls", "ca"))
    for part in ("cert", "key"):
        if b.get((*path, "tls", part)) is not None:
            tls[part] = _readable_file(b, (*path, "tls", part))
    given = [part for part in ("cert", "key") if b.get((*path, "tls", part)) is not None]
    if len(given) == 1:
        b.fail((*path, "tls", given[0]), 'a client certificate needs both "cert" and "key"')
    elif tls.get("cert") and tls.get("key"):
        from trioproxy.edge.tls import CertificateError, load_pair

        try:
            load_pair(ssl.create_default_context(), tls["cert"], tls["key"])
        except CertificateError as exc:
            shown = v.show(b.get((*path, "tls", "cert")).raw)  # type: ignore[union-attr]
            b.fail((*path, "tls", "cert"), f"{shown}: {exc}")
    return UpstreamGroup(
        name=name,
        servers=fields.pop("servers", ()),
        **fields,
        health=_health(b, (*path, "health")),
        passive=PassiveSettings(**b.fields((*path, "passive"), PASSIVE)),
        breaker=BreakerSettings(**b.fields((*path, "breaker"), BREAKER, _BREAKER_FIELDS)),
        retry=RetrySettings(**b.fields((*path, "retry"), RETRY)),
        pool=PoolSettings(**b.fields((*path, "pool"), POOL)),
        timeouts=Timeouts(**b.fields((*path, "timeouts"), TIMEOUTS)),
        tls=UpstreamTLS(**tls),
    )


def _optional(b: _Builder, path: Path_, table: Table, cls: Callable[..., Any]) -> Any:
    if b.get(path) is None:
        return None
    return cls(**b.fields(path, table))


def _route(b: _Builder, name: str, groups: Sequence[str]) -> RouteSettings:
    path = ("routes", name)
    fields = b.fields(path, ROUTE)
    respond = _optional(b, (*path, "respond"), RESPOND, RespondSpec)
    rewrite = _optional(b, (*path, "rewrite"), REWRITE, RewriteSpec)
    cors = _optional(b, (*path, "cors"), CORS, CorsSpec)
    llm = _optional(b, (*path, "llm"), LLM, LlmSpec)
    has_upstream = b.get((*path, "upstream")) is not None
    handler = fields.get("handler")
    if handler is not None:
        # metrics and ping need no upstream; health tells of the one it names.
        if b.get((*path, "respond")) is not None:
            b.fail((*path, "handler"), 'cannot be combined with "respond"')
        if handler == "health" and not has_upstream:
            b.fail((*path, "handler"), '"health" needs "upstream", the group it tells of')
    elif has_upstream == (b.get((*path, "respond")) is not None):
        b.fail(path, 'needs exactly one of "upstream" and "respond"')
    upstream = fields.get("upstream")
    if upstream is not None and upstream not in groups:
        defined = ", ".join(groups) or "none"
        b.fail(
            (*path, "upstream"),
            f"no upstream group {v.show(upstream)}{v.did_you_mean(upstream, groups)}"
            f" (defined: {defined})",
        )
    if rewrite is not None and (rewrite.regex is None) != (rewrite.replacement is None):
        b.fail((*path, "rewrite"), '"regex" and "replacement" go together')
    if cors is not None and cors.allow_credentials and "*" in cors.allow_origins:
        b.fail(
            (*path, "cors", "allow_credentials"),
            'cannot be true with allow_origins = ["*"] (browsers refuse it)',
        )
    return RouteSettings(
        name=name,
        **fields,
        auth=_auth(b, (*path, "auth")),
        respond=respond,
        rewrite=rewrite,
        cors=cors,
        llm=llm,
        match=MatchSpec(**b.fields((*path, "match"), MATCH)),
        headers=HeaderRules(**b.fields((*path, "headers"), HEADERS)),
        timeouts=RouteTimeouts(**b.fields((*path, "timeouts"), TIMEOUTS)),
    )


def _auth(b: _Builder, path: Path_) -> AuthSpec | None:
    """``auth = {...}``, its keys read now (so a reload reads them again)."""
    if b.get(path) is None:
        return None
    fields = b.fields(path, AUTH)
    sources = [key for key in ("api_keys_file", "api_keys_env") if b.get((*path, key))]
    if len(sources) != 1:
        b.fail(path, 'needs exactly one of "api_keys_file" and "api_keys_env"')
        return AuthSpec(**fields)
    keys: list[str] = []
    if "api_keys_file" in fields:
        name = _readable_file(b, (*path, "api_keys_file"))
        if name is None:
            return AuthSpec(**fields)
        try:
            with open(name, encoding="utf-8") as stream:
                lines = stream.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            b.fail(
                (*path, "api_keys_file"), f"cannot read {v.show(fields['api_keys_file'])}: {exc}"
            )
            return AuthSpec(**fields)
        # One key per line; blank lines and "#" comments are skipped.
        keys = [
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
        where = f"{v.show(fields['api_keys_file'])} holds"
        fields["api_keys_file"] = name  # resolved, as the TLS files are (--watch stats it)
    elif "api_keys_env" in fields:
        variable = fields["api_keys_env"]
        raw = b.environ.get(variable)
        if not raw:
            b.fail((*path, "api_keys_env"), f"environment variable {v.show(variable)} is not set")
            return AuthSpec(**fields)
        keys = [part.strip() for part in raw.split(",") if part.strip()]
        where = f"environment variable {v.show(variable)} holds"
    else:
        return AuthSpec(**fields)
    if not keys:
        b.fail(path, f"{where} no key")
    elif any(not key.isprintable() or " " in key or not key.isascii() for key in keys):
        # (the key itself is not shown: it may be a secret)
        b.fail(path, f"{where} a key with spaces, control or non-ASCII characters")
    return AuthSpec(**fields, keys=tuple(keys))


def _match_key(route: RouteSettings) -> tuple[object, ...]:
    """Routes with equal keys match the same requests at the same priority."""
    match = route.match
    return (
        route.priority,
        tuple(sorted(match.host)),
        match.path,
        match.path_prefix,
        match.path_regex,
        tuple(sorted(match.methods)),
        tuple(sorted(match.headers)),
    )


def _names(merged: Mapping[Path_, Value], section: str) -> list[str]:
    return [path[1] for path in merged if len(path) == 2 and path[0] == section]


def load_config(sources: ConfigSources) -> Config:
    """The configuration the sources say, validated as a whole.

    Raises:
        ConfigError: with one line per problem found (``errors``), each naming
            its source, key path and value.
    """
    problems = _Problems()
    cwd = Path(sources.cwd)

    # .env, then the environment over it.
    if sources.env_file is not None:
        dotenv_vars = _read_env_file(sources.env_file, "--env-file", cwd, problems)
        dotenv_label = sources.env_file
    elif (cwd / ".env").is_file():
        dotenv_vars = _read_env_file(".env", ".env", cwd, problems)
        dotenv_label = ".env"
    else:
        dotenv_vars, dotenv_label = {}, ".env"
    environ: dict[str, str | None] = {**dotenv_vars, **sources.environ}

    # The file.
    file_layer: dict[Path_, Value] = {}
    file_name = sources.config_file
    named_by = "--config"
    if file_name is None and environ.get(ENV_CONFIG):
        file_name = environ[ENV_CONFIG]
        named_by = (
            f"{'environment' if ENV_CONFIG in sources.environ else dotenv_label} {ENV_CONFIG}"
        )
    file_read = False
    if file_name is not None:
        doc, base = _read_file(file_name, named_by, cwd, problems)
        file_read = doc is not None
        doc = doc or {}
        file_layer = _file_layer(doc, file_name, base, problems)
    elif sources.watch:
        problems.add(f"--watch: needs a config file (--config FILE or {ENV_CONFIG})")

    # Merge: file < .env < environment < command line.
    merged = dict(file_layer)
    merged.update(_env_layer(dotenv_vars, dotenv_label, cwd))
    merged.update(_env_layer(sources.environ, "environment", cwd))
    every_group: dict[Path_, Value] = {}
    for value in sources.cli:
        target = every_group if value.every_group else merged
        target[value.path] = Value(value.raw, value.flag, base=cwd)

    demo = ("server", "demo") in merged
    file_routes = _names(file_layer, "routes")
    servers = merged.get(("upstreams", DEFAULT, "servers"))
    if file_routes and ((servers is not None and servers.path is None) or demo):
        flag = servers.source if servers is not None and servers.path is None else "--demo"
        listed = ", ".join(f"routes.{name}" for name in file_routes)
        problems.add(
            f"{flag}: cannot be combined with the routes of {file_name} ({listed}); "
            "give the servers in an [upstreams.NAME] table there"
        )

    b = _Builder(merged, every_group, problems, environ)
    server = _server(b)
    group_names = _names(merged, "upstreams")
    if DEFAULT not in group_names and (servers is not None or demo):
        group_names.append(DEFAULT)
    groups = {name: _group(b, name, demo) for name in group_names}
    routes = tuple(_route(b, name, group_names) for name in file_routes)
    if not routes and DEFAULT in groups:
        routes = (RouteSettings(name=DEFAULT, upstream=DEFAULT),)
    if not routes and file_name is None:
        problems.add(
            "trioproxy: no upstream: give --upstream URL (repeatable), --demo, "
            f"{ENV_UPSTREAM}, or a --config file with [routes.NAME] or [upstreams.default]"
        )
    elif not routes and file_read:
        problems.add(
            f"{file_name}: no routes: define [routes.NAME] or [upstreams.default], "
            "or give --upstream URL"
        )
    for route in routes:
        limits = b.get(("routes", route.name, "rate_limit"))
        for index, spec in enumerate(route.rate_limit):
            if limits is not None and spec.store == "redis" and server.redis is None:
                problems.add(
                    f"{limits.where(f'[{index}].store')}: "
                    '"redis" needs [server] redis = { url = "redis://..." }'
                )
    seen: dict[tuple[object, ...], str] = {}
    for route in routes:
        first = seen.setdefault(_match_key(route), route.name)
        if first != route.name:
            b.fail(
                ("routes", route.name),
                f"same match and priority as routes.{first}, so it would never be used",
            )
    if problems.lines:
        raise ConfigError(*problems.lines)
    return Config(
        server=server,
        upstreams=groups,
        routes=routes,
        source=None if file_name is None else str(cwd / file_name),
        watch=sources.watch,
    )
