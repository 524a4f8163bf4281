"""Issue 12 point 15: the local run (`hie up`, `make run`) is locked down as Kubernetes is.

The federation runs as real processes: nats-server with the accounts generated from the bus
contract (one user per service, passwords generated per data directory), secrets generated per data
directory instead of the services' public placeholders, and every file under the data directory
readable by its owner only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nats
import pytest

from hie_cli.federation import Federation
from hie_cli.local_secrets import GENERATED, local_secrets
from hie_platform import nats_accounts
from hie_platform.natsd import NatsServer
from hie_platform.settings import DEV_PATIENT_KEY_SECRET
from hie_schemas.contract import Kind, subject


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("local-run")
    data = root / "hie"
    # What an older run left behind, readable by everyone: brought to the owner's only at start.
    (data / "db").mkdir(parents=True)
    (data / "db").chmod(0o755)
    (data / "db" / "left-over.db").write_text("old")
    (data / "db" / "left-over.db").chmod(0o644)
    args = [sys.executable, "-m", "hie_cli.main", "up", "--data-dir", str(data), "--hubs", "2"]
    log = (root / "launcher.log").open("wb")
    launcher = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (data / "federation.json").exists():
            assert launcher.poll() is None, (root / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the federation did not come up in 180 s"
            time.sleep(0.2)
        yield Federation.read(data / "federation.json")
    finally:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            launcher.kill()
        log.close()


async def server_answer(url: str) -> str:
    """The server's answer to a client that CONNECTs with the URL's credentials (if any) and PINGs:
    ``PONG`` when it is let in, ``-ERR 'Authorization Violation'`` when not (NATS client protocol)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        await asyncio.wait_for(reader.readline(), 10)  # INFO
        options: dict[str, object] = {"verbose": False, "pedantic": False, "protocol": 1}
        if parts.username:
            options |= {"user": unquote(parts.username), "pass": unquote(parts.password or "")}
        writer.write(f"CONNECT {json.dumps(options)}\r\nPING\r\n".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_nats_refuses_a_connection_without_credentials(local_run: Federation) -> None:
    assert await server_answer(local_run.nats_url) == "-ERR 'Authorization Violation'"
    wrong = local_run.nats_url_for("hub-snubh").replace("@", "x@", 1)  # a wrong password
    assert await server_answer(wrong) == "-ERR 'Authorization Violation'"
    assert await server_answer(local_run.nats_url_for("hub-snubh")) == "PONG"


async def test_a_hub_user_cannot_publish_another_hubs_subject(local_run: Federation) -> None:
    attacker, victim = (h.slug for h in local_run.hubs)
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(local_run.nats_url_for(f"hub-{attacker}"), error_cb=on_error, connect_timeout=5)
    try:
        await nc.publish(subject(Kind.DOCUMENT_STATUS, to=attacker, sender=victim), b"{}")
        await nc.publish(subject(Kind.EXCHANGE_SENT, sender=attacker), b"{}")  # its own: allowed
        await nc.flush(timeout=5)
        deadline = asyncio.get_running_loop().time() + 20
        while not errors:
            assert asyncio.get_running_loop().time() < deadline, "the forged subject was accepted"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert len(errors) == 1, errors
    assert "permissions violation" in errors[0].lower()
    assert f"inbox.document-status.{victim}" in errors[0]


def test_no_file_under_the_data_directory_is_readable_by_others(local_run: Federation) -> None:
    data = Path(local_run.data_dir)
    found = [data, *data.rglob("*")]
    assert len(found) > 20, "the databases, logs, JetStream store, spools and keys are all there"
    exposed = [
        f"{path.relative_to(data)} {stat.filemode(path.stat().st_mode)}"
        for path in found
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]
    assert exposed == []
    assert any(p.suffix == ".db" for p in found)  # SQLite databases, created by the children


def test_secrets_are_generated_per_data_directory_and_reused(local_run: Federation, tmp_path: Path) -> None:
    data = Path(local_run.data_dir)
    stored = json.loads((data / "secrets.json").read_text())
    assert set(GENERATED) <= set(stored)
    assert stored["patient_key_secret"] != DEV_PATIENT_KEY_SECRET
    assert not any(value.startswith("dev-only") for value in stored.values())
    # Reused on the next start of the same data directory; another directory has its own.
    users = [name.removeprefix("nats:") for name in stored if name.startswith("nats:")]
    assert local_secrets(data, users) == stored
    other = local_secrets(tmp_path, users)
    assert all(other[name] != stored[name] for name in stored)
    # The services were given them (the hub node's environment, as the launcher set it).
    hub = local_run.hubs[0].slug
    environ = [
        env
        for pid in _children_named("hie_hub")
        if str(data) in (env := _environ(pid)).get("HIE_HUB_DATABASE_URL", "")
    ]
    assert len(environ) == len(local_run.hubs)
    assert any(env.get("HIE_HUB_HUB") == hub for env in environ)
    assert all(env.get("HIE_HUB_PATIENT_KEY_SECRET") == stored["patient_key_secret"] for env in environ)
    assert all(f"hub-{env['HIE_HUB_HUB']}:" in env.get("HIE_HUB_NATS_URL", "") for env in environ)


def _children_named(module: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in cmdline and os.access(entry / "environ", os.R_OK):
                pids.append(int(entry.name))
    return pids


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


async def test_any_generated_password_is_taken_as_it_is(tmp_path: Path) -> None:
    """nats-server parses a variable's value as configuration: a password that starts with a digit
    or holds a '-' (token_urlsafe makes both) must still be one string, or the server does not start."""
    users = nats_accounts.users(["snubh"])
    tricky = {user: f"9{index}-e5_{user}" for index, user in enumerate(users)}
    server = NatsServer(
        tmp_path / "nats",
        accounts=nats_accounts.render(["snubh"]),
        passwords={nats_accounts.password_var(u): p for u, p in tricky.items()},
    ).start()
    try:
        assert await server_answer(server.user_url("hub-snubh", tricky["hub-snubh"])) == "PONG"
    finally:
        server.stop()
