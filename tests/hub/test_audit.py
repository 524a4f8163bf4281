"""The audit trail as FHIR AuditEvents for the agency, and the chain check that finds tampering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hub_support import (
    AGENCY_CLIENT,
    CNUH,
    SEVERANCE,
    SEVERANCE_CLINIC,
    Federation,
    located,
    matches,
    refused,
    submit,
)
from sqlalchemy import delete, update
from typer.testing import CliRunner

from hie_cli.main import app as cli
from hie_hub.app import MIGRATIONS
from hie_hub.audit.schemas import CHAIN_URL
from hie_hub.audit.verify import verify
from hie_hub.models import PLATFORM
from hie_platform.audit import AuditTrail
from hie_platform.db import Database
from hie_platform.migrations import upgrade
from hie_platform.outbox import Outbox
from hie_schemas.codes import DocumentType
from hie_schemas.envelope import Source
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM


async def test_the_agency_reads_a_patients_audit_trail_as_audit_events(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, [SEVERANCE])
    )
    [doc_id] = located(published, "DocumentReference")
    await fed.search("severance", SEVERANCE, rrn)
    await fed.call("GET", "severance", f"/Bundle/{doc_id}", as_=SEVERANCE)
    await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE,
        params={
            "patient.identifier": f"{RRN_SYSTEM}|{rrn}",
            "_federated": "true",
            "purpose": "emergency",
            "justification": "unconscious",
        },
    )
    params = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    refused(await fed.call("GET", "severance", "/AuditEvent", as_=SEVERANCE, params=params), 403)
    response = await fed.call("GET", "severance", "/AuditEvent", as_=AGENCY_CLIENT, params=params)
    events = matches(response)
    for event in events:
        parse_resource(event, "AuditEvent")
    key = fed.desk.key(rrn)
    assert all(
        any(
            e["what"].get("identifier") == {"system": PATIENT_KEY_SYSTEM, "value": key}
            for e in event["entity"]
        )
        for event in events
    )
    by_action = {
        next(s["code"] for s in event["subtype"] if s["system"].endswith("audit-action")): event
        for event in events
    }
    assert {"document.publish", "document.search", "document.retrieve", "federated.search"} <= set(by_action)
    retrieve = by_action["document.retrieve"]
    assert retrieve["action"] == "R"
    assert {"system": "urn:ihe:event-type-code", "code": "ITI-68"} in retrieve["subtype"]
    requestor = next(a for a in retrieve["agent"] if a["requestor"])
    assert requestor["who"]["identifier"]["value"] == SEVERANCE
    assert {"reference": f"DocumentReference/{doc_id}"} in [e["what"] for e in retrieve["entity"]]
    assert retrieve["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    emergency = by_action["federated.search"]
    assert {c["coding"][0]["code"] for c in emergency["purposeOfEvent"]} == {"ETREAT", "BTG"}
    assert "unconscious" in emergency["outcomeDesc"]
    chain = {x["url"]: x for x in events[0]["extension"]}[CHAIN_URL]["extension"]
    assert {x["url"] for x in chain} == {"sequence", "hash", "previous"}

    # Newest first, in pages.
    first = await fed.call(
        "GET", "severance", "/AuditEvent", as_=AGENCY_CLIENT, params=params | {"_count": "2"}
    )
    next_url = next(link["url"] for link in first.json()["link"] if link["relation"] == "next")
    second = await fed.call(
        "GET", "severance", next_url.removeprefix(fed.hubs["severance"].fhir), as_=AGENCY_CLIENT
    )
    ids = [e["id"] for e in matches(first) + matches(second)]
    assert ids == [e["id"] for e in events[:4]]
    assert matches(await fed.call("GET", "cnuh", "/AuditEvent", as_=AGENCY_CLIENT, params=params)) == []
    today = await fed.call(
        "GET", "severance", "/AuditEvent", as_=AGENCY_CLIENT, params=params | {"date": "ge2020"}
    )
    assert len(matches(today)) == len(events)
    long_ago = await fed.call(
        "GET", "severance", "/AuditEvent", as_=AGENCY_CLIENT, params=params | {"date": "lt2020"}
    )
    assert matches(long_ago) == []
    refused(await fed.call("GET", "cnuh", "/AuditEvent", as_=CNUH, params=params), 403)


@pytest.fixture
async def chain(database: tuple[str, str | None]) -> AsyncIterator[tuple[str, str | None, Database]]:
    """A hub database with ten audit records appended by the platform's trail."""
    url, schema = database
    await asyncio.to_thread(upgrade, MIGRATIONS, url, schema)
    db = Database(url, schema)
    trail = AuditTrail(PLATFORM.audit, Outbox(PLATFORM.outbox, Source(service="hub-node", node="t")), "t")
    for n in range(10):
        async with db.transaction() as session:
            await trail.record(
                session,
                action="document.read",
                actor=None,
                outcome="success",
                patient_key="a" * 64,
                detail={"n": n},
            )
    yield url, schema, db
    await db.dispose()


async def test_verify_finds_an_altered_record(chain: tuple[str, str | None, Database]) -> None:
    url, schema, db = chain
    assert await verify(url, schema) == type(await verify(url, schema))(ok=True, records=10)
    t = PLATFORM.audit
    async with db.transaction() as session:
        altered = {"action": "document.read", "patient_key": "b" * 64, "detail": {"n": 4}}
        await session.execute(update(t).where(t.c.sequence == 5).values(record=altered))
    check = await verify(url, schema)
    assert (check.ok, check.first_bad_sequence) == (False, 5)


async def test_verify_finds_a_removed_record(chain: tuple[str, str | None, Database]) -> None:
    url, schema, db = chain
    t = PLATFORM.audit
    async with db.transaction() as session:
        await session.execute(delete(t).where(t.c.sequence == 7))
    check = await verify(url, schema)
    assert (check.ok, check.first_bad_sequence) == (False, 7)


async def test_the_audit_verify_command_exits_non_zero_on_a_broken_chain(
    chain: tuple[str, str | None, Database],
) -> None:
    """`hie audit verify` is how an operator checks a hub: one line, and the exit code a cron job reads."""
    url, schema, db = chain
    args = ["audit", "verify", "--database-url", url] + (["--schema", schema] if schema else [])
    # The command runs its own event loop, as it does from a shell: in a thread here.
    intact = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert (intact.exit_code, intact.stdout.strip()) == (0, "audit chain intact: 10 records")

    async with db.transaction() as session:
        await session.execute(
            update(PLATFORM.audit).where(PLATFORM.audit.c.sequence == 3).values(record={"forged": 1})
        )
    broken = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert broken.exit_code == 1
    assert "chain broken at sequence 3" in broken.stderr
