"""Balancing strategies and their loading by name, driven by seeded random sources."""

from __future__ import annotations

import gc
import importlib
import random
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from trioproxy.balance.custom import load_strategy
from trioproxy.balance.strategies import (
    STRATEGIES,
    Fastest,
    LeastConnections,
    Random,
    RoundRobin,
    Strategy,
    Weighted,
    make_strategy,
)
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.http.protocol import RequestHead
from trioproxy.upstream.origin import UpstreamURL

pytestmark = pytest.mark.timeout(10)


def target(
    name: str, *, weight: int = 1, latency: float | None = None, inflight: int = 0
) -> Target:
    t = Target(TargetSpec(url=UpstreamURL.parse(f"http://{name}:8000"), weight=weight))
    t.latency = latency
    t.inflight = inflight
    return t


def names(picks: Sequence[Target]) -> str:
    return "".join(t.url.origin.host for t in picks)


def run(strategy: Strategy, candidates: Sequence[Target], n: int) -> list[Target]:
    return [strategy.pick(candidates) for _ in range(n)]


def shares(picks: Sequence[Target]) -> dict[str, float]:
    counts = Counter(t.url.origin.host for t in picks)
    return {name: count / len(picks) for name, count in counts.items()}


# --- round_robin ---------------------------------------------------------------------


def test_round_robin_takes_each_in_turn() -> None:
    a, b, c = target("a"), target("b"), target("c")
    assert names(run(RoundRobin(), [a, b, c], 7)) == "abcabca"


def test_round_robin_follows_a_changing_candidate_set() -> None:
    a, b, c = target("a"), target("b"), target("c")
    rr = RoundRobin()
    assert names(run(rr, [a, b, c], 2)) == "ab"
    assert names(run(rr, [a, c], 4)) == "acac"
    picks = run(rr, [a, b, c], 3000)
    assert shares(picks) == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3), "c": 1 / 3}


def test_round_robin_works_on_any_sequence() -> None:
    """The balancer of the core path hands it plain URLs."""
    assert [RoundRobin().pick(["x", "y"]) for _ in range(1)] == ["x"]


# --- random ----------------------------------------------------------------------------


def test_random_is_uniform_and_reproducible_with_a_seed() -> None:
    candidates = [target("a"), target("b"), target("c")]
    picks = run(Random(random.Random(1)), candidates, 6000)
    for share in shares(picks).values():
        assert share == pytest.approx(1 / 3, abs=0.03)
    assert names(run(Random(random.Random(1)), candidates, 50)) == names(picks[:50])


# --- weighted --------------------------------------------------------------------------


def test_weighted_interleaves_like_nginx() -> None:
    a, b, c = target("a", weight=3), target("b", weight=2), target("c", weight=1)
    assert names(run(Weighted(), [a, b, c], 12)) == "abacba" * 2


def test_weighted_split_is_exact_over_thousands_of_picks() -> None:
    a, b, c = target("a", weight=3), target("b", weight=2), target("c", weight=1)
    picks = run(Weighted(), [a, b, c], 6000)
    assert Counter(names(picks)) == {"a": 3000, "b": 2000, "c": 1000}
    # Smooth: never a burst of the heavy target (nginx's aaabbc would give runs of 3).
    longest = max(len(run_) for run_ in names(picks).replace("b", " ").replace("c", " ").split())
    assert longest <= 2


def test_weighted_spreads_a_heavy_target() -> None:
    a, b = target("a", weight=5), target("b", weight=1)
    assert names(run(Weighted(), [a, b], 6)) == "aaabaa"


def test_equal_weights_are_round_robin() -> None:
    a, b, c = target("a"), target("b"), target("c")
    assert names(run(Weighted(), [a, b, c], 6)) == "abcabc"


def test_weighted_survives_the_candidate_set_changing() -> None:
    a, b, c = target("a", weight=3), target("b", weight=2), target("c", weight=1)
    weighted = Weighted()
    run(weighted, [a, b, c], 4)
    # c is ejected for a while: a and b share 3:2.
    picks = run(weighted, [a, b], 500)
    assert Counter(names(picks)) == {"a": 300, "b": 200}
    # c comes back and the split returns to 3:2:1.
    picks = run(weighted, [a, b, c], 6000)
    for name, share in shares(picks).items():
        assert share == pytest.approx({"a": 3 / 6, "b": 2 / 6, "c": 1 / 6}[name], abs=0.002)
    # A new target joins mid-way; it starts from zero and gets its weight's share.
    d = target("d", weight=4)
    picks = run(weighted, [a, b, c, d], 1000)
    assert Counter(names(picks)) == {"a": 300, "b": 200, "c": 100, "d": 400}


