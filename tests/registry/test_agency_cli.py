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
