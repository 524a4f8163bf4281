"""The sending institution sees at its own hub where its study stands (issue 15 point 8): the gateway
answered its PACS Success before consent was decided (store-and-forward), so a study kept back by
consent must be visible somewhere it looks. Real hub nodes, registry and nats-server (SQLite and
PostgreSQL); the gateway's StudyProgress published as its outbox would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from hub_support import SEVERANCE_CLINIC, SEVERANCE_CLINIC_2, SNUBH, Federation, eventually
from test_imaging_studies import gateway, new_study, refer, report

from hie_platform.bus import Bus

__all__ = ["gateway"]  # the fixture, used by name


async def status(fed: Federation, hub: str, as_: str, study_uid: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {await fed.token(as_)}"}
    base = fed.hubs[hub].fhir.removesuffix("/fhir")
    return await fed.http.get(f"{base}/imaging/studies/{study_uid}", headers=headers)


async def test_the_sender_sees_its_study_kept_back_and_others_see_nothing(
    federation: Federation, gateway: Bus, rrn: str
) -> None:
    fed = federation
    ct = new_study()
    _, _, exchange_id = await refer(fed, rrn, (ct,))
    uid = ct.study_instance_uid
    at = datetime.now(UTC)
    # The sending hub's gateway took 5 instances in, and the consent decision kept them back.
    await report(gateway, "severance", ct, exchange_id, 0, state="queued", at=at)
    await report(gateway, "severance", ct, exchange_id, 0, state="blocked", at=at + timedelta(seconds=2))
    # An older report read after a newer one changes nothing.
    await report(gateway, "severance", ct, exchange_id, 0, state="queued", at=at + timedelta(seconds=1))

    async def blocked() -> dict[str, Any] | None:
        response = await status(fed, "severance", SEVERANCE_CLINIC, uid)
        if response.status_code != 200:
            return None
        body: dict[str, Any] = response.json()
        return body if body["exchanges"][0]["state"] == "blocked" else None

    body = await eventually(blocked, "the study's state at the sender's hub", 30)
    assert body["study_instance_uid"] == uid
    [line] = body["exchanges"]
    assert line["exchange_id"] == exchange_id
    assert (line["from_institution"], line["to_institution"]) == (SEVERANCE_CLINIC, SNUBH)
    assert (line["received"], line["relayed"], line["delivered"]) == (1, 0, 0)
    assert rrn not in str(body)

    # Another clinic of the same hub gets the 404 of an unknown study.
    other = await status(fed, "severance", SEVERANCE_CLINIC_2, uid)
    unknown = await status(fed, "severance", SEVERANCE_CLINIC, new_study().study_instance_uid)
    assert other.status_code == unknown.status_code == 404
    assert other.json()["resourceType"] == "OperationOutcome"
    # No token, no answer.
    base = fed.hubs["severance"].fhir.removesuffix("/fhir")
    assert (await fed.http.get(f"{base}/imaging/studies/{uid}")).status_code == 401
    # The read is audited.
    audit = await fed.hubs["severance"].rows("audit_log")
    assert any(r["record"]["action"] == "imaging.status-read" for r in audit)
