"""The data holder's question for every disclosure: may these documents flow to this institution now?

One place asks the consent gate for ITI-67/68, federated searches from other hubs and the CRS
generated on request; the author institution reads its own documents without asking. A document an
exchange sent to the reader is decided with that exchange's purpose and justification, which the
exchange's Task carries (the same extensions as the SubmissionSet that asked for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.unit import outside_read_phase
from hie_hub.models import Document, Task
from hie_hub.node import HubNode
from hie_hub.tasks import repository as tasks_repo
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Decision, FlowQuery, Purpose
from hie_schemas.documents.profiles import JUSTIFICATION_EXTENSION_URL, PURPOSE_EXTENSION_URL, PURPOSE_SYSTEM
from hie_schemas.events import ExchangeKind

# Tasks written before the purpose travelled with them: the kinds that only one purpose makes.
_PURPOSE_BY_KIND = {
    ExchangeKind.PATIENT_REQUEST.value: Purpose.PATIENT_REQUEST,
    ExchangeKind.PUBLIC_AGENCY.value: Purpose.PUBLIC_AGENCY,
}

T = TypeVar("T")


@dataclass(frozen=True)
class Access:
    """Who is asking and why (the recipient of the flow in the consent rule); ``exchange_id`` names
    the exchange whose purpose it is, for the audit record (not part of the question)."""

    institution: str
    purpose: Purpose = Purpose.TREATMENT
    justification: str | None = None
    exchange_id: str | None = field(default=None, compare=False)

    @property
    def flagged(self) -> bool:
        """Emergency access is shown to the patient afterwards (의료법 §21-2 exception)."""
        return self.purpose is Purpose.EMERGENCY

    def audit_detail(self) -> dict[str, Any]:
        """Break-the-glass is recorded with its justification and flagged (의료법 §21-2 exception)."""
        return {"flagged": True, "justification": self.justification} if self.flagged else {}


@dataclass(frozen=True)
class Disclosure:
    """The decision for one document (None: the reader is its author) and the access it was made for."""

    decision: Decision | None
    access: Access

    @property
    def permit(self) -> bool:
        return self.decision is None or self.decision.permit


class Held(Protocol):
    """What the consent rule reads of a document, stored or being submitted: its holder, the
    holder's department and its creation time, not the document itself."""

    @property
    def author_institution(self) -> str: ...

    @property
    def author_department(self) -> str | None: ...

    @property
    def created_at(self) -> datetime: ...


def flow_query(
    patient_key: str,
    doc: Held,
    access: Access,
    at: datetime,
    *,
    holder_ok: bool = True,
    recipient_ok: bool = True,
) -> FlowQuery:
    """The consent question for ``doc`` flowing to ``access.institution`` for its purpose, at ``at``."""
    return FlowQuery(
        patient_key=patient_key,
        holder=doc.author_institution,
        holder_department=doc.author_department,
        recipient=access.institution,
        purpose=access.purpose,
        document_created_at=doc.created_at,
        at=at,
        justification=access.justification,
        holder_in_good_standing=holder_ok,
        recipient_in_good_standing=recipient_ok,
    )


def purpose_extensions(purpose: Purpose, justification: str | None) -> list[dict[str, Any]]:
    """The exchange's purpose of use (and justification) as the Task states it to both its parties."""
    extensions: list[dict[str, Any]] = [
        {"url": PURPOSE_EXTENSION_URL, "valueCoding": {"system": PURPOSE_SYSTEM, "code": purpose.value}}
    ]
    if justification:
        extensions.append({"url": JUSTIFICATION_EXTENSION_URL, "valueString": justification})
    return extensions


def exchange_access(task: Task) -> Access:
    """The access an exchange gave its recipient (the Task's owner): the exchange's purpose, as the
    holder's hub decided it when sending; treatment for a Task that states none."""
    return _exchange_access(task.owner, task.exchange_id, task.task)


def _exchange_access(owner: str, exchange_id: str, resource: dict[str, Any]) -> Access:
    purpose, justification = Purpose.TREATMENT, None
    codes = [c.get("code") for c in (resource.get("code") or {}).get("coding") or [] if isinstance(c, dict)]
    purpose = next((_PURPOSE_BY_KIND[c] for c in codes if c in _PURPOSE_BY_KIND), purpose)
    for extension in resource.get("extension") or []:
        if not isinstance(extension, dict):
            continue
        if extension.get("url") == PURPOSE_EXTENSION_URL:
            code = (extension.get("valueCoding") or {}).get("code")
            purpose = Purpose(code) if code in {p.value for p in Purpose} else purpose
        elif extension.get("url") == JUSTIFICATION_EXTENSION_URL:
            justification = str(extension.get("valueString") or "").strip() or None
    return Access(owner, purpose, justification, exchange_id=exchange_id)


async def exchange_accesses(
    read: AsyncSession, institution: str, rows: Sequence[Document]
) -> list[list[Access]]:
    """For each row another institution wrote, the accesses of the exchanges that sent it to
    ``institution`` (newest first, one per purpose and justification); empty where none did.

    Each exchange is read once and filed under the documents it sent: a patient's exchanges and
    documents grow together, and matching every row against every exchange made a search of a
    patient with 200 referrals spend a quarter of its time here (a py-spy profile of ITI-67)."""
    foreign = {
        row.document_id
        for row in rows
        if row.author_institution != institution and institution in row.recipients
    }
    if not foreign:
        return [[] for _ in rows]
    patients = {row.patient_key for row in rows if row.document_id in foreign}
    by_document: dict[str, list[Access]] = {}
    for exchange in await tasks_repo.exchanges_owned_for(read, institution, patients):
        sent = [document_id for document_id in exchange.focus if document_id in foreign]
        if not sent:
            continue
        access = _exchange_access(exchange.owner, exchange.exchange_id, exchange.task)
        for document_id in sent:
            accesses = by_document.setdefault(document_id, [])
            if access not in accesses:
                accesses.append(access)
    return [list(by_document.get(row.document_id, ())) for row in rows]


