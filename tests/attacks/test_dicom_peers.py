"""Who may connect to the imaging gateway's SCP (issue 12, points 8 and 9), against the attack
federation's real gateway: a registered AE title only from its registered host, and a flood of
silent connections and idle associations that cannot keep a registered peer out.

Loopback addresses other than 127.0.0.1 stand for other hosts: on Linux a client socket can be bound
to any 127.0.0.x. pynetdicom and raw sockets take a source address; DCMTK's echoscu does not, so it
plays the registered peer on 127.0.0.1, where the seeded clinic's PACS is registered.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from attacks_support import AGENCY, CLINIC_AE, GATEWAY_AE, SEVERANCE_CLINIC_2, AttackFederation, LogTap
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

VERIFICATION = "1.2.840.10008.1.1"
OTHER_PACS = f"PACS{SEVERANCE_CLINIC_2}"  # the second severance clinic's PACS, moved to OTHER_HOST
OTHER_HOST = "127.0.0.2"
ANONYMOUS = [f"127.0.0.{n}" for n in range(3, 8)]  # registered for no one
REJECTED_CALLING_AE = "rejected (1, 1, 3)"  # PS3.8 §9.3.4: permanent, service user, calling AE unknown
LIMIT_EXCEEDED_RJ = b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"  # transient, provider, local limit


@pytest.fixture(scope="module")
def gateway(attack_federation: AttackFederation) -> tuple[str, int]:
    settings = attack_federation.services["imaging"].settings
    return "127.0.0.1", int(settings.dicom_port)


def _register(fed: AttackFederation, host: str, port: int) -> None:
    with fed.http("registry") as http:
        response = http.put(
            f"/institutions/{SEVERANCE_CLINIC_2}/dicom",
            json={"ae_title": OTHER_PACS, "host": host, "port": port},
            headers={"Authorization": f"Bearer {fed.token(AGENCY)}"},
        )
    assert response.status_code == 200, response.text


def associate(gateway: tuple[str, int], calling: str, source: str, called: str = GATEWAY_AE) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(VERIFICATION, ImplicitVRLittleEndian)
    return ae.associate(*gateway, ae_title=called, bind_address=(source, 0))


def echo_from(gateway: tuple[str, int], calling: str, source: str) -> str:
    """ "served" (C-ECHO answered with Success), "rejected (result, source, reason)" with the
    A-ASSOCIATE-RJ's fields, or what else happened ("aborted", "echo failed")."""
    assoc = associate(gateway, calling, source)
    try:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            assert rj is not None
            return f"rejected {(int(rj.result), int(rj.result_source), int(rj.diagnostic))}"
        if not assoc.is_established:
            return "aborted" if assoc.is_aborted else "not established"
        return "served" if assoc.send_c_echo().Status == 0x0000 else "echo failed"
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture(scope="module")
def other_pacs(attack_federation: AttackFederation, gateway: tuple[str, int]) -> Iterator[str]:
    """OTHER_PACS registered at OTHER_HOST, once the gateway has taken the change in; the seeded
    registration (127.0.0.1, port 104) again afterwards."""
    _register(attack_federation, OTHER_HOST, 11112)
    deadline = time.monotonic() + 60
    while echo_from(gateway, OTHER_PACS, OTHER_HOST) != "served":
        assert time.monotonic() < deadline, "the gateway never took OTHER_PACS's new host in"
        time.sleep(0.2)
    yield OTHER_PACS
    _register(attack_federation, "127.0.0.1", 104)


def metric(fed: AttackFederation, name: str, **labels: str) -> float:
    text = httpx.get(f"{fed.url('imaging')}/metrics", timeout=30).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def dcmtk_tool(name: str) -> str | None:
    """DCMTK's ``name``, never pynetdicom's same-named app in this virtualenv's bin (other options)."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs))


def dcmtk_echo(gateway: tuple[str, int], calling: str) -> subprocess.CompletedProcess[str]:
    """DCMTK's echoscu as `calling`, from 127.0.0.1, with its own short timeouts and no retry."""
    echoscu = dcmtk_tool("echoscu")
    if echoscu is None:
        pytest.skip("DCMTK not installed (echoscu); apt-get install dcmtk")
    args = [echoscu, "-to", "10", "-ta", "10", "-td", "10", "-aet", calling, "-aec", GATEWAY_AE]
    return subprocess.run(
        [*args, *map(str, gateway)], capture_output=True, text=True, timeout=60, check=False
    )


# --- point 8: a registered AE title only from its registered host ---------------------------------


