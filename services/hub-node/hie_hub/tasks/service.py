"""The referral workflow on Task: who may see and move a Task, which moves are allowed, and keeping
the requester's copy in step with the owner's (TaskStatusNotice)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.params import fhir_body
from hie_hub.documents import repository as documents_repo
from hie_hub.models import Task
from hie_hub.node import HubNode, record_treatment
from hie_hub.subscriptions.service import task_changed
from hie_hub.tasks import repository
from hie_hub.tasks.schemas import TaskStatus, output_document_ids, with_status
from hie_platform.bus import PermanentEventError, RefusedMessage
from hie_platform.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from hie_platform.logging import get_logger
from hie_schemas.auth import TokenClaims
from hie_schemas.contract import Kind, subject
from hie_schemas.events import TaskStatusNotice, TaskUpdated

log = get_logger(__name__)

# The owner's moves (FHIR Task state machine, restricted to the referral workflow).
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.REQUESTED: frozenset({TaskStatus.ACCEPTED, TaskStatus.REJECTED}),
    TaskStatus.RECEIVED: frozenset({TaskStatus.ACCEPTED, TaskStatus.REJECTED}),
    TaskStatus.ACCEPTED: frozenset({TaskStatus.COMPLETED}),
}


def visible_task(row: Task | None, actor: TokenClaims) -> Task:
    """A Task is visible to its requester and its owner; to anyone else it does not exist."""
    if row is None or actor.inst not in (row.requester, row.owner):
        raise NotFound("no such Task")
    return row


async def get_task(session: AsyncSession, actor: TokenClaims, task_id: str) -> Task:
    return visible_task(await repository.task(session, task_id), actor)


async def find_tasks(
    session: AsyncSession,
    actor: TokenClaims,
    *,
    owner: str | None,
    requester: str | None,
    statuses: Sequence[str] | None,
    limit: int,
    since: datetime | None = None,
    after: tuple[datetime, str] | None = None,
) -> list[Task]:
    """The caller's inbox (as owner) or outbox (as requester)."""
    for party, code in (("owner", owner), ("requester", requester)):
        if code is not None and code != actor.inst:
            raise Forbidden(f"institution {actor.inst} may list only its own Tasks ({party} {code} refused)")
    if owner is None and requester is None:
        owner = actor.inst
    return await repository.tasks(
        session, owner=owner, requester=requester, statuses=statuses, since=since, after=after, limit=limit
    )


def _requested_change(body: Any, task_id: str) -> tuple[TaskStatus, list[str]]:
    body = fhir_body(body, "Task")
    if body.get("id") not in (None, task_id):
        raise BadRequest("Task.id does not match the URL", expression=("Task.id",))
    try:
        status = TaskStatus(body["status"])
    except ValueError:
        raise Conflict(
            f"the referral workflow has no status {body['status']!r}", expression=("Task.status",)
        ) from None
    return status, output_document_ids(body)


async def update_task(
    node: HubNode, session: AsyncSession, actor: TokenClaims, task_id: str, body: Any
) -> dict[str, Any]:
    """The owner moves its Task (e.g. accepted, then completed with the return note as output)."""
    status, output = _requested_change(body, task_id)
    row = visible_task(await repository.task(session, task_id), actor)
    if actor.inst != row.owner:
        raise Forbidden(f"only the owner ({row.owner}) may change this Task")
    current = TaskStatus(row.status)
    known_output = output_document_ids(row.task)
    if status is current and set(output) <= set(known_output):
        return row.task  # a repeated PUT: nothing changes
    if status not in TRANSITIONS.get(current, frozenset()):
        raise Conflict(
            f"a Task cannot move from {current.value} to {status.value}", expression=("Task.status",)
        )
    await _check_output(session, actor, output)
    now = datetime.now(UTC)
    all_output = list(dict.fromkeys([*known_output, *output]))
    row.status, row.task, row.updated_at = status.value, with_status(row.task, status, all_output, now), now
    await task_changed(node, session, row)
    update = TaskUpdated(
        task_id=row.id,
        exchange_id=row.exchange_id,
        status=status.value,
        by_institution=actor.inst,
        patient_key=row.patient_key,
        output_document_ids=all_output,
        updated_at=now,
    )
    outbox = node.outbox
    await outbox.add(
        session,
        subject(Kind.TASK_STATUS, to=row.requester_hub, sender=node.hub),
        TaskStatusNotice(update=update),
    )
    await outbox.add(session, subject(Kind.TASK_UPDATED, sender=node.hub), update)
    await record_treatment(
        node.audit,
        session,
        "task.update",
        actor,
        row.patient_key,
        document_ids=[*row.focus, *output],
        detail={"task_id": row.id, "exchange_id": row.exchange_id, "from": current.value, "to": status.value},
    )
    return row.task


async def _check_output(session: AsyncSession, actor: TokenClaims, output: list[str]) -> None:
    held = await documents_repo.documents_by_id(session, output)
    for doc_id in output:
        row = held.get(doc_id)
        if row is None or row.author_institution != actor.inst:
            raise Unprocessable(
                f"Task.output DocumentReference/{doc_id} is not a document of {actor.inst} held at this hub",
                expression=("Task.output",),
            )


async def apply_notice(node: HubNode, session: AsyncSession, update: TaskUpdated, sender: str) -> bool:
    """Bring this hub's copy of a Task up to the owner's status; late or repeated notices are ignored.
    Only the owner's word counts, sent by the owner's hub (``sender``: the subject's sending hub)."""
    row = await repository.task(session, update.task_id)
    if row is None:
        log.warning("task-status notice for an unknown Task", task_id=update.task_id)
        return False
    if update.by_institution != row.owner or sender != row.owner_hub:
        raise RefusedMessage("not-the-owner", "a task-status notice not from the Task's owner")
    try:
        status = TaskStatus(update.status)
    except ValueError:
        raise PermanentEventError(f"unknown Task status {update.status!r}") from None
    if status.rank <= TaskStatus(row.status).rank:
        return False
    now = datetime.now(UTC)
    task = with_status(row.task, status, update.output_document_ids, update.updated_at)
    # lastModified is the owner's; meta.lastUpdated is when this copy changed, which long polls
    # (_since) compare with.
    row.status, row.updated_at = status.value, now
    row.task = {**task, "meta": {**task.get("meta", {}), "lastUpdated": now.isoformat()}}
    await task_changed(node, session, row)
    return True
