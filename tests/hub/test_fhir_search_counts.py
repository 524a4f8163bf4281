"""FHIR search conventions at a hub: Bundle.total, _count and its clamp, on Task, AuditEvent and
DocumentReference searches, paged or not (split from test_fhir_conventions.py)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
from hub_support import (
    AGENCY_CLIENT,
    CRS,
    REFERRAL,
    SEVERANCE_CLINIC,
    SNUBH,
    STRICT,
    Federation,
    krnpi,
    matches,
    refused,
    submit,
)

from hie_schemas.identifiers import RRN_SYSTEM


async def test_task_and_audit_searches_give_totals_and_counts(federation: Federation, rrn: str) -> None:
    """Point 5: Bundle.total on Task and AuditEvent searches (all pages), and _summary=count with
    _total=accurate, also under strict handling."""
    fed = federation
    await fed.referral_received(rrn)
    mine = {"requester": krnpi(SEVERANCE_CLINIC)}
    sent = await fed.call("GET", "severance", "/Task", as_=SEVERANCE_CLINIC, params=mine | {"_count": "1"})
    assert sent.status_code == 200, sent.text
    assert sent.json()["total"] >= 1
    assert len(matches(sent)) == 1
    counted = await fed.call(
        "GET",
        "severance",
        "/Task",
        as_=SEVERANCE_CLINIC,
        headers=STRICT,
        params=mine | {"_summary": "count", "_total": "accurate"},
    )
    assert counted.status_code == 200, counted.text
    assert counted.json()["total"] == sent.json()["total"]
    assert "entry" not in counted.json()

    await fed.search("severance", SEVERANCE_CLINIC, rrn)  # a second record about the patient
    search = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    audit = await fed.call(
        "GET", "severance", "/AuditEvent", as_=AGENCY_CLIENT, params=search | {"_count": "1"}
    )
    assert audit.status_code == 200, audit.text
    assert audit.json()["total"] >= 2  # the publish and the search: every page counted
    assert len(matches(audit)) == 1
    audit_count = await fed.call(
        "GET", "severance", "/AuditEvent", as_=AGENCY_CLIENT, params=search | {"_summary": "count"}
    )
    assert "entry" not in audit_count.json()
    assert audit_count.json()["total"] >= audit.json()["total"]


async def test_document_searches_count_and_clamp(federation: Federation, rrn: str) -> None:
    """Point 5: _summary=count and _total on ITI-67 under strict handling; other _summary values
    and searches without totals are refused with a reason; _count above 1000 is served as 1000 and
    the self link says so."""
    fed = federation
    fed.desk.grant(rrn)
    await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn))
    search = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}

    async def strict(path: str, **params: str) -> httpx.Response:
        return await fed.call(
            "GET", "severance", path, as_=SEVERANCE_CLINIC, headers=STRICT, params=search | params
        )

    docs = await strict("/DocumentReference", _summary="count", _total="accurate")
    assert docs.status_code == 200, docs.text
    assert docs.json()["total"] == 1
    assert "entry" not in docs.json()
    assert "only _summary=count" in refused(await strict("/DocumentReference", _summary="text"), 400)
    lists = await strict("/List", _summary="count")
    assert "_summary=count and _total are supported on" in refused(lists, 400)
    clamped = await strict("/DocumentReference", _count="5000")
    assert len(matches(clamped)) == 1
    [self_link] = [link["url"] for link in clamped.json()["link"] if link["relation"] == "self"]
    assert parse_qs(urlsplit(self_link).query)["_count"] == ["1000"]


async def test_task_search_total_is_the_same_on_a_full_first_page_and_when_paged(
    federation: Federation, rrn: str
) -> None:
    """A first page that holds every match takes its total from the page; a paged search counts. Both
    must say the same, on every page."""
    fed = federation
    fed.desk.grant(rrn)
    for _ in range(3):
        await fed.publish("severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH]))
    mine = {"requester": krnpi(SEVERANCE_CLINIC)}
    whole = await fed.call("GET", "severance", "/Task", as_=SEVERANCE_CLINIC, params=mine)
    assert whole.status_code == 200, whole.text
    total = whole.json()["total"]
    assert total == len(matches(whole)) >= 3
    first = await fed.call("GET", "severance", "/Task", as_=SEVERANCE_CLINIC, params=mine | {"_count": "1"})
    assert first.json()["total"] == total
    assert len(matches(first)) == 1
    [next_url] = [link["url"] for link in first.json()["link"] if link["relation"] == "next"]
    second = await fed.call("GET", "severance", "/Task", as_=SEVERANCE_CLINIC, params=_query_of(next_url))
    assert second.status_code == 200, second.text
    assert second.json()["total"] == total
    exact = await fed.call(
        "GET", "severance", "/Task", as_=SEVERANCE_CLINIC, params=mine | {"_count": str(total)}
    )
    assert exact.json()["total"] == total
    assert len(matches(exact)) == total


def _query_of(url: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items()}
