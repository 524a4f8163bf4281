"""FHIR REST endpoints of the referral workflow: the Task inbox (with long polling), reading and
moving a Task."""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hie_hub import tasks
from hie_hub.node import NodeDep, ReaderActor
from hie_hub.params import Cursor, SearchParams, json_body
from hie_hub.resources import searchset
from hie_platform.errors import fhir_response
from hie_platform.http import ReadSessionDep, SessionDep

router = APIRouter(prefix="/fhir", tags=["fhir"])

TASK_SEARCH = frozenset(
    {
        "owner",
        "owner:identifier",
        "requester",
        "requester:identifier",
        "status",
        "_count",
        "_since",
        "_cursor",
    }
)
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
    bundle = searchset(node.settings.fhir_base, [row.task for row in page], None, links=links)
    return fhir_response(200, bundle, headers)


@router.get("/Task/{task_id}", summary="Read a Task (requester or owner)")
async def read_task(task_id: str, actor: ReaderActor, read: ReadSessionDep) -> JSONResponse:
    return fhir_response(200, (await tasks.get_task(read, actor, task_id)).task)


@router.put("/Task/{task_id}", summary="The owner moves its Task (accepted, rejected, completed)")
async def update_task(
    task_id: str, request: Request, node: NodeDep, actor: ReaderActor, session: SessionDep
) -> JSONResponse:
    body = await json_body(request)
    return fhir_response(200, await tasks.update_task(node, session, actor, task_id, body))
