"""The data holder's question for every disclosure: may these documents flow to this institution now?

One place asks the consent gate for ITI-67/68, federated searches from other hubs and the CRS
generated on request; the author institution reads its own documents without asking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import Document
from hie_hub.node import HubNode
from hie_schemas.consent import Decision, FlowQuery, Purpose


@dataclass(frozen=True)
class Access:
    """Who is asking and why (the recipient of the flow in the consent rule)."""

    institution: str
    purpose: Purpose = Purpose.TREATMENT
    justification: str | None = None

    @property
    def flagged(self) -> bool:
        """Emergency access is shown to the patient afterwards (의료법 §21-2 exception)."""
        return self.purpose is Purpose.EMERGENCY


async def decisions(node: HubNode, access: Access, rows: Sequence[Document]) -> list[Decision | None]:
    """The consent decision for each row (None where the caller is the author and reads its own).

    Documents that differ only in ways the rule ignores share one question: the rule reads the
    holder, its department and the creation time, not the document itself.
    """
    now = datetime.now(UTC)
    others = [row for row in rows if row.author_institution != access.institution]
    holders = {row.author_institution for row in others}
    standing = {code: await node.runtime.registry.in_good_standing(code) for code in holders}
    recipient_ok = await node.runtime.registry.in_good_standing(access.institution) if others else True
    questions: dict[tuple[str, str, str | None, datetime], FlowQuery] = {}
    for row in others:
        key = (row.patient_key, row.author_institution, row.author_department, row.created_at)
        if key not in questions:
            questions[key] = FlowQuery(
                patient_key=row.patient_key,
                holder=row.author_institution,
                holder_department=row.author_department,
                recipient=access.institution,
                purpose=access.purpose,
                document_created_at=row.created_at,
                at=now,
                justification=access.justification,
                holder_in_good_standing=standing[row.author_institution],
                recipient_in_good_standing=recipient_ok,
            )
    answers = dict(zip(questions, await node.consent.decide_all(list(questions.values())), strict=True))
    return [
        None
        if row.author_institution == access.institution
        else answers[(row.patient_key, row.author_institution, row.author_department, row.created_at)]
        for row in rows
    ]


async def release(read: AsyncSession) -> None:
    """End the read transaction before asking the consent gate: the gate reads too (its replica), and
    a request that kept its reader connection while waiting could exhaust the pool under load.
    (Commit, not rollback: read sessions do not expire their objects on commit, so the rows already
    loaded stay usable.)"""
    await read.commit()


def newest_version(decided: Sequence[Decision | None]) -> int | None:
    return max((d.consent_version for d in decided if d is not None and d.consent_version), default=None)


def first_refusal(decided: Sequence[Decision | None]) -> Decision | None:
    return next((d for d in decided if d is not None and not d.permit), None)
