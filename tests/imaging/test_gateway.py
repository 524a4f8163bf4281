"""The imaging gateway service end to end: DCMTK storescu at a clinic PACS, two real gateway apps
(severance → snubh) on real databases, a real registry and nats-server, a DCMTK storescp as the
receiving hospital's PACS, and the real consent rule answering the decision subject."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from gateway_harness import (
    CLINIC_AE,
    HOSPITAL,
    HUB_CODES,
    SEVERANCE,
    SNUBH,
    ConsentDesk,
    ProgressLog,
    counts,
    last_progress,
    new_patient_key,
    one_more_instance,
    publish_exchange,
    referral,
    study_of,
    until,
    until_count,
)
from nats.aio.client import Client as NatsClient
from pydicom import dcmread

from hie_imaging.dicom import DicomEndpoint
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope, Source

if TYPE_CHECKING:
    from conftest import Dcmtk, DcmtkPeer, MakeSeries, StartGatewayApp, StartStorescp
    from gateway_harness import Federation

pytestmark = pytest.mark.dcmtk
sqlite_only = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


async def storescu(
    dcmtk: Dcmtk, federation: Federation, files: list[Path], calling_ae: str = CLINIC_AE
) -> subprocess.CompletedProcess[str]:
    """The clinic's PACS pushes files to the severance gateway (one association, TCP_NODELAY).

    In a thread: the gateways run on this event loop, and each C-STORE waits for their commit.
    """
    endpoint = federation.gateway(SEVERANCE)
    return await asyncio.to_thread(dcmtk.scu, "storescu", calling_ae, endpoint, files=files)


async def hospital_pacs(start_storescp: StartStorescp, federation: Federation) -> DcmtkPeer:
    """The snubh hospital's PACS: a storescp writing one file per C-STORE (+uf), in the registry."""
    pacs = start_storescp("+uf")
    await federation.set_dicom(HOSPITAL, pacs.endpoint)
    return pacs


def assert_same_pixels(pacs: DcmtkPeer, sources: list[Path]) -> None:
    received = {str(ds.SOPInstanceUID): ds for ds in (dcmread(path) for path in pacs.files())}
    assert len(received) == len(sources)
    for path in sources:
        source = dcmread(path)
        assert received[str(source.SOPInstanceUID)].PixelData == source.PixelData


# --- (1) the referral flow ----------------------------------------------------------------------