def test_weighted_forgets_targets_that_are_gone() -> None:
    weighted = Weighted()
    a = target("a")
    run(weighted, [a, target("gone")], 2)
    gc.collect()
    assert names(run(weighted, [a], 1)) == "a"
    assert len(weighted._current) == 1


def test_weighted_treats_a_weight_below_one_as_one() -> None:
    a, b = target("a", weight=0), target("b", weight=1)
    assert Counter(names(run(Weighted(), [a, b], 10))) == {"a": 5, "b": 5}


# --- least_connections -----------------------------------------------------------------


def test_least_connections_picks_the_fewest_in_flight() -> None:
    a, b, c = target("a", inflight=4), target("b", inflight=1), target("c", inflight=2)
    assert names(run(LeastConnections(), [a, b, c], 5)) == "bbbbb"
    assert names(run(LeastConnections(random.Random(3)), [a, b, c], 5)) == "bbbbb"


def test_least_connections_breaks_ties_round_robin() -> None:
    a, b, c = target("a"), target("b"), target("c")
    assert names(run(LeastConnections(), [a, b, c], 6)) == "abcabc"
    c.inflight = 1
    picks = run(LeastConnections(), [a, b, c], 100)
    assert Counter(names(picks)) == {"a": 50, "b": 50}


def test_least_connections_breaks_ties_at_random_with_an_rng() -> None:
    a, b, c = target("a"), target("b"), target("c", inflight=2)
    picks = run(LeastConnections(random.Random(7)), [a, b, c], 2000)
    assert set(shares(picks)) == {"a", "b"}
    assert shares(picks)["a"] == pytest.approx(0.5, abs=0.05)


def test_least_connections_follows_load_as_it_changes() -> None:
    """Simulate requests that stay in flight: the load evens out across targets."""
    candidates = [target("a"), target("b"), target("c", inflight=5)]
    lc = LeastConnections()
    for _ in range(10):
        lc.pick(candidates).inflight += 1
    assert [t.inflight for t in candidates] == [5, 5, 5]


# --- fastest ---------------------------------------------------------------------------


def test_fastest_splits_evenly_between_equal_targets() -> None:
    a, b = target("a", latency=0.010), target("b", latency=0.010)
    picks = run(Fastest(random.Random(5)), [a, b], 2000)
    assert shares(picks)["a"] == pytest.approx(0.5, abs=0.05)


def test_fastest_sends_little_but_some_traffic_to_a_slower_target() -> None:
    fast, slow = target("fast", latency=0.005), target("slow", latency=0.025)
    picks = run(Fastest(random.Random(5)), [fast, slow], 2000)
    slow_share = shares(picks).get("slow", 0.0)
    assert 0 < slow_share < 0.20


def test_fastest_with_three_targets_prefers_the_fast_ones_but_measures_the_slow_one() -> None:
    candidates = [
        target("a", latency=0.005),
        target("b", latency=0.005),
        target("c", latency=0.025),
    ]
    picks = run(Fastest(random.Random(11)), candidates, 3000)
    share = shares(picks)
    assert 0 < share["c"] < 0.10
    assert share["a"] == pytest.approx(share["b"], abs=0.05)


def test_fastest_brings_back_a_recovered_target() -> None:
    fast, slow = target("fast", latency=0.005), target("slow", latency=0.050)
    fastest = Fastest(random.Random(2))
    run(fastest, [fast, slow], 500)
    slow.latency = 0.005  # its next measurement shows it recovered
    picks = run(fastest, [fast, slow], 2000)
    assert shares(picks)["slow"] == pytest.approx(0.5, abs=0.05)


def test_fastest_measures_an_unmeasured_target_first() -> None:
    measured, new = target("measured", latency=0.001), target("new")
    assert names(run(Fastest(random.Random(0)), [measured, new], 5)) == "new" * 5


def test_fastest_counts_requests_in_flight() -> None:
    idle, busy = target("idle", latency=0.010), target("busy", latency=0.008, inflight=4)
    picks = run(Fastest(random.Random(4)), [idle, busy], 1000)
    assert shares(picks)["idle"] > 0.8


