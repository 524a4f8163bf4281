"""`hie registry`: readable tables, and errors as one line with a non-zero exit."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any


async def hie(registry: Any, *args: str, credentials: bool = True) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    if credentials:
        env |= {"HIE_AGENCY_CLIENT_ID": "agency", "HIE_AGENCY_CLIENT_SECRET": registry.credentials["agency"]}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hie_cli.main",
        "registry",
        *args,
        "--registry-url",
        registry.url,
        "--data-dir",
        "/nonexistent",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_list_and_show(registry: Any) -> None:
    code, out, _ = await hie(registry, "list", "--kind", "hub")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["CODE", "NAME", "KIND", "REGION", "HUB", "STATE"]
    assert any("분당서울대학교병원" in line and "snubh" in line for line in lines[1:])
    code, out, _ = await hie(registry, "show", "31302001")
    assert code == 0
    assert "contacts" in out


async def test_errors_are_one_line_and_exit_non_zero(registry: Any) -> None:
    code, out, err = await hie(registry, "approve", "12345678", "--reason", "no such institution")
    assert code == 1
    assert out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("hie registry: 404")
    code, _, err = await hie(registry, "list", credentials=False)
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "credentials" in err
    code, _, err = await hie(registry, "suspend", "11100001", "--reason", "x")
    assert code == 1
    assert "400" in err  # a reason of at least three characters is required


def _cells(line: str) -> int:
    """Display width of a line: Hangul syllables take two terminal cells."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


async def test_columns_line_up_by_display_width_with_korean_names(registry: Any) -> None:
    code, out, _ = await hie(registry, "list")
    assert code == 0
    header, *rows = out.splitlines()
    kind_at = header.index("KIND")
    assert rows
    widths = {_cells(row.split("  ")[0] + "  ") for row in rows}
    assert len(widths) == 1  # the CODE column is the same width in every row
    korean = [row for row in rows if any("가" <= c <= "힣" for c in row)]
    assert korean
    for row in korean:
        kind = row.split()[-4]
        # The KIND value starts exactly under its header, counted in terminal cells.
        start = row.index(f" {kind} ") + 1
        assert _cells(row[:start]) == kind_at


async def test_unknown_choices_are_refused_and_show_renders_values(registry: Any) -> None:
    code, out, err = await hie(registry, "list", "--kind", "public-agencyy")
    assert code == 2
    assert out == ""
    assert "'public-agencyy' is not one of 'hub', 'clinic', 'public-agency', 'agency'" in err
    code, out, _ = await hie(registry, "list", "--kind", "agency")
    assert code == 0
    assert len(out.splitlines()) >= 2  # the operating agency itself is listed under its stored kind
    code, out, _ = await hie(registry, "show", "31302001")
    assert code == 0
    assert "{" not in out
    assert "[" not in out
    assert "'" not in out  # no Python reprs of lists or dicts


async def test_pacs_set_and_show(registry: Any) -> None:
    code, out, err = await hie(registry, "pacs", "show", "31302001")
    before = out
    code, out, err = await hie(
        registry,
        "pacs",
        "set",
        "31302001",
        "--ae-title",
        "SNUBH_PACS",
        "--host",
        "127.0.0.1",
        "--port",
        "11112",
    )
    assert code == 0, err
    assert "SNUBH_PACS@127.0.0.1:11112" in out
    code, out, _ = await hie(registry, "pacs", "show", "31302001")
    assert code == 0
    assert out.strip().endswith("PACS SNUBH_PACS@127.0.0.1:11112")
    assert out != before or "SNUBH_PACS@127.0.0.1:11112" in before
    code, _, err = await hie(
        registry, "pacs", "set", "31302001", "--ae-title", "X" * 17, "--host", "h", "--port", "1"
    )
    assert code == 1
    assert err.startswith("hie registry: 422") or err.startswith("hie registry: 400")
    assert err.strip().count("\n") == 0
    code, _, err = await hie(
        registry, "pacs", "set", "31302001", "--ae-title", "A", "--host", "h", "--port", "0"
    )
    assert code == 2
    assert "--port" in err
    # The registry fixture is shared: put back the PACS the other tests expect.
    code, _, err = await hie(
        registry,
        "pacs",
        "set",
        "31302001",
        "--ae-title",
        "PACS31302001",
        "--host",
        "127.0.0.1",
        "--port",
        "104",
    )
    assert code == 0, err
