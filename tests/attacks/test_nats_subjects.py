"""A hub publishing on another hub's subjects (issue 12 points 5 and 6). tests/deploy/test_nats_permissions.py
proves every allowed and refused subject of the contract against the rendered manifests; this adds
what the attack suite asks of every refusal: the server LOGS it, naming the user and the subject. The
subjects are the real ones of the bus contract (hie_schemas.contract); the accounts file is the one
committed under deploy/k8s (generated from the contract by deploy/k8s/nats_accounts.py), so it needs
no kubectl."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from hie_platform.natsd import find_nats_server, free_port, wait_for_port
from hie_schemas.contract import RPCS, Kind, Operation, rpc_subject, subject

ACCOUNTS = (
    Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "overlays" / "central" / "nats" / "accounts.conf"
)
ATTACKER, VICTIM, THIRD = "snubh", "severance", "cnuh"


def _password(var: str) -> str:
    return f"attack-{var.lower()}"


@pytest.fixture(scope="module")
def accounts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    text = ACCOUNTS.read_text()
    folder = tmp_path_factory.mktemp("nats-accounts-attack")
    (folder / "accounts.conf").write_text(text)
    port = free_port()
    (folder / "server.conf").write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"jetstream {{ store_dir: {folder / 'js'} }}\n"
        "system_account: SYS\n"
        "include accounts.conf\n"
    )
    env = {**os.environ, **{v: _password(v) for v in set(re.findall(r"\$([A-Z0-9_]+_PASSWORD)", text))}}
    log = folder / "nats.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [find_nats_server(), "-c", str(folder / "server.conf")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port("127.0.0.1", port, 30.0, process)
            yield port, log
        finally:
            process.terminate()
            process.wait(30)


def _url(port: int, user: str) -> str:
    var = user.upper().replace("-", "_") + "_PASSWORD"
    return f"nats://{user}:{_password(var)}@127.0.0.1:{port}"


Attempt = Callable[[Any], Awaitable[Any]]
SEARCH = RPCS[Operation.HUB_SEARCH]


def _forge(kind: Kind, to: str | None = None) -> tuple[Attempt, str, str]:
    """The attacker publishes ``kind`` on the subject the victim hub would use (its slug as sender)."""
    where = subject(kind, to=to, sender=VICTIM)
    return (lambda nc: nc.publish(where, b"{}")), where, "Publish"


# The real subjects of the bus contract (hie_schemas.contract), not look-alikes.
ATTEMPTS: dict[str, tuple[Attempt, str, str]] = {
    # name: (attempt, the subject the server names, the kind of violation)
    "a delivery into a third hub's inbox, as the victim hub": _forge(Kind.DELIVERY, to=THIRD),
    "a document-status notice as the victim hub (entered-in-error)": _forge(Kind.DOCUMENT_STATUS, to=THIRD),
    "a task-status notice as the victim hub": _forge(Kind.TASK_STATUS, to=THIRD),
    "an exchange-sent fact as the victim hub (a gateway relays on it)": _forge(Kind.EXCHANGE_SENT),
    "a document-published fact as the victim hub (the record locator)": _forge(Kind.DOCUMENT_PUBLISHED),
    "a study-progress report as the victim's gateway": _forge(Kind.STUDY_PROGRESS),
    "an audit checkpoint as the victim hub": _forge(Kind.AUDIT_CHECKPOINT),
    # A false access in a patient's history (the consent service keeps what hubs audit).
    "an audit record as the victim hub": _forge(Kind.AUDIT_RECORDED),
    # ...and on the subject every service shared before it named its sender (a record any hub wrote).
    "an audit record that names no hub": (
        lambda nc: nc.publish("hie.audit.record.appended", b"{}"),
        "hie.audit.record.appended",
        "Publish",
    ),
    # An emergency decision the consent service would record as the victim hub's disclosure.
    "a consent decision request as the victim hub": (
        lambda nc: nc.publish(rpc_subject(Operation.CONSENT_DECIDE, sender=VICTIM), b"{}"),
        rpc_subject(Operation.CONSENT_DECIDE, sender=VICTIM),
        "Publish",
    ),
    "a job on another hub's imaging relay queue": (
        lambda nc: nc.publish(subject(Kind.RELAY_JOB, to=VICTIM), b"{}"),
        subject(Kind.RELAY_JOB, to=VICTIM),
        "Publish",
    ),
    "a consent decision request that names no hub": (
        lambda nc: nc.publish("hie.rpc.consent.decide", b"{}"),
        "hie.rpc.consent.decide",
        "Publish",
    ),
    "answering another hub's federated search": (
        lambda nc: nc.subscribe(SEARCH.pattern(to=VICTIM)),
        SEARCH.pattern(to=VICTIM),
        "Subscription",
    ),
    "a registry fact (suspending an institution)": (
        lambda nc: nc.publish(subject(Kind.INSTITUTION_CHANGED), b"{}"),
        subject(Kind.INSTITUTION_CHANGED),
        "Publish",
    ),
    "a consent fact (a patient's consent)": (
        lambda nc: nc.publish(subject(Kind.CONSENT_RECORDED), b"{}"),
        subject(Kind.CONSENT_RECORDED),
        "Publish",
    ),
}


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
async def test_a_hub_on_another_hubs_subjects_is_refused_and_logged(
    accounts_server: tuple[int, Path], attempt: str
) -> None:
    port, log = accounts_server
    act, subject, kind = ATTEMPTS[attempt]
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(_url(port, f"hub-{ATTACKER}"), error_cb=on_error, connect_timeout=10)
    try:
        await act(nc)
        await nc.flush(timeout=10)
        deadline = asyncio.get_running_loop().time() + 30
        while not errors:  # the server's -ERR arrives asynchronously
            assert asyncio.get_running_loop().time() < deadline, f"hub-{ATTACKER} was allowed: {attempt}"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert any("permissions violation" in e.lower() and subject in e for e in errors), errors
    # The server's own log names the violation, the user and the subject.
    deadline = asyncio.get_running_loop().time() + 30
    # e.g. [ERR] ... - "HUB_SNUBH/user:hub-snubh" - Publish Violation - Subject "hie.hub.x.inbox.other"
    pattern = re.compile(rf'user:hub-{ATTACKER}" - {kind} Violation - Subject "{re.escape(subject)}"')
    while not pattern.search(log.read_text(errors="replace")):
        assert asyncio.get_running_loop().time() < deadline, f"no log line for: {attempt}"
        await asyncio.sleep(0.05)
