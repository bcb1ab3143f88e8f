"""What a route changes in the messages it passes: path, header fields, body (sans-I/O).

Each rule is compiled once, when the config is loaded, into an object whose
``apply`` is cheap; compiling raises :class:`~trioproxy.config.errors.ConfigError`
listing every problem found, one per line, each starting with its key path.

Path rewrite (``rewrite = {...}``)
    Works on the path only: the request-target up to the first ``?``, as the
    client's raw bytes. Whatever follows (``?`` and the query, even an empty
    one) is kept byte for byte. The rules, in this order:

    1. ``paths``: an exact mapping. If the path is listed, it is replaced and
       nothing else applies.
    2. ``regex`` + ``replacement``: Python's ``re.sub`` over the path (every
       non-overlapping match, ``\\1`` / ``\\g<name>`` backreferences); anchor it
       with ``^...$`` to rewrite the whole path. It cannot be combined with
       ``strip_prefix`` / ``add_prefix``.
    3. ``strip_prefix`` then ``add_prefix``. The prefix is stripped on a
       segment boundary only (``/users`` from ``/users`` and ``/users/7``,
       never from ``/usersX``), so the pair replaces one leading segment run
       with another: ``/users`` → ``/api``, ``/users/`` → ``/api/``,
       ``/users/7`` → ``/api/7``. Alone, strip leaves ``/`` rather than an
       empty path and add prefixes the whole path (``/`` → ``/api/``). A
       trailing ``/`` on either prefix is ignored.

    When a prefix was stripped, its value is returned for
    ``X-Forwarded-Prefix``, the de-facto field (Spring, Traefik) an upstream
    uses to build links that go back through the proxy. A regex result that
    does not start with ``/`` gets one: an origin-form target must
    (RFC 9112 §3.2.1). A target that is not origin-form (``*``) is left alone.

Header rules (``headers = {...}``, ``[server] headers``)
    Per direction, ``*_remove`` drops every line of a name, ``*_set`` replaces
    every line of a name with one (where the first was, else at the end) and
    ``*_add`` appends a line. Within one table removes apply first, then sets,
    then adds. Server-wide rules apply first and the route's after them
    (:meth:`HeaderRuleSet.then`), so a route can override or remove what the
    server sets. Request rules edit the fields that go upstream (after the
    proxy's own ``X-Forwarded-*``), response rules the ones that go to the
    client.

    Values are templates: ``{request_id}``, ``{client_ip}``, ``{host}`` (the
    client's ``Host``), ``{method}``, ``{path}`` (the client's path, without
    the query), ``{route}``, ``{upstream}`` (group name) and, for responses
    only, ``{server}`` (the upstream URL that answered) and ``{process_time}``
    (seconds from request head to response head, 3 decimals). ``{{`` and
    ``}}`` are literal braces. Names must be tokens and literal text must be a
    valid field value (RFC 9110 §5.1, §5.5). Expanded values have every
    control character but HTAB deleted, so nothing the client sent (``{host}``,
    ``{path}``) can end the line and inject a field.

    Fields that frame the message or manage the connection (``Content-Length``
    and the hop-by-hop fields of RFC 9110 §7.6.1) belong to the proxy and
    cannot be edited; a request's one ``Host`` (RFC 9112 §3.2) may be set,
    not removed or added.

    :meth:`HeaderTransform.apply` edits a list of fields. On the proxy path the
    rules are applied instead by the pass that builds the fields it sends
    (``trioproxy.http.headers``), from a :class:`FieldEditor` made once per
    route and direction: the values that are the same on every exchange of the
    route (``{route}``, ``{upstream}``) are written in then
    (:meth:`HeaderTransform.bind`), so only the others are expanded per message.

Body transform (``body_transform = "package.module:function"``)
    A function ``(body: bytes, content_type: str) -> bytes``, plain or async,
    imported when the config is loaded. The engine buffers the body and calls
    it through :func:`run_body_transform`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TypeAlias

import attrs

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import HeaderPairs, HeaderRules, RewriteSpec
from trioproxy.errors import ProxyError
from trioproxy.http.headers import HOP_BY_HOP, FieldEdit, FieldRules
from trioproxy.http.protocol import Headers
from trioproxy.http.syntax import field_value_problem, is_token, key, path_problem, quoted
from trioproxy.references import BadReference, import_reference

__all__ = [
    "REQUEST_PLACEHOLDERS",
    "RESPONSE_PLACEHOLDERS",
    "BodyTransform",
    "BodyTransformError",
    "FieldEditor",
    "HeaderRuleSet",
    "HeaderTransform",
    "PathRewrite",
    "TemplateValues",
    "compile_header_rules",
    "compile_rewrite",
    "format_process_time",
    "load_body_transform",
    "run_body_transform",
]


# --- path rewrite ------------------------------------------------------------------


@attrs.frozen(slots=True)
class PathRewrite:
    """A compiled ``rewrite`` table; see the module docstring for the rules."""

    paths: Mapping[bytes, bytes]
    regex: re.Pattern[bytes] | None
    replacement: bytes
    #: Without a trailing "/"; b"" when not stripping.
    strip_prefix: bytes
    #: Without a trailing "/"; b"" when not adding.
    add_prefix: bytes

    def apply(self, target: bytes) -> tuple[bytes, bytes | None]:
        """Rewrite the path of ``target``.

        Args:
            target: the client's request-target, raw.

        Returns:
            The target to send upstream (query kept byte for byte) and the
            stripped prefix for ``X-Forwarded-Prefix``, or ``None`` when no
            prefix was stripped.
        """
        if not self.paths and self.regex is None:
            # The prefix rules alone (on every request of the route): a prefix
            # starts with "/" and holds no "?", so it starts the target exactly
            # when it starts the path, and the query needs no split first.
            strip = self.strip_prefix
            add = self.add_prefix
            if strip and target.startswith(strip):
                rest = target[len(strip) :]
                if not rest:
                    return add or b"/", strip
                first = rest[0]
                if first == 0x2F:  # "/"
                    return add + rest, strip
                if first == 0x3F:  # "?": the path was the prefix
                    return (add or b"/") + rest, strip
            if target[:1] != b"/":
                return target, None  # not origin-form ("*")
            return (add + target if add else target), None
        query = target.find(b"?")
        if query < 0:
            path, rest = target, b""
        else:
            path, rest = target[:query], target[query:]
        if not path.startswith(b"/"):
            return target, None
        if self.paths:
            mapped = self.paths.get(path)
            if mapped is not None:
                return mapped + rest, None
        if self.regex is not None:
            path = self.regex.sub(self.replacement, path)
            if not path.startswith(b"/"):
                path = b"/" + path
            return path + rest, None
        forwarded_prefix = None
        strip = self.strip_prefix
        if strip and path.startswith(strip):
            tail = path[len(strip) :]
            if not tail or tail.startswith(b"/"):
                path, forwarded_prefix = tail, strip
        if self.add_prefix:
            path = self.add_prefix + path
        return (path or b"/") + rest, forwarded_prefix


def _prefix(value: str | None, where: str, problems: list[str]) -> bytes:
    if value is None:
        return b""
    problem = path_problem(value)
    if problem is not None:
        problems.append(f"{where}: {problem}")
        return b""
    if value.rstrip("/") == "":
        problems.append(f'{where}: "/" changes no path; leave it out')
    return value.rstrip("/").encode()


def compile_rewrite(spec: RewriteSpec, key_path: str) -> PathRewrite | None:
    """Compile a ``rewrite`` table.

    Args:
        spec: the table.
        key_path: its key path, e.g. ``routes.users.rewrite``.

    Returns:
        The rewrite, or ``None`` when the table rewrites nothing.

    Raises:
        ConfigError: listing every problem, one per line.
    """
    problems: list[str] = []
    paths: dict[bytes, bytes] = {}
    for source, dest in spec.paths:
        where = f"{key_path}.paths.{key(source)}"
        problem = path_problem(source) or path_problem(dest)
        if problem is not None:
            problems.append(f"{where}: {problem}")
        else:
            paths[source.encode()] = dest.encode()

    regex: re.Pattern[bytes] | None = None
    replacement = b""
    if spec.regex is not None:
        try:
            regex = re.compile(spec.regex.encode())
        except re.error as exc:
            problems.append(
                f"{key_path}.regex: not a valid regular expression: {exc}, got {quoted(spec.regex)}"
            )
        if spec.replacement is None:
            problems.append(f"{key_path}: regex needs a replacement")
        if spec.strip_prefix is not None or spec.add_prefix is not None:
            problems.append(
                f"{key_path}: regex cannot be combined with strip_prefix or add_prefix; "
                "write the whole rewrite as the regex"
            )
    if spec.replacement is not None:
        replacement = spec.replacement.encode()
        if spec.regex is None:
            problems.append(f"{key_path}: replacement needs a regex")
        elif re.search(r"[^\x21-\x7e]|[?#]", spec.replacement):
            problems.append(
                f"{key_path}.replacement: only the path is rewritten, and it is printable "
                f"ASCII without '?' or '#', got {quoted(spec.replacement)}"
            )
        elif regex is not None:
            try:
                regex.sub(replacement, b"")  # parses the template against the groups
            except (re.error, IndexError) as exc:
                problems.append(f"{key_path}.replacement: {exc}, got {quoted(spec.replacement)}")

    strip = _prefix(spec.strip_prefix, f"{key_path}.strip_prefix", problems)
    add = _prefix(spec.add_prefix, f"{key_path}.add_prefix", problems)
    if problems:
        raise ConfigError("\n".join(problems))
    if not (paths or regex or strip or add):
        return None
    return PathRewrite(
        paths=paths, regex=regex, replacement=replacement, strip_prefix=strip, add_prefix=add
    )


# --- header templates --------------------------------------------------------------

REQUEST_PLACEHOLDERS: Final = frozenset(
    {"request_id", "client_ip", "host", "method", "path", "route", "upstream"}
)
RESPONSE_PLACEHOLDERS: Final = REQUEST_PLACEHOLDERS | {"server", "process_time"}
_KNOWN_LONE: Final = frozenset({"request_id", "client_ip", "server", "process_time"})


@attrs.define(slots=True)
class TemplateValues:
    """One exchange's values for header templates, as the bytes to write.

    Only the names a transform's ``placeholders`` lists need filling; build
    it once per exchange and set ``server`` / ``process_time`` when the
    response head arrives.
    """

    request_id: bytes = b""
    client_ip: bytes = b""
    host: bytes = b""
    method: bytes = b""
    path: bytes = b""
    route: bytes = b""
    upstream: bytes = b""
    server: bytes = b""
    process_time: bytes = b""


def format_process_time(seconds: float) -> bytes:
    """``{process_time}``: seconds with 3 decimals, e.g. ``b"0.012"``."""
    return b"%.3f" % seconds


# A compiled value: plain bytes, or literal parts (bytes) and placeholder
# names (str) to join.
_Template: TypeAlias = tuple[bytes | str, ...]
_Value: TypeAlias = bytes | _Template

_TEMPLATE_TOKEN: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
# RFC 9110 §5.5: CTLs other than HTAB never reach the wire from a template.
_UNSAFE: Final = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"


def _compile_template(
    text: str, allowed: frozenset[str], where: str, problems: list[str]
) -> _Value:
    parts: list[bytes | str] = []
    literal: list[str] = []
    position = 0
    for token in _TEMPLATE_TOKEN.finditer(text):
        literal.append(text[position : token.start()])
        position = token.end()
        found = token.group()
        if found in ("{{", "}}"):
            literal.append(found[0])
        elif found in ("{", "}"):
            problems.append(
                f'{where}: unmatched "{found}" at position {token.start()}; '
                f'write "{found}{found}" for a literal brace'
            )
        else:
            name = token.group(1)
            if name in allowed:
                parts.append("".join(literal).encode())
                literal.clear()
                parts.append(name)
            elif name in RESPONSE_PLACEHOLDERS:
                problems.append(f"{where}: {found} is known only in response rules")
            else:
                problems.append(f"{where}: unknown placeholder {found}")
    literal.append(text[position:])
    parts.append("".join(literal).encode())
    problem = field_value_problem(text)
    if problem is not None:
        problems.append(f"{where}: {problem}")
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return tuple(part for part in parts if part != b"")


def _expand(value: _Value, values: TemplateValues | None) -> bytes:
    if isinstance(value, bytes):
        return value
    if values is None:
        raise ValueError("these header rules use placeholders: pass TemplateValues")
    out = []
    for part in value:
        if isinstance(part, bytes):
            out.append(part)
        else:
            dynamic: bytes = getattr(values, part)
            out.append(dynamic.translate(None, _UNSAFE))
    return b"".join(out)


def _placeholders(values: list[_Value]) -> frozenset[str]:
    return frozenset(
        part for value in values if type(value) is tuple for part in value if type(part) is str
    )


def _bind(value: _Value, constants: Mapping[str, bytes]) -> _Value:
    """``value`` with the placeholders of ``constants`` written in, as ``_expand``
    would write them."""
    if isinstance(value, bytes):
        return value
    parts: list[bytes | str] = []
    for part in value:
        if isinstance(part, str) and part in constants:
            part = constants[part].translate(None, _UNSAFE)
        if isinstance(part, bytes) and parts and isinstance(parts[-1], bytes):
            parts[-1] += part
        else:
            parts.append(part)
    parts = [part for part in parts if part != b""]
    if not parts:
        return b""
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return tuple(parts)


@attrs.frozen(slots=True)
class HeaderTransform:
    """One direction's compiled header rules.

    ``placeholders`` names the :class:`TemplateValues` fields it reads (empty:
    pass no values). A transform is false when it changes nothing.
    """

    #: Every name removed or set.
    drop: frozenset[bytes] = frozenset()
    #: name -> value, in the order they are appended when absent.
    sets: Mapping[bytes, _Value] = attrs.field(factory=dict)
    add: tuple[tuple[bytes, _Value], ...] = ()
    placeholders: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.drop or self.add)

    def apply(self, headers: Headers, values: TemplateValues | None = None) -> Headers:
        """Return ``headers`` edited by the rules (a new list; ``headers`` itself if no rules).

        Args:
            headers: the fields about to be sent; not modified.
            values: the exchange's template values; needed when
                ``placeholders`` is not empty.
        """
        if not self.drop and not self.add:
            return headers
        drop = self.drop
        sets = self.sets
        out: Headers = []
        placed: set[bytes] = set()
        for field in headers:
            name = field[0]
            if name in drop:
                value = sets.get(name)
                if value is not None and name not in placed:
                    placed.add(name)
                    out.append((name, _expand(value, values)))
                continue
            out.append(field)
        for name, value in sets.items():
            if name not in placed:
                out.append((name, _expand(value, values)))
        for name, value in self.add:
            out.append((name, _expand(value, values)))
        return out

    def bind(self, constants: Mapping[str, bytes]) -> HeaderTransform:
        """The same transform with the placeholders named in ``constants`` written in.

        For the values that are the same on every exchange of a route (its
        ``{route}`` and ``{upstream}``): applied with values that hold the same
        bytes, both transforms give the same fields.
        """
        if not self.placeholders & constants.keys():
            return self
        sets = {name: _bind(value, constants) for name, value in self.sets.items()}
        adds = tuple((name, _bind(value, constants)) for name, value in self.add)
        return HeaderTransform(
            drop=self.drop,
            sets=sets,
            add=adds,
            placeholders=_placeholders([*sets.values(), *(v for _, v in adds)]),
        )

    def then(self, later: HeaderTransform) -> HeaderTransform:
        """The transform that applies ``self`` and then ``later``, in one pass."""
        sets = {name: v for name, v in self.sets.items() if name not in later.drop}
        sets.update(later.sets)
        adds = tuple((name, v) for name, v in self.add if name not in later.drop) + later.add
        return HeaderTransform(
            drop=self.drop | later.drop,
            sets=sets,
            add=adds,
            placeholders=_placeholders([*sets.values(), *(v for _, v in adds)]),
        )


@attrs.frozen(slots=True)
class FieldEditor:
    """One direction's header rules of one route, made into each message's
    :class:`~trioproxy.http.headers.FieldEdit` for the pass that builds its fields.

    ``trioproxy.http.headers`` applies an edit as :meth:`HeaderTransform.apply`
    would on the fields built without it; this makes the edit, expanding only
    the values that need the exchange's :class:`TemplateValues`.
    """

    rules: FieldRules
    #: The set lines' values in order, the fixed ones written in (b"" where
    #: ``later_sets`` fills in); empty when every value is in ``later_sets``.
    sets: Mapping[bytes, bytes]
    #: The set lines whose value is expanded per message; a lone placeholder
    #: is its name (one attribute to read, no join).
    later_sets: tuple[tuple[bytes, str | _Template], ...]
    #: The added lines, when no value needs the exchange.
    fixed_add: tuple[tuple[bytes, bytes], ...] | None
    add: tuple[tuple[bytes, _Value], ...]
    #: The edit of every message, when no value needs the exchange.
    fixed: FieldEdit | None
    placeholders: frozenset[str]
    #: Whether every value that needs the exchange is one lone placeholder (and
    #: every added line is fixed): :meth:`edit_known` then joins nothing.
    lone: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        lone = self.fixed_add is not None and all(
            type(t) is str and t in _KNOWN_LONE for _, t in self.later_sets
        )
        object.__setattr__(self, "lone", lone)

    @classmethod
    def of(cls, transform: HeaderTransform, *, request: bool) -> FieldEditor | None:
        """The editor of ``transform`` (request rules, else response rules); None
        if it changes nothing."""
        if not transform:
            return None
        rules = FieldRules(
            drop=transform.drop, set_names=frozenset(transform.sets), request=request
        )
        sets: dict[bytes, bytes] = {}
        later: list[tuple[bytes, str | _Template]] = []
        for name, value in transform.sets.items():
            if isinstance(value, bytes):
                sets[name] = value
            else:
                sets[name] = b""
                only = value[0]
                later.append((name, only if len(value) == 1 and isinstance(only, str) else value))
        fixed_add = None
        if all(isinstance(v, bytes) for _, v in transform.add):
            fixed_add = tuple((n, _expand(v, None)) for n, v in transform.add)
        fixed = None
        if not later and fixed_add is not None:
            fixed = (rules, sets, fixed_add)
        return cls(
            rules,
            sets if len(later) < len(sets) else {},
            tuple(later),
            fixed_add,
            transform.add,
            fixed,
            transform.placeholders,
        )

    def edit(self, values: TemplateValues | None) -> FieldEdit:
        """This message's edit.

        Args:
            values: the exchange's template values; needed when
                ``placeholders`` is not empty.
        """
        if self.fixed is not None:
            return self.fixed
        if values is None:
            raise ValueError("these header rules use placeholders: pass TemplateValues")
        # Filled in the rules' order: a copy of the fixed values keeps it, and
        # when there are none the later ones come in that order.
        sets = dict(self.sets) if self.sets else {}
        for name, template in self.later_sets:
            if template == "process_time":  # made here as b"%.3f": nothing to remove
                sets[name] = values.process_time
            elif isinstance(template, str):
                value: bytes = getattr(values, template)
                sets[name] = value.translate(None, _UNSAFE)
            else:
                sets[name] = _expand(template, values)
        add = self.fixed_add
        if add is None:
            add = tuple((name, _expand(value, values)) for name, value in self.add)
        return (self.rules, sets, add)

    def edit_known(
        self, request_id: bytes, client_ip: bytes, server: bytes, process_time: bytes
    ) -> FieldEdit:
        """This message's edit when the rules use only these values
        (``request_id``, ``client_ip``, ``server`` and ``process_time``): the same edit as
        :meth:`edit` with a :class:`TemplateValues` holding them, without making one
        (the engine has them at hand where it applies the rules).

        Args:
            process_time: as :func:`format_process_time` writes it.
        """
        if self.fixed is not None:
            return self.fixed
        if not self.lone:
            values = TemplateValues(request_id, client_ip, server=server, process_time=process_time)
            return self.edit(values)
        sets = dict(self.sets) if self.sets else {}
        for name, template in self.later_sets:
            if template == "process_time":  # made as b"%.3f": nothing to remove
                sets[name] = process_time
            elif template == "client_ip":
                sets[name] = client_ip.translate(None, _UNSAFE)
            elif template == "request_id":
                sets[name] = request_id.translate(None, _UNSAFE)
            else:  # "server"
                sets[name] = server.translate(None, _UNSAFE)
        return (self.rules, sets, self.fixed_add)  # type: ignore[return-value]


@attrs.frozen(slots=True)
class HeaderRuleSet:
    """A compiled ``headers`` table: the request and the response transforms."""

    request: HeaderTransform = HeaderTransform()
    response: HeaderTransform = HeaderTransform()

    def bind(self, constants: Mapping[str, bytes]) -> HeaderRuleSet:
        """Both directions bound (:meth:`HeaderTransform.bind`)."""
        return HeaderRuleSet(
            request=self.request.bind(constants), response=self.response.bind(constants)
        )

    def then(self, later: HeaderRuleSet) -> HeaderRuleSet:
        """Server-wide rules ``.then(`` a route's ``)``: the route's apply last."""
        return HeaderRuleSet(
            request=self.request.then(later.request),
            response=self.response.then(later.response),
        )


# Framing (RFC 9112 §6) and connection management (RFC 9110 §7.6.1) are the
# proxy's; editing them would desynchronise the byte stream.
_PROXY_OWNED: Final = HOP_BY_HOP | {b"content-length"}


def _field_name(
    name: str, where: str, problems: list[str], *, request: bool, op: str
) -> bytes | None:
    if not is_token(name):
        problems.append(f"{where}: not a header name, got {quoted(name)}")
        return None
    lowered = name.lower().encode()
    if lowered in _PROXY_OWNED:
        problems.append(f"{where}: {name} is set by the proxy (message framing and connection)")
        return None
    if request and lowered == b"host" and op != "set":
        problems.append(f"{where}: a request has exactly one Host (RFC 9112 §3.2); use request_set")
        return None
    return lowered


def _compile_direction(
    set_pairs: HeaderPairs,
    add_pairs: HeaderPairs,
    remove: tuple[str, ...],
    key_path: str,
    direction: str,
    problems: list[str],
) -> HeaderTransform:
    request = direction == "request"
    allowed = REQUEST_PLACEHOLDERS if request else RESPONSE_PLACEHOLDERS
    drop: set[bytes] = set()
    for name in remove:
        where = f"{key_path}.{direction}_remove"
        lowered = _field_name(name, where, problems, request=request, op="remove")
        if lowered is not None:
            drop.add(lowered)
    sets: dict[bytes, _Value] = {}
    for name, text in set_pairs:
        where = f"{key_path}.{direction}_set.{key(name)}"
        lowered = _field_name(name, where, problems, request=request, op="set")
        if lowered is None:
            continue
        if lowered in sets:
            problems.append(f"{where}: set twice (names are case-insensitive)")
        sets[lowered] = _compile_template(text, allowed, where, problems)
    adds: list[tuple[bytes, _Value]] = []
    for name, text in add_pairs:
        where = f"{key_path}.{direction}_add.{key(name)}"
        lowered = _field_name(name, where, problems, request=request, op="add")
        if lowered is not None:
            adds.append((lowered, _compile_template(text, allowed, where, problems)))
    return HeaderTransform(
        drop=frozenset(drop | sets.keys()),
        sets=sets,
        add=tuple(adds),
        placeholders=_placeholders([*sets.values(), *(v for _, v in adds)]),
    )


def compile_header_rules(rules: HeaderRules, key_path: str) -> HeaderRuleSet:
    """Compile a ``headers`` table.

    Args:
        rules: the table.
        key_path: its key path: ``server.headers`` or ``routes.NAME.headers``.

    Raises:
        ConfigError: listing every problem, one per line, e.g.
            ``routes.users.headers.request_set.X-Client: unknown placeholder {clientip}``.
    """
    problems: list[str] = []
    request = _compile_direction(
        rules.request_set, rules.request_add, rules.request_remove, key_path, "request", problems
    )
    response = _compile_direction(
        rules.response_set,
        rules.response_add,
        rules.response_remove,
        key_path,
        "response",
        problems,
    )
    if problems:
        raise ConfigError("\n".join(problems))
    return HeaderRuleSet(request=request, response=response)


# --- body transform ----------------------------------------------------------------

#: ``(body, content_type) -> bytes``, or an awaitable of it.
BodyTransform: TypeAlias = Callable[[bytes, str], bytes | Awaitable[bytes]]


class BodyTransformError(ProxyError):
    """A body transform raised or returned something other than bytes."""

    status = 500
    reason = "body transform failed"


def load_body_transform(spec: str, key_path: str) -> BodyTransform:
    """Import the function ``spec`` names (``"package.module:function"``).

    Importing runs the module's code, once, when the config is loaded.

    Args:
        spec: ``module:attribute``; the attribute may be dotted
            (``pkg.mod:Transforms.gzip``).
        key_path: e.g. ``routes.users.body_transform``.

    Raises:
        ConfigError: naming the key path and what failed: a malformed spec,
            a module that is missing or fails to import, a missing attribute,
            something not callable or not taking ``(body, content_type)``.
    """
    try:
        found = import_reference(spec, "function")
    except BadReference as exc:
        raise ConfigError(f"{key_path}: {exc}, got {quoted(spec)}") from exc
    if not callable(found):
        raise ConfigError(f"{key_path}: {spec} is a {type(found).__name__}, not a function")
    try:
        signature = inspect.signature(found)
    except (TypeError, ValueError):
        return found  # some builtins have no signature to check
    try:
        signature.bind(b"", "")
    except TypeError:
        raise ConfigError(
            f"{key_path}: {spec} must take (body, content_type), its signature is {signature}"
        ) from None
    return found


async def run_body_transform(transform: BodyTransform, body: bytes, content_type: str) -> bytes:
    """Call ``transform``, plain or async, and check that it gave bytes.

    A plain function runs on the calling thread (keep it quick, or make it
    async and offload the work yourself).

    Raises:
        BodyTransformError: the function raised, or returned something that
            is not bytes; the cause is chained for the log.
    """
    try:
        result = transform(body, content_type)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:  # user code: any failure becomes a 500
        raise BodyTransformError(f"body transform raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, bytes):
        return result
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    raise BodyTransformError(f"body transform returned {type(result).__name__}, not bytes")
