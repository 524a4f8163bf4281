"""FHIR date parameters and paging cursors as the hub reads them (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hie_hub.core.params import LOCAL_TIME, Cursor, parse_date
from hie_platform.errors import BadRequest


def kst(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=LOCAL_TIME)


@pytest.mark.parametrize(
    ("raw", "inside", "outside"),
    [
        ("2025-03-04", kst(2025, 3, 4, 23, 59), kst(2025, 3, 5, 0, 0)),  # a day is the whole day in KST
        ("2025-03", kst(2025, 3, 31, 12), kst(2025, 4, 1)),
        ("2025-12", kst(2025, 12, 31, 23), kst(2026, 1, 1)),
        ("2025", kst(2025, 12, 31, 23), kst(2026, 1, 1)),
        ("ge2025-03-04", kst(2025, 3, 4), kst(2025, 3, 3, 23, 59)),
        ("gt2025-03-04", kst(2025, 3, 5), kst(2025, 3, 4, 23, 59)),
        ("le2025-03-04", kst(2025, 3, 4, 23, 59), kst(2025, 3, 5)),
        ("lt2025-03-04", kst(2025, 3, 3, 23, 59), kst(2025, 3, 4)),
        ("ge2025-03-04T09:30:00Z", datetime(2025, 3, 4, 9, 30, tzinfo=UTC), kst(2025, 3, 4, 18, 29)),
        ("eq2025-03-04T09:30+09:00", kst(2025, 3, 4, 9, 30, 59), kst(2025, 3, 4, 9, 31)),
    ],
)
def test_a_date_parameter_matches_the_range_it_names(raw: str, inside: datetime, outside: datetime) -> None:
    bound = parse_date("date", raw)
    assert bound.admits(inside)
    assert not bound.admits(outside)
    # The SQL limits agree with the exact test.
    for at in (inside, outside):
        in_limits = (bound.lower is None or at >= bound.lower) and (bound.upper is None or at < bound.upper)
        assert in_limits == bound.admits(at)


@pytest.mark.parametrize(
    "raw", ["sa2025-01-01", "ap2025", "2025-13", "2025-02-30", "yesterday", "2025-03-04T25:00", ""]
)
def test_a_malformed_date_is_a_bad_request(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_date("date", raw)


def test_a_cursor_survives_its_round_trip_and_a_forged_one_is_refused() -> None:
    cursor = Cursor(datetime.now(UTC) - timedelta(days=3), "b8a7c6d5-0000-4000-8000-000000000001")
    assert Cursor.decode(cursor.encode()) == cursor
    for forged in ("", "!!!", "bm90IGpzb24", Cursor(datetime(2025, 1, 1), "x").encode()):
        with pytest.raises(BadRequest):
            Cursor.decode(forged)
