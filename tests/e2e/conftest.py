"""The whole federation as real processes (`hie up`), on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hie_cli.federation import Federation


def _drop_schemas(url: str, prefix: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            names = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{prefix}\\_%"
            )
            for row in names:
                await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgres"])
def federation(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Federation]:
    data = tmp_path / "hie"
    args = [sys.executable, "-m", "hie_cli.main", "up", "--data-dir", str(data), "--hubs", "2"]
    prefix = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        prefix = f"e2e{uuid.uuid4().hex[:8]}"
        args += ["--postgres-url", url, "--schema-prefix", prefix]
    log = (tmp_path / "launcher.log").open("wb")
    launcher = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (data / "federation.json").exists():
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the federation did not come up in 120 s"
            time.sleep(0.2)
        yield Federation.read(data / "federation.json")
    finally:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            launcher.kill()
        log.close()
        if prefix is not None:
            _drop_schemas(request.getfixturevalue("postgres_url"), prefix)
    assert launcher.returncode == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    for name in os.listdir(data / "logs"):
        text = (data / "logs" / name).read_text(errors="replace")
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"
