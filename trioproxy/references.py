"""``package.module:attribute``: code a config names (a body transform, a
balancing strategy), imported when the config is loaded.

One function for every such key, so that each says the same things about the
same mistakes: a malformed reference, a missing module, a module that fails to
import (it runs user code: whatever it raises is the config's fault, reported in
one line, never a traceback), a missing attribute.
"""

from __future__ import annotations

import importlib
import re
from typing import Final

#: ``package.module:attribute``, the attribute possibly dotted (``mod:Class.method``).
SPEC: Final = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class BadReference(Exception):
    """Why a reference cannot be imported; the message names neither the key nor
    the reference (the caller's message does)."""


def import_reference(spec: str, what: str = "name") -> object:
    """The object ``spec`` (``package.module:attribute``) names; ``what`` is what
    the attribute should be, for the message about a malformed ``spec``.

    Raises:
        BadReference: ``spec`` is malformed, its module is missing or raised on
            import, or it has no such attribute.
    """
    if not SPEC.fullmatch(spec):
        raise BadReference(f'expected "package.module:{what}"')
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise BadReference(f"no module named {missing}") from exc
        raise BadReference(f"importing {module_name} failed: {exc}") from exc
    except Exception as exc:  # importing runs user code
        raise BadReference(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    found: object = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise BadReference(f"module {module_name} has no attribute {attribute}") from None
    return found
