"""Issue 12 (points 1 and 3, images): an emergency exchange's images travel with its justification.

The hub's ExchangeSent carries the emergency's justification; both gateways keep it on the study link
and decide each relay batch with it, so the series of an emergency referral of a patient with no
consent reaches the recipient's PACS (a DCMTK storescp), audited as flagged with the justification,
while the same referral without an emergency stays blocked. Real gateway apps on real databases, a
real registry and nats-server, DCMTK storescu/storescp."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_harness import (
    SEVERANCE,
    SNUBH,
    counts,
    new_patient_key,
    publish_exchange,
    referral,
    study_of,
    until_count,
)
from nats.aio.client import Client as NatsClient
from sqlalchemy import select
from test_gateway import assert_same_pixels, hospital_pacs, storescu

from hie_imaging.models import Base
from hie_platform.db import Database
from hie_schemas.consent import Purpose

if TYPE_CHECKING:
    from conftest import Dcmtk, MakeSeries, StartGatewayApp, StartStorescp
    from gateway_harness import ConsentDesk, Federation, GatewayApp

pytestmark = pytest.mark.dcmtk
WHY = "의식 없는 응급환자, 보호자 없음 (unconscious, no guardian)"


async def test_an_emergency_referral_relays_its_series_without_consent(
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
    patient = new_patient_key()  # no consent on record
    emergency_series, treatment_series = make_series(4), make_series(3)
    emergency, treatment = study_of(emergency_series), study_of(treatment_series)
    sent = referral(emergency, patient).model_copy(
        update={"purpose": Purpose.EMERGENCY, "justification": WHY}
    )
    await publish_exchange(nats_client, sent)
    await publish_exchange(nats_client, referral(treatment, patient))

    assert (await storescu(dcmtk, imaging_federation, emergency_series)).returncode == 0
    assert (await storescu(dcmtk, imaging_federation, treatment_series)).returncode == 0
    # Before: deny-emergency-without-justification at the origin gateway, nothing relayed.
    delivered = await until_count(hub2, emergency, "delivered", 4)
    assert counts(delivered, "delivered", "state", "exchange_id") == {
        "delivered": 4,
        "state": "delivered",
        "exchange_id": sent.exchange_id,
    }
    blocked = await until_count(hub1, treatment, "blocked", 3)
    assert counts(blocked, "blocked", "relayed", "state") == {"blocked": 3, "relayed": 0, "state": "blocked"}
    assert await hub2.status(treatment) is None
    assert_same_pixels(pacs, emergency_series)

    relayed = [
        r
        for r in await audit_records(hub1)
        if r["action"] == "imaging.relayed" and r["detail"]["exchange_id"] == sent.exchange_id
    ]
    assert relayed
    assert all(r["purpose"] == "emergency" and r["detail"]["flagged"] for r in relayed)
    assert all(r["detail"]["justification"] == WHY for r in relayed)


async def audit_records(app: GatewayApp) -> list[dict[str, Any]]:
    db = Database(app.settings.database_url, app.settings.database_schema)
    try:
        async with db.read_sessions() as session:
            result = await session.execute(select(Base.metadata.tables["audit_log"].c.record))
            return [dict(record) for record in result.scalars()]
    finally:
        await db.dispose()
