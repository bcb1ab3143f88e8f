"""Custom balancing strategies, loaded by name: ``--strategy package.module:Name``.

The protocol (:class:`trioproxy.balance.strategies.Strategy`) is one method::

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target

- ``candidates`` are :class:`~trioproxy.balance.target.Target` objects that may
  take the request right now (healthy, not ejected, breaker not open, under
  their cap). The list is never empty and may change from call to call. Read
  ``target.name``, ``target.weight``, ``target.inflight``, ``target.latency``
  (EWMA seconds, ``None`` until measured); do not modify targets.
- ``request`` is the request head (``method``, ``target``, ``headers`` as bytes),
  or ``None`` when the balancer picks without one.
- Return one of the candidates, the object itself. ``pick`` is called on the
  event loop for every request: it must be quick and must not block or await.

``Name`` is a class (or any zero-argument factory) and is called once, with no
arguments, when the proxy starts; an object that already has ``pick`` is used
as it is. For example, in ``mycompany/balancing.py``::

    import zlib

    class ByClient:
        '''The same client address goes to the same target while the set is stable.'''

        def pick(self, candidates, request=None):
            key = b""
            if request is not None:
                key = next((v for k, v in request.headers if k.lower() == b"x-real-ip"), b"")
            return candidates[zlib.crc32(key) % len(candidates)]

and ``--strategy mycompany.balancing:ByClient``. The module is imported with the
normal import system, so it must be on ``sys.path`` (installed, or in the
working directory).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, cast

from trioproxy.references import BadReference, import_reference

if TYPE_CHECKING:
    from trioproxy.balance.strategies import Strategy

__all__ = ["load_strategy"]


def load_strategy(spec: str) -> Strategy:
    """Import ``package.module:Name`` and return a strategy built from ``Name``.

    Raises:
        ValueError: the spec is malformed, the module or the attribute does not
            exist, ``Name`` cannot be called without arguments, or what it gives
            has no callable ``pick(candidates, request)``. The one-line message
            names the spec and what is wrong.
    """
    spec = spec.strip()
    try:
        obj = import_reference(spec, "Name")
    except BadReference as exc:
        raise ValueError(f"custom strategy {spec!r}: {exc}") from exc
    attr_path = spec.partition(":")[2]

    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "pick")):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise ValueError(
                f"custom strategy {spec!r}: {attr_path}() needs arguments; "
                "it must be callable with none"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): let the call decide
        obj = obj()

    pick = getattr(obj, "pick", None)
    if not callable(pick):
        raise ValueError(
            f"custom strategy {spec!r}: {type(obj).__name__} has no callable "
            "pick(candidates, request)"
        )
    try:
        inspect.signature(pick).bind([], None)
    except TypeError:
        raise ValueError(
            f"custom strategy {spec!r}: {type(obj).__name__}.pick must accept (candidates, request)"
        ) from None
    except ValueError:
        pass  # no signature to inspect
    return cast("Strategy", obj)
