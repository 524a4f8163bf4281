"""Where a study of an exchange stands at this hub's imaging gateway, for the parties of the exchange.

The gateway is store-and-forward: it answers a C-STORE Success once the instance is safe on its disk,
before the consent decision (docs/imaging.md, "What the sending PACS sees"). So the sending
institution reads here, at its own hub, whether its study went on, waits, or was kept back
(`blocked`): the counts and the one-word state the hub's gateway last reported (StudyProgress).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import StudyStatus, Task, as_utc
from hie_hub.node import AuditDep, ReaderActor, UnitDep
from hie_platform.errors import NotFound
from hie_schemas.events import StudyProgress

router = APIRouter(tags=["imaging"])


async def record(session: AsyncSession, task: Task, progress: StudyProgress) -> None:
    """Keep the newest report of a study in an exchange (reports may come twice or out of order)."""
    assert progress.exchange_id is not None
    at = as_utc(progress.updated_at)
    row = await session.get(StudyStatus, (progress.study_instance_uid, progress.exchange_id))
    if row is None:
        row = StudyStatus(
            study_instance_uid=progress.study_instance_uid,
            exchange_id=progress.exchange_id,
            requester=task.requester,
            owner=task.owner,
            updated_at=at,
        )
        session.add(row)
    elif at < as_utc(row.updated_at):
        return
    row.received, row.relayed = progress.received, progress.relayed
    row.delivered, row.failed = progress.delivered, progress.failed
    row.state, row.updated_at = progress.state[:16], at


def _line(row: StudyStatus) -> dict[str, Any]:
    return {
        "exchange_id": row.exchange_id,
        "from_institution": row.requester,
        "to_institution": row.owner,
        "received": row.received,
        "relayed": row.relayed,
        "delivered": row.delivered,
        "failed": row.failed,
        "state": row.state,
        "updated_at": _iso(row.updated_at),
    }


def _iso(at: datetime) -> str:
    return as_utc(at).isoformat()


@router.get(
    "/imaging/studies/{study_uid}",
    summary="Where a study of your exchanges stands at this hub's imaging gateway",
)
async def study_status(study_uid: str, actor: ReaderActor, unit: UnitDep, audit: AuditDep) -> JSONResponse:
    """The parties of the study's exchanges see each exchange's counts and state; anyone else gets the
    404 of an unknown study (the agency reads the gateway's own status). The read is audited."""
    async with unit.reading() as read:
        found = await read.scalars(select(StudyStatus).where(StudyStatus.study_instance_uid == study_uid))
        rows = list(found.all())
    visible = [r for r in rows if actor.inst in (r.requester, r.owner)]
    if not visible:
        raise NotFound(f"no imaging study {study_uid[:64]} visible to institution {actor.inst}")
    await audit.record(
        unit.writing(),
        action="imaging.status-read",
        actor=actor,
        outcome="success",
        patient_key=None,
        detail={"study_instance_uid": study_uid, "exchange_ids": [r.exchange_id for r in visible]},
    )
    return JSONResponse({"study_instance_uid": study_uid, "exchanges": [_line(r) for r in visible]})
