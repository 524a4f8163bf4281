"""FHIR REST endpoints of the referral workflow: the Task inbox (with long polling), reading and
moving a Task."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from hie_hub.core.bundles import count_only, searchset
from hie_hub.core.params import Cursor, SearchParams, json_body
from hie_hub.core.rest import check_if_match, negotiated, version_headers, versioned, with_meta
from hie_hub.models import Task
from hie_hub.node import NodeDep, ReaderActor
from hie_hub.tasks import repository
from hie_hub.tasks import service as tasks
from hie_hub.tasks.schemas import TASK_SEARCH
from hie_platform.errors import fhir_response
from hie_platform.http import ReadSessionDep, SessionDep

router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(negotiated)])

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
# How often a waiting poll looks at the database itself (a Task written by another replica of the
# hub does not wake this process).
_RECHECK_SECONDS = 1.0


def requested_wait(request: Request) -> int:
    """RFC 7240 ``Prefer: wait=N`` (seconds); 0 when absent."""
    match = _WAIT.search(request.headers.get("prefer", ""))
    return int(match.group(1)) if match else 0


@router.get(
    "/Task",
    summary="The caller's Tasks (owner = inbox, requester = sent); _since + 'Prefer: wait=N' long-polls",
)
async def search_tasks(
    request: Request, node: NodeDep, actor: ReaderActor, read: ReadSessionDep
) -> JSONResponse:
    params = SearchParams(request, TASK_SEARCH)
    params.check_total()
    count = params.count()
    limit = count if count is not None else 100
    cursor = params.cursor()
    since = params.instant("_since")
    owner, requester = params.institution("owner"), params.institution("requester")
    statuses = params.any_of("status")
    wait = min(float(requested_wait(request)), node.settings.long_poll_max_seconds) if since else 0.0
    deadline = time.monotonic() + wait
    while True:
        mark = node.tasks_changed.mark()
        rows = await tasks.find_tasks(
            read,
            actor,
            owner=owner,
            requester=requester,
            statuses=statuses,
            since=since,
            after=(cursor.at, cursor.key) if cursor else None,
            limit=limit + 1,  # one more than the page: is there a next page?
        )
        remaining = deadline - time.monotonic()
        if rows or remaining <= 0:
            break
        await read.commit()  # end the snapshot, so the next look sees what was committed meanwhile
        await node.tasks_changed.wait(min(remaining, _RECHECK_SECONDS), mark)
    headers = {"Preference-Applied": f"wait={int(wait)}"} if wait else None
    page = rows[:limit]
    base = f"{node.settings.fhir_base}/Task"
    links = [("self", params.link(base, {}))]
    if len(rows) > limit and page:
        last = page[-1]
        links.append(("next", params.link(base, {"_cursor": Cursor(last.updated_at, last.id).encode()})))
    if cursor is None and len(rows) <= limit:
        # Every match is on this first page (same WHERE, same snapshot): a COUNT would say the same.
        # An EMR's inbox poll usually finds a few Tasks, so this is the common case.
        total = len(rows)
    else:
        total = await repository.count_tasks(
            read,
            owner=owner if owner is not None or requester is not None else actor.inst,
            requester=requester,
            statuses=statuses,
            since=since,
        )
    bundle = searchset(node.settings.fhir_base, [presented(row) for row in page], total, links=links)
    return fhir_response(200, count_only(bundle) if params.count_only() else bundle, headers)


def presented(row: Task) -> dict[str, Any]:
    """The Task as reads and searches return it: meta.versionId and meta.lastUpdated from the row."""
    return with_meta(row.task, row.version or 1, row.updated_at)


@router.get("/Task/{task_id}", summary="Read a Task (requester or owner)")
@router.head("/Task/{task_id}", include_in_schema=False)
async def read_task(task_id: str, request: Request, actor: ReaderActor, read: ReadSessionDep) -> Response:
    row = await tasks.get_task(read, actor, task_id)
    return versioned(request, presented(row), row.version or 1, row.updated_at)


@router.put("/Task/{task_id}", summary="The owner moves its Task (accepted, rejected, completed)")
async def update_task(
    task_id: str, request: Request, node: NodeDep, actor: ReaderActor, session: SessionDep
) -> JSONResponse:
    body = await json_body(request)
    row = await repository.task(session, task_id)
    if row is not None and actor.inst == row.owner:
        check_if_match(request, row.version or 1, f"Task/{task_id}")
    await tasks.update_task(node, session, actor, task_id, body)
    row = await tasks.get_task(session, actor, task_id)
    await session.flush()  # the version moves when the change is written
    return fhir_response(200, presented(row), version_headers(row.version or 1, row.updated_at))
