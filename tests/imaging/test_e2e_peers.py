"""Issue 6, done-when: the gateways as real processes between real DICOM peers.

DCMTK `storescu` (TCP_NODELAY=1) at the referring clinic, the hub 1 and hub 2 gateways each a
`python -m hie_imaging` process on its own SQLite file, Orthanc or DCMTK `storescp` as the receiving
hospital's PACS, the registry and nats-server of the imaging federation, and the real consent rule
answering the decision subject.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from gateway_harness import (
    CLINIC_AE,
    HOSPITAL,
    SEVERANCE,
    SNUBH,
    ConsentDesk,
    Federation,
    new_patient_key,
    publish_exchange,
    referral,
    study_of,
    until,
)
from nats.aio.client import Client as NatsClient
from peers import GatewayProcess, Orthanc, ct_series, dataset_bytes, sop_uid

from hie_imaging.dicom import AssociationFailedError, send_files

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Dcmtk, DcmtkPeer, StartStorescp

    StartProcess = Callable[..., GatewayProcess]

pytestmark = pytest.mark.dcmtk

SERIES = 300  # a CT series as the issue names it
MEMORY_HEADROOM_KIB = 40 * 1024  # peak RSS after 300 more instances may exceed the 50-instance peak by this


async def storescu(dcmtk: Dcmtk, gateway: GatewayProcess, files: list[Path]) -> None:
    result = await asyncio.to_thread(dcmtk.scu, "storescu", CLINIC_AE, gateway.endpoint, files=files)
    assert result.returncode == 0, result.stderr


async def refer_with_consent(
    nats_client: NatsClient, consent_desk: ConsentDesk, *gateways: GatewayProcess, study: str
) -> str:
    """The clinic refers the patient (with consent on record); returns once every gateway linked it."""
    patient = new_patient_key()
    consent_desk.consent(patient)
    sent = referral(study, patient)
    await publish_exchange(nats_client, sent)
    for gateway in gateways:

        async def linked(gateway: GatewayProcess = gateway) -> bool:
            return (await gateway.rows(study))["links"] == 1

        await until(linked, f"the {gateway.hub} gateway to link the study", timeout=60)
    return sent.exchange_id


async def until_status(
    gateway: GatewayProcess, study: str, key: str, n: int, timeout: float
) -> dict[str, int]:
    async def probe() -> dict[str, int] | None:
        status = await gateway.status(study)
        return status if status is not None and status[key] >= n else None

    return await until(probe, f"{key} >= {n} at {gateway.hub}", timeout)


def assert_bit_identical(received: dict[str, bytes], sent: list[Path]) -> None:
    """Every sent instance arrived once, its dataset byte for byte as the modality wrote it."""
    assert sorted(received) == sorted(sop_uid(path) for path in sent)
    for path in sent:
        assert dataset_bytes(received[sop_uid(path)]) == dataset_bytes(path.read_bytes()), path.name


def storescp_by_uid(pacs: DcmtkPeer) -> dict[str, bytes]:
    """storescp (+uf) writes a file per C-STORE it accepted: a duplicate is a second file."""
    files = pacs.files()
    by_uid = {sop_uid(path): path.read_bytes() for path in files}
    assert len(by_uid) == len(files), f"{len(files) - len(by_uid)} instances were delivered twice"
    return by_uid


# --- a 300-instance CT series, storescu → hub 1 → hub 2 → Orthanc; memory on the way ------------------


async def test_ct_series_arrives_bit_identical_at_orthanc_behind_hub_2_and_memory_stays_flat(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_processes: StartProcess,
    orthanc: Orthanc,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    await imaging_federation.set_dicom(HOSPITAL, orthanc.endpoint)
    hub1, hub2 = gateway_processes(SEVERANCE), gateway_processes(SNUBH)
    small, series = ct_series(tmp_path / "small", 50, seed=1), ct_series(tmp_path / "ct", SERIES, seed=2)
    peaks: dict[int, dict[str, int]] = {}
    exchanges = {}
    for sent in (small, series):
        study = study_of(sent)
        exchanges[study] = await refer_with_consent(nats_client, consent_desk, hub1, hub2, study=study)
        await storescu(dcmtk, hub1, sent)
        await until_status(hub2, study, "delivered", len(sent), timeout=240)
        # VmHWM: the peak resident memory since the process started.
        peaks[len(sent)] = {"hub 1": hub1.peak_rss_kib(), "hub 2": hub2.peak_rss_kib()}

    study = study_of(series)
    delivered = await hub2.status(study)
    assert delivered is not None
    assert {k: delivered[k] for k in ("received", "delivered", "failed", "state", "exchange_id")} == {
        "received": SERIES,
        "delivered": SERIES,
        "failed": 0,
        "state": "delivered",
        "exchange_id": exchanges[study],
    }
    relayed = await hub1.status(study)
    assert relayed is not None
    assert (relayed["relayed"], relayed["failed"], relayed["held"]) == (SERIES, 0, 0)
    assert_bit_identical(await asyncio.to_thread(orthanc.study_files, study), series)
    assert_bit_identical(await asyncio.to_thread(orthanc.study_files, study_of(small)), small)

    # The spool holds a study, not the process: six times the instances may not cost six times the
    # memory (a generous bound on a memory figure, not a timing).
    print(
        f"\ngateway peak RSS (VmHWM, KiB) after 50 instances {peaks[50]}, after {SERIES} more {peaks[SERIES]}"
    )
    for gateway in ("hub 1", "hub 2"):
        assert peaks[SERIES][gateway] < peaks[50][gateway] + MEMORY_HEADROOM_KIB, gateway


# --- no consent: nothing leaves hub 1 ---------------------------------------------------------------


async def test_without_consent_nothing_is_relayed_to_orthanc(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_processes: StartProcess,
    orthanc: Orthanc,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    await imaging_federation.set_dicom(HOSPITAL, orthanc.endpoint)
    hub1, hub2 = gateway_processes(SEVERANCE), gateway_processes(SNUBH)
    series = ct_series(tmp_path / "ct", 10, seed=2)
    study = study_of(series)
    await publish_exchange(nats_client, referral(study, new_patient_key()))  # no consent on record

    async def linked() -> bool:
        return (await hub1.rows(study))["links"] == 1

    await until(linked, "hub 1 to link the study", timeout=60)
    await storescu(dcmtk, hub1, series)

    # The decision is final once every instance is blocked; only then is "nothing" meaningful.
    blocked = await until_status(hub1, study, "blocked", 10, timeout=60)
    assert (blocked["relayed"], blocked["queued"], blocked["state"]) == (0, 0, "blocked")
    assert consent_desk.asked >= 1
    assert await hub2.status(study) is None
    assert await hub2.rows(study) == {"links": 1}  # hub 2 knows of the referral, got no instance
    assert await asyncio.to_thread(orthanc.study_files, study) == {}
    assert await asyncio.to_thread(orthanc.instance_count) == 0


# --- SIGKILL in the middle of receiving and relaying ----------------------------------------------------


async def test_gateway_killed_mid_relay_resumes_after_restart_without_loss_or_duplicates(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_processes: StartProcess,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    pacs = start_storescp("+uf")
    await imaging_federation.set_dicom(HOSPITAL, pacs.endpoint)
    hub1, hub2 = gateway_processes(SEVERANCE), gateway_processes(SNUBH)
    series = ct_series(tmp_path / "ct", SERIES, seed=3)
    study = study_of(series)
    await refer_with_consent(nats_client, consent_desk, hub1, hub2, study=study)

    # The clinic's PACS pushes the series (pynetdicom: it tells which C-STOREs were answered before
    # the association broke). Hub 1 is killed while it receives and relays at once.
    outcome: dict[str, int] = {}
    sending_done = threading.Event()

    def push() -> None:
        try:
            outcome.update(send_files(hub1.endpoint, CLINIC_AE, series, timeout=30))
        except AssociationFailedError as exc:
            outcome.update(exc.completed)
        finally:
            sending_done.set()

    sender = threading.Thread(target=push)
    sender.start()

    async def relaying() -> bool:
        rows = await hub2.rows(study)
        return rows.get("delivered", 0) + rows.get("queued", 0) >= 40

    await until(relaying, "hub 2 to receive part of the series", timeout=120)
    hub1.kill()
    await asyncio.to_thread(sender.join, 60)
    assert sending_done.is_set()
    answered = {uid for uid, status in outcome.items() if status == 0x0000}
    rows = await hub1.rows(study)
    assert 0 < len(answered) < SERIES, "the kill was meant to land mid-series"
    assert rows.get("queued", 0) > 0 or rows.get("relayed", 0) < len(answered), "and mid-relay"

    # Restarted, hub 1 records what it had answered but not yet recorded (its spool journal) and
    # resumes the relay: every instance it said Success for reaches the PACS without a resend.
    hub1.start()
    await until_status(hub2, study, "delivered", len(answered), timeout=180)
    assert answered <= set(await asyncio.to_thread(storescp_by_uid, pacs))

    # The clinic's PACS sends the rest again (as a PACS does after a failed association).
    rest = [path for path in series if sop_uid(path) not in answered]
    statuses = await asyncio.to_thread(send_files, hub1.endpoint, CLINIC_AE, rest, 30)
    assert set(statuses.values()) == {0x0000}
    await until_status(hub2, study, "delivered", SERIES, timeout=180)
    assert_bit_identical(await asyncio.to_thread(storescp_by_uid, pacs), series)
    final = await hub1.status(study)
    assert final is not None
    assert (final["received"], final["relayed"], final["failed"]) == (SERIES, SERIES, 0)


async def test_instances_answered_right_before_a_kill_are_recorded_and_relayed_after_restart(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_processes: StartProcess,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    """The recorder writes arrivals to the database in batches, lingering while more keep coming: the
    instances answered last are in the spool journal only, not yet in the database. SIGKILLed the
    moment storescu has its last Success, hub 1 loses none of them: restarted, it records the journal
    and relays everything, each instance once."""
    pacs = start_storescp("+uf")
    await imaging_federation.set_dicom(HOSPITAL, pacs.endpoint)
    hub1, hub2 = gateway_processes(SEVERANCE), gateway_processes(SNUBH)
    series = ct_series(tmp_path / "ct", 60, seed=4)
    study = study_of(series)
    await refer_with_consent(nats_client, consent_desk, hub1, hub2, study=study)

    await storescu(dcmtk, hub1, series)  # every C-STORE answered Success
    hub1.kill()
    journal = hub1.folder / "spool" / "incoming"
    left = sum(1 for entry in os.scandir(journal) if "~" in entry.name) if journal.is_dir() else 0
    print(f"answered but not yet recorded when killed: {left} of {len(series)}")

    hub1.start()
    await until_status(hub2, study, "delivered", len(series), timeout=180)
    assert_bit_identical(await asyncio.to_thread(storescp_by_uid, pacs), series)
    final = await hub1.status(study)
    assert final is not None
    assert (final["received"], final["relayed"], final["failed"]) == (len(series), len(series), 0)


def test_a_gateway_that_cannot_bind_its_dicom_port_exits(
    gateway_processes: StartProcess, tmp_path: Path
) -> None:
    """A failed start ends the process. Seen in a full run: with its DICOM port in use, a gateway logged
    "Application startup failed" and then kept polling NATS from its relay and consent feed, never
    exiting, because what had started before the bind was not stopped (hie up waited 90 s for it)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with pytest.raises(AssertionError, match="gateway exited"):
            gateway_processes(SEVERANCE, DICOM_PORT=port)
    assert "Address already in use" in (tmp_path / f"gateway-{SEVERANCE}" / "gateway.log").read_text()