async def decisions(node: HubNode, access: Access, rows: Sequence[Document]) -> list[Decision | None]:
    """The consent decision for each row (None where the caller is the author and reads its own).

    Documents that differ only in ways the rule ignores share one question: the rule reads the
    holder, its department and the creation time, not the document itself.
    """
    outside_read_phase("the consent gate asked")
    now = datetime.now(UTC)
    others = [row for row in rows if row.author_institution != access.institution]
    holders = {row.author_institution for row in others}
    standing = {code: await node.registry.in_good_standing(code) for code in holders}
    recipient_ok = await node.registry.in_good_standing(access.institution) if others else True
    questions: dict[tuple[str, str, str | None, datetime], FlowQuery] = {}
    for row in others:
        key = (row.patient_key, row.author_institution, row.author_department, row.created_at)
        if key not in questions:
            questions[key] = flow_query(
                row.patient_key,
                row,
                access,
                now,
                holder_ok=standing[row.author_institution],
                recipient_ok=recipient_ok,
            )
    answers = dict(zip(questions, await node.consent.decide_all(list(questions.values())), strict=True))
    return [
        None
        if row.author_institution == access.institution
        else answers[(row.patient_key, row.author_institution, row.author_department, row.created_at)]
        for row in rows
    ]


async def disclosures(
    node: HubNode, rows: Sequence[Document], candidates: Sequence[Sequence[Access]]
) -> list[Disclosure]:
    """Each row decided for its candidate accesses (at least one) in order: the first that permits
    wins, else the first refusal. A later access is asked only for rows the earlier ones refused, so
    an emergency is not announced to the patient for a document another purpose already disclosed."""
    chosen: dict[int, Disclosure] = {}
    for round_ in range(max((len(c) for c in candidates), default=0)):
        groups: dict[Access, list[int]] = {}
        for i, accesses in enumerate(candidates):
            earlier = chosen.get(i)
            if round_ < len(accesses) and (earlier is None or not earlier.permit):
                groups.setdefault(accesses[round_], []).append(i)
        for access, indexes in groups.items():
            decided = await decisions(node, access, [rows[i] for i in indexes])
            for i, decision in zip(indexes, decided, strict=True):
                if i not in chosen or decision is None or decision.permit:
                    chosen[i] = Disclosure(decision, candidates[i][round_])
    return [chosen[i] for i in range(len(rows))]


def newest_version(decided: Sequence[Decision | None]) -> int | None:
    return max((d.consent_version for d in decided if d is not None and d.consent_version), default=None)


def first_refusal(decided: Sequence[Decision | None]) -> Decision | None:
    return next((d for d in decided if d is not None and not d.permit), None)


# --- the audit records of disclosures ------------------------------------------------------------------


async def record_disclosure(
    node: HubNode,
    session: AsyncSession,
    action: str,
    actor: TokenClaims,
    patient_key: str,
    disclosure: Disclosure,
    *,
    document_ids: list[str] | None = None,
    detail: dict[str, Any],
) -> None:
    """The audit record of one read decided by ``disclosure``: its outcome, the rule and consent
    version it was decided by, the access it was made for (``detail`` follows the access's own)."""
    decision, access = disclosure.decision, disclosure.access
    await node.audit.record(
        session,
        action=action,
        actor=actor,
        outcome="success" if disclosure.permit else "denied",
        patient_key=patient_key,
        document_ids=document_ids,
        purpose=access.purpose.value,
        rule=decision.rule.value if decision else None,
        consent_version=decision.consent_version if decision else None,
        detail=access.audit_detail() | detail,
    )


def by_access(reader: str, shown: Iterable[tuple[T, Access]]) -> dict[Access, list[T]]:
    """What a search returned, grouped by the access that disclosed it; the reader's own treatment
    first, present even when the search returned nothing (its record is the search's own)."""
    groups: dict[Access, list[T]] = {Access(reader): []}
    for item, access in shown:
        groups.setdefault(access, []).append(item)
    return groups


@dataclass(frozen=True)
class Shown:
    """What a search's audit record names for one access: the documents, the newest consent version
    read, and the domain's own detail."""

    document_ids: list[str]
    consent_version: int | None
    detail: dict[str, Any]


async def record_search(
    node: HubNode,
    session: AsyncSession,
    action: str,
    actor: TokenClaims,
    patient_key: str,
    counts: dict[str, int],
    shown: Iterable[tuple[Access, Shown]],
) -> None:
    """One record per access a search disclosed under (``by_access``); the first, the search's own,
    carries its ``counts``."""
    for n, (access, group) in enumerate(shown):
        await node.audit.record(
            session,
            action=action,
            actor=actor,
            outcome="success",
            patient_key=patient_key,
            document_ids=group.document_ids,
            purpose=access.purpose.value,
            consent_version=group.consent_version,
            detail=(counts if n == 0 else {}) | access.audit_detail() | group.detail,
        )
