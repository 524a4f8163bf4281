"""IHE MHD ITI-66 Find Lists: the SubmissionSets published at this hub.

A SubmissionSet is visible to its author; to an intended recipient it shows only the entries whose
documents that recipient may see now (consent asked as for ITI-67), and not at all when none is left.
Folders are not kept, so ``code=folder`` finds nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.bundles import searchset
from hie_hub.core.disclosure import Access, decisions
from hie_hub.core.params import DEFAULT_COUNT, Cursor, SearchParams
from hie_hub.core.rest import negotiated
from hie_hub.core.unit import UnitOfWork
from hie_hub.documents import repository as documents_repo
from hie_hub.lists import repository
from hie_hub.lists.schemas import LIST_SEARCH
from hie_hub.models import Document, SubmissionSet
from hie_hub.node import HubNode, ReadingDep, record_treatment
from hie_platform.errors import NotFound, fhir_response
from hie_schemas.auth import TokenClaims
from hie_schemas.documents.profiles import MHD_LIST_TYPES
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

router = APIRouter(prefix="/fhir", tags=["documents"], dependencies=[Depends(negotiated)])


async def _held(read: AsyncSession, actor: TokenClaims, rows: list[SubmissionSet]) -> list[Document]:
    """The documents of other authors' Lists, which consent is asked about."""
    wanted = {doc for row in rows if row.author_institution != actor.inst for doc in row.document_ids}
    return list((await documents_repo.documents_by_id(read, wanted)).values())


async def _visible(
    node: HubNode, actor: TokenClaims, rows: list[SubmissionSet], held: list[Document]
) -> list[dict[str, Any]]:
    """The Lists as the caller may see them (entries filtered by consent for a recipient); ``held``
    is ``_held`` of the same rows, read in the phase that ended before this asks."""
    permitted = {
        row.document_id
        for row, d in zip(held, await decisions(node, Access(actor.inst), held), strict=True)
        if actor.inst in row.recipients and (d is None or d.permit)
    }
    lists: list[dict[str, Any]] = []
    for row in rows:
        if row.author_institution == actor.inst:
            lists.append(row.resource)
            continue
        if actor.inst not in row.recipients:
            continue
        entries = [
            e
            for e in row.resource.get("entry") or []
            if str((e.get("item") or {}).get("reference", "")).removeprefix("DocumentReference/") in permitted
        ]
        if entries:
            lists.append({**row.resource, "entry": entries})
    return lists


def _identified(row: SubmissionSet, token: str | None) -> bool:
    if token is None:
        return True
    system, sep, value = token.rpartition("|")
    for identifier in row.resource.get("identifier") or []:
        if identifier.get("value") == value and (not sep or identifier.get("system") == system):
            return True
    return False


async def _matching(read: AsyncSession, params: SearchParams, key: str) -> list[SubmissionSet]:
    """The patient's SubmissionSets that match code, date, status, identifier and the cursor."""
    codes = params.any_of("code")
    dates = params.dates("date")
    cursor = params.cursor()
    lower = [b.lower for b in dates if b.lower is not None]
    upper = [b.upper for b in dates if b.upper is not None]
    rows = await repository.submission_sets_of_patient(
        read,
        key,
        statuses=params.any_of("status"),
        submitted_from=max(lower, default=None),
        submitted_before=min(upper, default=None),
    )
    identifier = params.one("identifier")
    if codes is not None and not {"submissionset", f"{MHD_LIST_TYPES}|submissionset"} & set(codes):
        return []
    rows = [row for row in rows if _identified(row, identifier)]
    if cursor is not None:
        rows = [row for row in rows if (row.submitted_at, row.id) < (cursor.at, cursor.key)]
    return rows


async def _page(
    node: HubNode, unit: UnitOfWork, actor: TokenClaims, params: SearchParams, key: str, count: int
) -> tuple[list[tuple[SubmissionSet, dict[str, Any]]], bool]:
    """The first ``count`` visible Lists and whether more follow; consent is asked one row at a time,
    only for what may be returned (the first row's documents are read with the rows)."""
    async with unit.reading() as read:
        rows = await _matching(read, params, key)
        held = await _held(read, actor, rows[:1])
    visible: list[tuple[SubmissionSet, dict[str, Any]]] = []
    for n, row in enumerate(rows):
        if n:
            async with unit.reading() as read:
                held = await _held(read, actor, [row])
        shown = await _visible(node, actor, [row], held)
        visible += [(row, shown[0])] if shown else []
        if len(visible) > count:
            break
    return visible[:count], len(visible) > count


@router.get("/List", summary="ITI-66 Find Lists (SubmissionSets)")
async def find_lists(request: Request, reading: ReadingDep) -> JSONResponse:
    node, actor, unit = reading.node, reading.actor, reading.unit
    params = SearchParams(request, LIST_SEARCH)
    key = params.patient_key("patient.identifier", node.settings.patient_key_bytes)
    count = params.count()
    count = DEFAULT_COUNT if count is None else count
    returned, more = await _page(node, unit, actor, params, key, count)
    await record_treatment(
        reading.audit,
        unit.writing(),
        "list.search",
        actor,
        key,
        document_ids=[doc for _, listed in returned for doc in _entry_ids(listed)],
        detail={"lists": [row.id for row, _ in returned]},
    )
    base = f"{node.settings.fhir_base}/List"
    patient = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"}
    links = [("self", params.link(base, patient))]
    if more and returned:
        last = returned[-1][0]
        links.append(
            ("next", params.link(base, patient | {"_cursor": Cursor(last.submitted_at, last.id).encode()}))
        )
    bundle = searchset(node.settings.fhir_base, [listed for _, listed in returned], None, links=links)
    return fhir_response(200, bundle)


def _entry_ids(listed: dict[str, Any]) -> list[str]:
    return [
        str((e.get("item") or {}).get("reference", "")).removeprefix("DocumentReference/")
        for e in listed.get("entry") or []
    ]


@router.get("/List/{list_id}", summary="Read one SubmissionSet")
@router.head("/List/{list_id}", include_in_schema=False)
async def read_list(list_id: str, reading: ReadingDep) -> JSONResponse:
    actor, unit = reading.actor, reading.unit
    async with unit.reading() as read:
        row = await repository.submission_set(read, list_id)
        held = await _held(read, actor, [row]) if row is not None else []
    shown = await _visible(reading.node, actor, [row], held) if row is not None else []
    if row is None or not shown:
        raise NotFound(f"no List {list_id} visible to institution {actor.inst}")
    await record_treatment(
        reading.audit,
        unit.writing(),
        "list.read",
        actor,
        row.patient_key,
        document_ids=_entry_ids(shown[0]),
        detail={"list": row.id},
    )
    return fhir_response(200, shown[0])
