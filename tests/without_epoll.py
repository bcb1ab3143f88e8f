"""Run a module as ``python -m`` would, on a ``select`` without epoll or poll.

``python tests/without_epoll.py MODULE ARGS...`` hides ``select.epoll``,
``select.poll`` and their constants from trioproxy (as on macOS and Windows),
checks that ``import trioproxy`` and ``import trioproxy.asgi`` work and that the
stream hub says it is unsupported, then runs ``MODULE`` with ``ARGS``.

trio is imported first, with the real ``select``: its own I/O manager needs epoll
on Linux (it would use kqueue or IOCP there); only trioproxy is made to do without.
"""

from __future__ import annotations

import runpy
import select
import sys
import types

import trio  # noqa: F401  (imported with the real select, see above)

_HIDDEN = ("epoll", "EPOLL", "poll", "POLL")

portable = types.ModuleType("select", select.__doc__)
for name in dir(select):
    if not name.startswith(_HIDDEN):
        setattr(portable, name, getattr(select, name))
sys.modules["select"] = portable

import trioproxy  # noqa: E402
import trioproxy.relay_hub  # noqa: E402

if trioproxy.relay_hub.supported():
    sys.exit("without_epoll: the stream hub still says it is supported")
import trioproxy.asgi  # noqa: E402  (the ASGI app and the FastAPI helpers too)

if __name__ == "__main__":
    module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
