"""The statistics chart: an even time axis, whole-number ticks, and labels that cannot inject markup."""

from __future__ import annotations

import re

from hie_registry.console.chart import bar_chart, series


def test_months_without_exchanges_are_shown_as_zero_and_ticks_are_whole_numbers() -> None:
    data = series(
        [
            {"month": "2025-11", "kind": "referral", "count": 7},
            {"month": "2026-02", "kind": "return", "count": 2},
            {"month": "2026-02", "kind": "referral", "count": 1},
        ]
    )
    assert data.months == ["2025-11", "2025-12", "2026-01", "2026-02"]
    assert (data.total("2025-12"), data.total("2026-02")) == (0, 3)
    svg = str(bar_chart(data, "월별 교류", "설명", lambda kind: f"<{kind}>"))
    assert re.findall(r'text-anchor="end" font-size="12" fill="#1a1a1a">(\d+)<', svg) == [
        "0",
        "2",
        "4",
        "6",
        "8",
    ]
    assert svg.count("<rect") == 3 + 2  # three bar segments and two legend swatches
    assert "&lt;referral&gt;" in svg
    assert "<referral>" not in svg
    assert 'role="img"' in svg
    assert '<title id="chart-title">월별 교류</title>' in svg