def test_a_registered_ae_from_another_host_is_rejected(
    attack_federation: AttackFederation, log_tap: LogTap, gateway: tuple[str, int], other_pacs: str
) -> None:
    before = metric(attack_federation, "hie_imaging_dicom_refusals_total", reason="wrong-host")

    # The seeded clinic's PACS is registered at 127.0.0.1: its title from 127.0.0.2 is refused ...
    assert echo_from(gateway, CLINIC_AE, OTHER_HOST) == REJECTED_CALLING_AE
    log_tap.wait_for(
        "the wrong-host refusal",
        lambda e: (
            e.get("event") == "association refused: calling AE not registered for this address"
            and e.get("calling_ae") == CLINIC_AE
            and e.get("address") == OTHER_HOST
        ),
    )
    # ... and OTHER_PACS, now registered at 127.0.0.2, is refused from 127.0.0.1 and 127.0.0.3.
    assert echo_from(gateway, other_pacs, "127.0.0.1") == REJECTED_CALLING_AE
    assert echo_from(gateway, other_pacs, ANONYMOUS[0]) == REJECTED_CALLING_AE
    assert metric(attack_federation, "hie_imaging_dicom_refusals_total", reason="wrong-host") >= before + 3

    # From their registered hosts both are served: OTHER_PACS with pynetdicom, the seeded one with
    # DCMTK's echoscu.
    assert echo_from(gateway, other_pacs, OTHER_HOST) == "served"
    result = dcmtk_echo(gateway, CLINIC_AE)
    assert result.returncode == 0, result.stdout + result.stderr


# --- point 9: a flood does not keep a registered peer out -----------------------------------------


def _silent(gateway: tuple[str, int], source: str) -> socket.socket:
    return socket.create_connection(gateway, timeout=60, source_address=(source, 0))


def _closed_by_peer(sock: socket.socket) -> bytes | None:
    """What the gateway sent before closing the connection, or None while it is still open."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return None
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _wait_all_closed(socks: list[socket.socket], what: str, timeout: float) -> list[bytes]:
    """Poll (with a deadline) until the gateway has closed every one of `socks`."""
    replies: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(socks):
        for i, sock in enumerate(socks):
            if i not in replies and (reply := _closed_by_peer(sock)) is not None:
                replies[i] = reply
        if len(replies) < len(socks):
            assert time.monotonic() < deadline, f"{len(socks) - len(replies)} {what} still open"
            time.sleep(0.05)
    return [replies[i] for i in range(len(socks))]


def _shared_taken(held: dict[str, int], reserved: int) -> int:
    """Slots held by the flood beyond the rogue peer's reserved one (127.0.0.1 is the test's own)."""
    return sum(n for address, n in held.items() if address != "127.0.0.1") - reserved


def test_silent_connections_and_idle_associations_do_not_keep_a_registered_peer_out(
    attack_federation: AttackFederation, gateway: tuple[str, int], other_pacs: str
) -> None:
    settings = attack_federation.services["imaging"].settings
    gate = attack_federation.services["imaging"].running.server.config.app.state.gateway.server.gate
    per_peer, reserved = settings.dicom_max_connections_per_peer, settings.dicom_reserved_per_caller
    closed_before = metric(
        attack_federation, "hie_imaging_dicom_refusals_total", reason="no-association-request"
    )
    idle: list[Association] = []
    silent: list[socket.socket] = []
    anonymous: list[socket.socket] = []
    try:
        # A registered peer gone rogue, from its registered host: 16 idle associations, then 40
        # silent TCP connections. It gets its reserved slot and its share of the others, no more.
        for _ in range(16):
            assoc = associate(gateway, other_pacs, OTHER_HOST)
            if assoc.is_established:
                idle.append(assoc)
        assert 1 <= len(idle) <= per_peer + reserved
        silent = [_silent(gateway, OTHER_HOST) for _ in range(40)]
        # Every one of them is refused at once with A-ASSOCIATE-RJ "local limit exceeded".
        refused = _wait_all_closed(silent, "silent connections from the rogue peer", 60)
        assert all(reply == LIMIT_EXCEEDED_RJ for reply in refused), {r[:10] for r in refused}
        assert gate.held().get(OTHER_HOST, 0) <= per_peer + reserved

        # Anonymous hosts fill every shared slot that is left with silent connections.
        anonymous = [_silent(gateway, host) for host in ANONYMOUS for _ in range(per_peer)]
        deadline = time.monotonic() + 30
        while _shared_taken(gate.held(), reserved) < settings.dicom_max_associations:
            assert time.monotonic() < deadline, f"the shared slots were never all taken: {gate.held()}"
            time.sleep(0.02)

        # The seeded clinic's PACS, from its registered host, is served at once (DCMTK echoscu).
        result = dcmtk_echo(gateway, CLINIC_AE)
        assert result.returncode == 0, result.stdout + result.stderr

        # The anonymous connections that got a slot never sent an A-ASSOCIATE-RQ: the gateway closes
        # them after its request timeout (seconds, not pynetdicom's 30 s ACSE default).
        timeout = float(settings.dicom_request_timeout_seconds)
        _wait_all_closed(anonymous, "silent anonymous connections", 3 * timeout)
        assert (
            metric(attack_federation, "hie_imaging_dicom_refusals_total", reason="no-association-request")
            > closed_before
        )
        result = dcmtk_echo(gateway, CLINIC_AE)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in silent + anonymous:
            sock.close()
        for assoc in idle:
            with contextlib.suppress(Exception):
                assoc.release()
