"""Which probe answers pass (trioproxy/balance/health_rules.py): plain values, no I/O."""

from __future__ import annotations

import pytest

from trioproxy.balance.health_rules import LIVENESS, PATH_DEFAULT, HealthSettings, StatusRanges


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("200", ((200, 200),)),
        ("200,204", ((200, 200), (204, 204))),
        ("200-299", ((200, 299),)),
        (" 200 - 299 , 404 ", ((200, 299), (404, 404))),
        ("100-599", ((100, 599),)),
    ],
)
def test_expected_statuses_parse_codes_and_ranges(
    text: str, ranges: tuple[tuple[int, int], ...]
) -> None:
    assert StatusRanges.parse(text).ranges == ranges


@pytest.mark.parametrize(
    "text", ["", "ok", "200,", "2xx", "99", "600", "299-200", "200-", "-200", "200-300-400", "1e3"]
)
def test_bad_expected_statuses_are_refused_naming_the_value(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        StatusRanges.parse(text)
    assert "status" in str(caught.value)


def test_expected_statuses_from_a_list_as_toml_would_give_them() -> None:
    assert StatusRanges.of([200]) == StatusRanges.parse("200")
    assert StatusRanges.of([200, "300-399"]) == StatusRanges.parse("200,300-399")
    with pytest.raises(ValueError):
        StatusRanges.of([])
    with pytest.raises(ValueError):
        StatusRanges.of([True])  # type: ignore[list-item]


def test_membership_and_text() -> None:
    statuses = StatusRanges.parse("200-299,404")
    assert 200 in statuses and 299 in statuses and 404 in statuses
    assert 300 not in statuses and 403 not in statuses
    assert str(statuses) == "200-299,404"


@pytest.mark.parametrize(
    ("settings", "own_path", "expected", "path"),
    [
        # Nothing configured: a liveness probe of /.
        (HealthSettings(), None, LIVENESS, "/"),
        # A health path, globally or for this target: 200-399 from it.
        (HealthSettings(path="/healthz"), None, PATH_DEFAULT, "/healthz"),
        (HealthSettings(), "/ready", PATH_DEFAULT, "/ready"),
        (HealthSettings(path="/healthz"), "/ready", PATH_DEFAULT, "/ready"),
        # Statuses given: they are the rule, path or not.
        (HealthSettings(expect=StatusRanges.parse("204")), None, StatusRanges.parse("204"), "/"),
        (
            HealthSettings(path="/h", expect=StatusRanges.parse("404")),
            None,
            StatusRanges.parse("404"),
            "/h",
        ),
    ],
)
def test_which_statuses_and_path_a_probe_uses(
    settings: HealthSettings, own_path: str | None, expected: StatusRanges, path: str
) -> None:
    assert settings.expected_for(own_path) == expected
    assert settings.path_for(own_path) == path


@pytest.mark.parametrize(
    ("status", "alive"), [(100, True), (200, True), (404, True), (405, True), (499, True),
                          (500, False), (502, False), (503, False), (599, False)]
)  # fmt: skip
def test_liveness_passes_any_answer_below_500(status: int, alive: bool) -> None:
    assert (status in LIVENESS) is alive


@pytest.mark.parametrize(
    ("status", "ready"), [(199, False), (200, True), (304, True), (399, True), (400, False),
                          (404, False), (500, False)]
)  # fmt: skip
def test_a_health_path_passes_200_to_399_by_default(status: int, ready: bool) -> None:
    assert (status in PATH_DEFAULT) is ready