def test_fastest_copes_with_a_zero_latency() -> None:
    """A 0 s measurement (coarse clock) must not make its target unbeatable for good."""
    zero, other = target("zero", latency=0.0), target("other", latency=0.001)
    picks = run(Fastest(random.Random(9)), [zero, other], 2000)
    assert 0 < shares(picks).get("other", 0.0) < 0.5


def test_fastest_with_one_candidate_and_bad_decay() -> None:
    only = target("only", latency=1.0)
    assert Fastest().pick([only]) is only
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            Fastest(decay=decay)


# --- by name -------------------------------------------------------------------------


def test_every_named_strategy_picks_a_candidate() -> None:
    candidates = [target("a", latency=0.01), target("b", latency=0.02)]
    request = RequestHead(method=b"GET", target=b"/", headers=[])
    assert list(STRATEGIES) == ["round_robin", "random", "weighted", "least_connections", "fastest"]
    for name in STRATEGIES:
        strategy = make_strategy(name)
        for _ in range(10):
            assert strategy.pick(candidates, request) in candidates


def test_make_strategy_types_and_spellings() -> None:
    assert isinstance(make_strategy("round_robin"), RoundRobin)
    assert isinstance(make_strategy("least-connections"), LeastConnections)
    assert isinstance(make_strategy("Weighted"), Weighted)
    assert isinstance(make_strategy("fastest"), Fastest)


def test_make_strategy_rejects_an_unknown_name_in_one_line() -> None:
    with pytest.raises(ValueError) as info:
        make_strategy("fastets")
    message = str(info.value)
    assert "'fastets'" in message and "\n" not in message
    for name in STRATEGIES:
        assert name in message


# --- custom --------------------------------------------------------------------------


EXAMPLE = "balance.custom_strategy_example"


def test_custom_strategy_is_loaded_and_given_the_request() -> None:
    strategy = make_strategy(f"{EXAMPLE}:LastOne")
    a, b = target("a"), target("b")
    request = RequestHead(method=b"GET", target=b"/x", headers=[])
    assert strategy.pick([a, b], request) is b
    assert strategy.seen == [request]  # type: ignore[attr-defined]
    assert load_strategy(f"{EXAMPLE}:LastOne") is not strategy


def test_custom_ready_made_instance_is_used_as_is() -> None:
    example = importlib.import_module(EXAMPLE)
    assert load_strategy(f"{EXAMPLE}:READY_MADE") is example.READY_MADE


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_module_xyz:Thing", "no module named no_such_module_xyz"),
        ("balance.no_such_module:Thing", "no module named balance.no_such_module"),
        (f"{EXAMPLE}:Missing", f"module {EXAMPLE} has no attribute Missing"),
        (f"{EXAMPLE}:NoPick", "NoPick has no callable pick(candidates, request)"),
        (f"{EXAMPLE}:PickNotCallable", "has no callable pick"),
        (f"{EXAMPLE}:NeedsArguments", "NeedsArguments() needs arguments"),
        (f"{EXAMPLE}:PickWithoutRequest", "pick must accept (candidates, request)"),
        (f"{EXAMPLE}:", 'expected "package.module:Name"'),
        (":LastOne", 'expected "package.module:Name"'),
    ],
)
def test_custom_strategy_errors_are_one_line(spec: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        make_strategy(spec)
    message = str(info.value)
    assert expected in message
    assert repr(spec) in message
    assert "\n" not in message


def test_custom_module_with_a_missing_dependency_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_strategy_mod.py").write_text(
        textwrap.dedent(
            """
            import not_installed_dependency_xyz

            class S:
                def pick(self, candidates, request=None):
                    return candidates[0]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_strategy_mod", raising=False)
    with pytest.raises(ValueError, match=r"importing broken_strategy_mod failed.*not_installed"):
        load_strategy("broken_strategy_mod:S")


def test_custom_module_that_raises_on_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its code runs at import: whatever it raises is a config error, not a traceback."""
    (tmp_path / "raising_strategy_mod.py").write_text("raise RuntimeError('no database')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "raising_strategy_mod", raising=False)
    with pytest.raises(ValueError) as caught:
        load_strategy("raising_strategy_mod:S")
    assert str(caught.value) == (
        "custom strategy 'raising_strategy_mod:S': importing raising_strategy_mod failed: "
        "RuntimeError: no database"
    )
