"""What cannot travel is refused at the edge (issue 12 point 7): a referral under the hub's HTTP body
limit whose delivery event would exceed the NATS server's max_payload is answered 413 with an
OperationOutcome before anything is stored, and the hub's later referrals are still delivered (today
it was accepted, and its unpublishable event held every later event of the hub's outbox forever)."""

from __future__ import annotations

import json

from hub_support import SEVERANCE_CLINIC, SNUBH, Federation, refused, submit

from hie_hub.core.bundles import created_tasks
from hie_platform.natsd import MAX_PAYLOAD
from hie_schemas.codes import DocumentType

# 8.6 MiB: under the hub's 10 MiB body limit, over the local nats-server's 8 MiB max_payload.
TARGET_BODY = int(8.6 * 1024 * 1024)


def large_referral(rrn: str) -> dict[str, object]:
    """A referral whose reason text brings the whole ITI-65 body to TARGET_BODY bytes."""
    small = submit(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH], reason="")
    padding = TARGET_BODY - len(json.dumps(small, ensure_ascii=False).encode())
    return submit(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH], reason="의뢰 사유 " + "x" * padding)


async def test_a_referral_too_large_for_nats_is_refused_and_later_referrals_are_delivered(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    body = large_referral(rrn)
    size = len(json.dumps(body, ensure_ascii=False).encode())
    assert MAX_PAYLOAD < size < fed.hubs["severance"].settings.max_body_bytes
    outbox_before = len(await fed.hubs["severance"].rows("outbox"))

    response = await fed.publish("severance", SEVERANCE_CLINIC, body)
    diagnostics = refused(response, 413)
    assert "max_payload" in diagnostics
    # Nothing stored: no document, no Task, no event waiting in the outbox.
    assert await fed.patient_rows("severance", key) == []
    assert len(await fed.hubs["severance"].rows("outbox")) == outbox_before

    # The hub's next referral (same patient, ordinary size) is delivered.
    later = submit(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    accepted = await fed.publish("severance", SEVERANCE_CLINIC, later)
    assert accepted.status_code == 200, accepted.text
    [task_id] = created_tasks(accepted.json())
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
