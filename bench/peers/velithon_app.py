"""velithon's gateway, through its ``forward_to`` helper (pinned velithon==0.6.10).

In 0.6.10 a ``Gateway.add_route`` route answers every request with 502 ("'builtins.
ProxyClient' object has no attribute 'target_url'"), but ``velithon.gateway.forward_to``
builds an endpoint around one shared ``ProxyClient`` (Rust) that a catch-all route can
use. It reads the whole request body and the whole response before forwarding either
(no streaming), and forwards no WebSocket. Run by the peers' virtualenv, from here:

    velithon run --app velithon_app:app --workers 1   (BENCH_UPSTREAM=http://HOST:PORT)
"""

import os

from velithon import Velithon
from velithon.gateway import forward_to
from velithon.routing import Route

UPSTREAM = os.environ["BENCH_UPSTREAM"]

app = Velithon(
    routes=[
        Route(
            "/{path:path}",
            forward_to("/{path:path}", UPSTREAM),
            methods=["GET", "POST", "PUT", "DELETE"],
        )
    ]
)