async def test_referral_series_is_relayed_and_delivered_once(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
    tmp_path: Path,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    series = make_series(20)
    study = study_of(series)
    patient = new_patient_key()
    consent_desk.consent(patient)
    sent = referral(study, patient)
    progress = await ProgressLog(nats_client).start()
    await publish_exchange(nats_client, sent)

    async def linked() -> bool:
        return (await hub1.rows(study))["links"] == 1 and (await hub2.rows(study))["links"] == 1

    await until(linked, "both gateways to link the study to the referral")

    started = time.perf_counter()
    result = await storescu(dcmtk, imaging_federation, series)
    assert result.returncode == 0, result.stderr
    delivered = await until_count(hub2, study, "delivered", 20)
    elapsed = time.perf_counter() - started
    print(f"\nrelay throughput: 20 instances clinic -> hub 1 -> hub 2 -> PACS in {elapsed:.2f} s")

    assert_same_pixels(pacs, series)
    assert counts(delivered, "received", "delivered", "queued", "state", "exchange_id") == {
        "received": 20,
        "delivered": 20,
        "queued": 0,
        "state": "delivered",
        "exchange_id": sent.exchange_id,
    }
    relayed = await hub1.status(study)
    assert counts(relayed, "received", "relayed", "held", "blocked", "failed", "state") == {
        "received": 20,
        "relayed": 20,
        "held": 0,
        "blocked": 0,
        "failed": 0,
        "state": "relayed",
    }
    # A series goes over few associations, not one per instance.
    assert 1 <= await hub1.metric("hie_imaging_associations_total", outcome="ok") <= 10
    # Progress events are coalesced (not one per instance) and end with the delivered count.
    final = await until(
        lambda: last_progress(progress, study, SNUBH, 20), "the final progress event at hub 2"
    )
    assert (final.delivered, final.state, final.exchange_id) == (20, "delivered", sent.exchange_id)
    assert 1 <= len(progress.of(study, SEVERANCE)) < 20

    # The PACS sends the series again: every C-STORE succeeds, nothing travels twice. One new
    # instance of the same study follows; once it is delivered, the resend has been dealt with too.
    again = await storescu(dcmtk, imaging_federation, series)
    assert again.returncode == 0, again.stderr
    late = one_more_instance(series, tmp_path / "late.dcm")
    assert (await storescu(dcmtk, imaging_federation, [late])).returncode == 0
    await until_count(hub2, study, "delivered", 21)
    assert len(pacs.files()) == 21
    assert await hub1.metric("hie_imaging_instances_received_total", role="origin", result="duplicate") == 20
    assert consent_desk.asked >= 1


# --- (2) a study that arrives before its referral -----------------------------------------------


async def test_study_sent_before_its_referral_waits_then_goes(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    series = make_series(5)
    study = study_of(series)

    assert (await storescu(dcmtk, imaging_federation, series)).returncode == 0
    # Success means durable in the spool; the rows follow a moment later (recorded in batches).
    held = await until_count(hub1, study, "held", 5)
    assert counts(held, "received", "held", "queued", "state", "exchange_id") == {
        "received": 5,
        "held": 5,
        "queued": 0,
        "state": "held",
        "exchange_id": None,
    }
    assert await hub2.status(study) is None
    assert pacs.files() == []

    patient = new_patient_key()
    consent_desk.consent(patient)
    sent = referral(study, patient)
    await publish_exchange(nats_client, sent)

    delivered = await until_count(hub2, study, "delivered", 5)
    assert delivered["exchange_id"] == sent.exchange_id
    assert counts(await hub1.status(study), "relayed", "held") == {"relayed": 5, "held": 0}
    assert_same_pixels(pacs, series)


@sqlite_only
async def test_referral_within_the_hub_goes_straight_to_the_recipient_pacs(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = start_storescp("+uf")  # the severance hospital's PACS: same hub as the referring clinic
    await imaging_federation.set_dicom(HUB_CODES[SEVERANCE], pacs.endpoint)
    hub1 = await gateway_apps(SEVERANCE)
    series, patient = make_series(4), new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study_of(series), patient, to_hub=SEVERANCE))

    assert (await storescu(dcmtk, imaging_federation, series)).returncode == 0
    delivered = await until_count(hub1, study_of(series), "delivered", 4)
    assert counts(delivered, "relayed", "state") == {"relayed": 0, "state": "delivered"}
    assert_same_pixels(pacs, series)


# --- (3) no exchange: held, never sent, purged after the hold period ------------------------------


@sqlite_only
async def test_study_without_exchange_is_held_and_purged_after_the_hold_period(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    orphan, referred = make_series(4), make_series(3)
    patient = new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study_of(referred), patient))

    assert (await storescu(dcmtk, imaging_federation, orphan)).returncode == 0
    assert (await storescu(dcmtk, imaging_federation, referred)).returncode == 0
    # The referred study went all the way; the orphan sent before it is still where it was.
    await until_count(hub2, study_of(referred), "delivered", 3)
    assert_same_pixels(pacs, referred)
    held = await hub1.status(study_of(orphan))
    assert counts(held, "received", "held", "relayed", "state") == {
        "received": 4,
        "held": 4,
        "relayed": 0,
        "state": "held",
    }
    assert await hub2.status(study_of(orphan)) is None

    # The purge pass a day later: the files leave the spool, the rows say purged.
    gateway = hub1.gateway
    spooled = [gateway.spool.path(str(dcmread(path).SOPInstanceUID)) for path in orphan]
    assert all(path.is_file() for path in spooled)
    assert await gateway.purge_held(now=datetime.now(UTC) + timedelta(days=1, minutes=1)) == 4
    assert not any(path.is_file() for path in spooled)
    purged = await hub1.status(study_of(orphan))
    assert counts(purged, "held", "purged", "state") == {"held": 0, "purged": 4, "state": "purged"}
    assert counts(await hub1.status(study_of(referred)), "relayed") == {"relayed": 3}


