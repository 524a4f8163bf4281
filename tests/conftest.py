"""Real infrastructure for the tests: a nats-server with JetStream on a free port, SQLite and PostgreSQL.

PostgreSQL tests use HIE_TEST_POSTGRES_URL (an asyncpg URL); when it is unset they try the local
default (127.0.0.1:5432, database test) and skip with the reason when nothing answers. CI sets
HIE_TEST_POSTGRES_REQUIRED=1 so that a missing PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, text

from hie_platform.db import Database
from hie_platform.migrations import upgrade
from hie_platform.natsd import NatsServer

DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


# --- a hung test says where it hangs -----------------------------------------------------------
# A full run once stopped in an async fixture's teardown with the event loop idle (issue 16's
# closing note). The watchdog names the test that has run for HANG_REPORT_SECONDS and prints every
# thread's stack and every asyncio task's stack past pytest's capture, once per test; it fails nothing.
HANG_REPORT_SECONDS = float(os.environ.get("HIE_TEST_HANG_REPORT_SECONDS", "300"))
_running: dict[str, Any] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.update(nodeid=item.nodeid, since=time.monotonic(), reported=False)
    yield
    _running.clear()


def _uncaptured(config: pytest.Config, write: Any) -> None:
    """Run ``write(stderr)`` with pytest's capture off, so that it reaches the terminal or CI log."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        write(sys.stderr)
        sys.stderr.flush()


def _watchdog(config: pytest.Config) -> None:
    while True:
        time.sleep(10)
        since = _running.get("since")
        if since is None or _running.get("reported") or time.monotonic() - since < HANG_REPORT_SECONDS:
            continue
        _running["reported"] = True
        message = f"\n[watchdog] {_running.get('nodeid')} has run for {HANG_REPORT_SECONDS:.0f} s\n"

        def threads(err: Any, message: str = message) -> None:
            err.write(message)
            faulthandler.dump_traceback(err, all_threads=True)

        _uncaptured(config, threads)
        os.kill(os.getpid(), signal.SIGUSR2)  # the asyncio tasks, printed by _asyncio_task_dump


def pytest_configure(config: pytest.Config) -> None:
    threading.Thread(target=_watchdog, args=(config,), name="hang-watchdog", daemon=True).start()


@pytest.fixture(scope="session", autouse=True)
async def _asyncio_task_dump(pytestconfig: pytest.Config) -> AsyncIterator[None]:
    """``kill -USR2 <pytest pid>`` prints every task of the session's event loop with its stack (past
    pytest's capture): a run that hangs in an async fixture's teardown shows what it waits for."""

    def dump() -> None:
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            out.write(f"--- {task!r}\n")
            task.print_stack(limit=40, file=out)
        _uncaptured(pytestconfig, lambda err: err.write(out.getvalue()))

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR2, dump)
    yield
    loop.remove_signal_handler(signal.SIGUSR2)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats") / "js").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


async def _pg_reachable(url: str) -> str | None:
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn), timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("HIE_TEST_POSTGRES_URL") or DEFAULT_PG
    problem = asyncio.run(_pg_reachable(url))
    if problem is not None:
        if os.environ.get("HIE_TEST_POSTGRES_REQUIRED") == "1":
            pytest.fail(f"PostgreSQL required but unreachable at {url}: {problem}")
        pytest.skip(f"no PostgreSQL at {url} ({problem}); set HIE_TEST_POSTGRES_URL to run these tests")
    return url


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """(database_url, schema) for one service: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'service.db'}", None
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield url, schema
    asyncio.run(_drop_schema(url, schema))


@pytest.fixture
async def database_with(
    database: tuple[str, str | None],
) -> AsyncIterator[Callable[[MetaData], Awaitable[Database]]]:
    """``await database_with(metadata)``: a Database on this test's SQLite file or PostgreSQL schema
    with ``metadata``'s tables created; disposed after the test."""
    made: list[Database] = []

    async def create(metadata: MetaData) -> Database:
        url, schema = database
        db = Database(url, schema)
        made.append(db)
        if schema:
            async with db.writer.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        async with db.writer.begin() as conn:
            await conn.run_sync(metadata.create_all)
        return db

    yield create
    for db in made:
        await db.dispose()


@pytest.fixture
async def migrated_database(
    database: tuple[str, str | None],
) -> AsyncIterator[Callable[[Path], Awaitable[Database]]]:
    """``await migrated_database(migrations)``: a Database on this test's SQLite file or PostgreSQL
    schema, upgraded with a service's migrations; disposed after the test."""
    made: list[Database] = []

    async def create(migrations: Path) -> Database:
        url, schema = database
        await asyncio.to_thread(upgrade, migrations, url, schema)
        made.append(Database(url, schema))
        return made[-1]

    yield create
    for db in made:
        await db.dispose()


@pytest.fixture
def unique() -> str:
    """A short unique token for names (durables, slugs) so tests never collide."""
    return uuid.uuid4().hex[:8]


# --- services running in-process under a real uvicorn on a free port -----------------------------


class RunningApp:
    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> RunningApp:
        self.task = asyncio.create_task(self.server.serve())
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("server stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.02)
        return self

    async def stop(self, grace: float = 30.0) -> None:
        self.server.should_exit = True
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=grace)
        except TimeoutError:
            # Seen once in a full run: uvicorn waiting forever for an open request of a consent app.
            # Say which requests were still open, then stop without waiting for them.
            open_requests = [
                f"{scope.get('method')} {scope.get('path')}"
                for connection in list(self.server.server_state.connections)
                if (scope := getattr(getattr(connection, "cycle", None), "scope", None))
            ]
            message = f"uvicorn at {self.url} did not stop within {grace:.0f}s; open: {open_requests}"
            print(message, file=sys.__stderr__, flush=True)  # past pytest's capture: in the CI log
            self.server.force_exit = True
            await self.task


class RegistryHandle:
    """The real registry, seeded with the demo institutions, and a way to get their tokens."""

    def __init__(self, running: RunningApp, credentials: dict[str, str]) -> None:
        self.running = running
        self.url = running.url
        self.credentials = credentials

    async def token(self, client_id: str) -> str:
        import httpx

        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{self.url}/oauth2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": self.credentials[client_id],
                },
            )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token


@pytest.fixture(scope="session")
async def registry(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RegistryHandle]:
    import json

    from hie_platform.natsd import free_port
    from hie_registry.app import create_app
    from hie_registry.config import RegistrySettings

    data = tmp_path_factory.mktemp("registry")
    port = free_port()
    settings = RegistrySettings(
        database_url=f"sqlite+aiosqlite:///{data / 'registry.db'}",
        nats_url=nats_url,
        port=port,
        registry_url=f"http://127.0.0.1:{port}",
        seed_demo=True,
        credentials_file=data / "credentials.json",
        node="test-registry",
    )
    running = await RunningApp(create_app(settings), port).start()
    yield RegistryHandle(running, json.loads((data / "credentials.json").read_text()))
    await running.stop()
