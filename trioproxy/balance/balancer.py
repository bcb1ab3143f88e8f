"""The balancer: the live view of the targets and the strategy that picks one."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from trioproxy.balance.strategies import RoundRobin, Strategy
from trioproxy.errors import NoHealthyUpstream
from trioproxy.upstream.origin import UpstreamURL


@attrs.define
class Balancer:
    targets: Sequence[UpstreamURL]
    strategy: Strategy = attrs.Factory(RoundRobin)

    def pick(self) -> UpstreamURL:
        """A target for the next request.

        Raises:
            NoHealthyUpstream: there is no target to pick.
        """
        if not self.targets:
            raise NoHealthyUpstream("no upstream configured")
        return self.strategy.pick(self.targets)