async def test_an_exchange_another_hub_publishes_for_the_clinic_relays_nothing(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    """Issue 12 point 5: snubh publishes an ExchangeSent that claims the severance clinic sent a
    study; the gateway believes the subject's sending hub, refuses it, and keeps the study held."""
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    held, honest = make_series(3), make_series(2)
    patient = new_patient_key()
    consent_desk.consent(patient)
    assert (await storescu(dcmtk, imaging_federation, held)).returncode == 0
    forged = Envelope.wrap(referral(study_of(held), patient), Source(service="hub-node", node="hub-snubh"))
    await nats_client.jetstream().publish(
        subject(Kind.EXCHANGE_SENT, sender=SNUBH), forged.to_bytes(), headers={"Nats-Msg-Id": forged.id}
    )
    await publish_exchange(nats_client, referral(study_of(honest), patient))  # behind it on the stream
    assert (await storescu(dcmtk, imaging_federation, honest)).returncode == 0
    await until_count(hub2, study_of(honest), "delivered", 2)
    assert_same_pixels(pacs, honest)
    assert counts(await hub1.status(study_of(held)), "held", "relayed", "state") == {
        "held": 3,
        "relayed": 0,
        "state": "held",
    }


# --- (4) consent withdrawn or never given: blocked ----------------------------------------------


@sqlite_only
async def test_denied_consent_blocks_the_study_at_the_origin(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    series = make_series(3)
    study = study_of(series)
    await publish_exchange(nats_client, referral(study, new_patient_key()))  # no consent on record

    assert (await storescu(dcmtk, imaging_federation, series)).returncode == 0
    blocked = await until_count(hub1, study, "blocked", 3)
    assert counts(blocked, "blocked", "relayed", "queued", "state") == {
        "blocked": 3,
        "relayed": 0,
        "queued": 0,
        "state": "blocked",
    }
    assert await hub2.status(study) is None
    assert pacs.files() == []
    assert consent_desk.asked >= 1
    # The clinic that sent the study may see where it stands; an unrelated clinic may not.
    assert await hub1.status(study, client_id="11301001") is not None
    assert await hub1.status(study, client_id="11301002") is None
    # It was answered Success when it stored them; the operator sees, per sender, what it cannot.
    assert await hub1.metric("hie_imaging_instances_blocked_by_sender_total", sender="11301001") == 3


@sqlite_only
async def test_without_a_consent_answer_nothing_leaves_until_one_comes(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    series = make_series(2)
    study = study_of(series)
    patient = new_patient_key()
    await publish_exchange(nats_client, referral(study, patient))  # the consent service is down

    assert (await storescu(dcmtk, imaging_federation, series)).returncode == 0

    async def asked_in_vain() -> bool:
        return await hub1.metric("hie_imaging_consent_unavailable_total") >= 2

    await until(asked_in_vain, "the gateway to ask for consent and get no answer")
    waiting = await hub1.status(study)
    assert counts(waiting, "queued", "relayed", "attempts") == {"queued": 2, "relayed": 0, "attempts": 0}
    assert await hub2.status(study) is None

    desk = await ConsentDesk(nats_client).start()  # the decision point is back
    try:
        desk.consent(patient)
        await until_count(hub2, study, "delivered", 2)
    finally:
        await desk.stop()
    assert_same_pixels(pacs, series)


# --- (5) the allow-list ---------------------------------------------------------------------------


@sqlite_only
async def test_unknown_calling_ae_is_rejected_and_a_newly_registered_pacs_is_let_in(
    dcmtk: Dcmtk, imaging_federation: Federation, gateway_apps: StartGatewayApp, make_series: MakeSeries
) -> None:
    hub1 = await gateway_apps(SEVERANCE)
    series = make_series(2)

    rejected = await storescu(dcmtk, imaging_federation, series, calling_ae="STRANGER")
    assert rejected.returncode != 0
    assert "Calling AE Title Not Recognized" in rejected.stderr + rejected.stdout
    assert await hub1.status(study_of(series)) is None

    # The agency registers a clinic's new PACS: it may associate without a gateway restart.
    new_ae = f"NEWPACS{int(time.time()) % 10**6:06d}"
    await imaging_federation.set_dicom("11301002", dcmtk_endpoint(new_ae))

    async def admitted() -> bool:
        # The registry's change event (or, 5 s after the last miss, a fresh read) updates the list.
        return (await storescu(dcmtk, imaging_federation, series, calling_ae=new_ae)).returncode == 0

    await until(admitted, "the gateway to admit the newly registered PACS", timeout=15)
    await until_count(hub1, study_of(series), "held", 2)
    status = await hub1.status(study_of(series), client_id="11301002")
    assert counts(status, "received", "held") == {"received": 2, "held": 2}


def dcmtk_endpoint(ae_title: str) -> DicomEndpoint:
    return DicomEndpoint(ae_title, "127.0.0.1", 104)


# --- (6) the destination PACS is down for a while -------------------------------------------------


@sqlite_only
async def test_destination_pacs_down_then_back_gets_everything_once(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    pacs.stop()
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    series = make_series(6)
    study = study_of(series)
    patient = new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study, patient))

    assert (await storescu(dcmtk, imaging_federation, series)).returncode == 0
    await until_count(hub1, study, "relayed", 6)
    waiting = await until_count(hub2, study, "attempts", 2)
    assert counts(waiting, "queued", "delivered", "state") == {"queued": 6, "delivered": 0, "state": "queued"}

    start_storescp("+uf", port=pacs.endpoint.port, out_dir=pacs.out_dir)
    delivered = await until_count(hub2, study, "delivered", 6)
    assert counts(delivered, "queued", "failed") == {"queued": 0, "failed": 0}
    assert_same_pixels(pacs, series)


@sqlite_only
async def test_after_the_last_attempt_the_instances_are_failed(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    pacs.stop()  # and it never comes back
    await gateway_apps(SEVERANCE)
    hub2 = await gateway_apps(SNUBH, relay_max_attempts=3)
    series = make_series(2)
    study = study_of(series)
    patient = new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study, patient))

    assert (await storescu(dcmtk, imaging_federation, series)).returncode == 0
    failed = await until_count(hub2, study, "failed", 2)
    assert counts(failed, "failed", "queued", "attempts", "state") == {
        "failed": 2,
        "queued": 0,
        "attempts": 3,
        "state": "failed",
    }


# --- (7) restart: nothing lost, queued work resumes ------------------------------------------------


async def test_rows_and_spool_survive_a_restart_and_queued_work_resumes(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs = await hospital_pacs(start_storescp, imaging_federation)
    hub1 = await gateway_apps(SEVERANCE)  # hub 2's gateway is not up yet: nothing can be relayed
    series, orphan = make_series(8), make_series(2)
    study = study_of(series)
    patient = new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study, patient))
    assert (await storescu(dcmtk, imaging_federation, series + orphan)).returncode == 0
    await until_count(hub1, study, "attempts", 1)

    spool = hub1.gateway.spool
    await hub1.stop()
    assert await hub1.rows(study) == {"queued": 8, "links": 1}
    assert await hub1.rows(study_of(orphan)) == {"held": 2, "links": 0}
    assert all(spool.exists(str(dcmread(path).SOPInstanceUID)) for path in series + orphan)

    await hub1.start()
    hub2 = await gateway_apps(SNUBH)
    await until_count(hub2, study, "delivered", 8)
    assert counts(await hub1.status(study), "relayed", "queued") == {"relayed": 8, "queued": 0}
    assert counts(await hub1.status(study_of(orphan)), "held") == {"held": 2}
    assert_same_pixels(pacs, series)
