"""The Bundles the hub answers with: searchsets and the ITI-65 transaction-response."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Namespace of the deterministic transaction-response ids (a replayed publish answers identically).
_RESPONSE_NS = uuid.UUID("6d1f3c4e-8a51-4d0c-9f0e-6f1f3a2b9c11")

# The Tasks an ITI-65 created, on the response entry of the DocumentReference they are about (FHIR R4
# wants exactly one response entry per request entry): one extension per Task, valueReference Task/id.
CREATED_TASK_EXTENSION = "https://hie-federation.kr/fhir/StructureDefinition/created-task"


@dataclass(frozen=True)
class Created:
    """One created resource in a transaction response, at its version; ``tasks``: the ids of the
    Tasks made about it (a DocumentReference that leads an exchange)."""

    resource_type: str
    id: str
    at: datetime
    version: int = 1
    tasks: tuple[str, ...] = ()


def transaction_response(document_ids: Sequence[str], created: Sequence[Created]) -> dict[str, Any]:
    """ITI-65 answer; its id derives from the documents so that a replayed publish answers the same."""
    bundle_id = uuid.uuid5(_RESPONSE_NS, "|".join(document_ids))
    entries = []
    for c in created:
        response: dict[str, Any] = {
            "status": "201 Created",
            "location": f"{c.resource_type}/{c.id}/_history/{c.version}",
            "etag": f'W/"{c.version}"',
            "lastModified": c.at.isoformat(),
        }
        if c.tasks:
            response["extension"] = [
                {"url": CREATED_TASK_EXTENSION, "valueReference": {"reference": f"Task/{task_id}"}}
                for task_id in c.tasks
            ]
        entries.append({"response": response})
    return {
        "resourceType": "Bundle",
        "id": str(bundle_id),
        "type": "transaction-response",
        "entry": entries,
    }


def created_tasks(response: dict[str, Any]) -> list[str]:
    """The ids of the Tasks a transaction-response names (CREATED_TASK_EXTENSION)."""
    return [
        ext["valueReference"]["reference"].split("/")[1]
        for entry in response.get("entry") or []
        for ext in (entry.get("response") or {}).get("extension") or []
        if ext.get("url") == CREATED_TASK_EXTENSION
    ]


def searchset(
    base: str,
    resources: Sequence[dict[str, Any]],
    total: int | None,
    *,
    links: Sequence[tuple[str, str]] = (),
    outcomes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A searchset Bundle: the matches, then one entry per OperationOutcome (search.mode outcome).

    Links are built by the caller from the query with any RRN replaced by the patient key: an RRN is
    never echoed.
    """
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    if links:
        bundle["link"] = [{"relation": relation, "url": url} for relation, url in links]
    entries = [
        {
            "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in resources
    ]
    entries += [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": outcome, "search": {"mode": "outcome"}}
        for outcome in outcomes
    ]
    bundle["entry"] = entries
    return bundle


def count_only(bundle: dict[str, Any]) -> dict[str, Any]:
    """``_summary=count``: the searchset's total and self link, no entries."""
    links = [link for link in bundle.get("link") or [] if link["relation"] == "self"]
    return {k: v for k, v in bundle.items() if k not in ("entry", "link")} | (
        {"link": links} if links else {}
    )
