"""What the hub's handlers share (settings, runtime, consent gate) and who may call them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from cachetools import LRUCache
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.config import HubSettings
from hie_hub.consent import ConsentGate
from hie_hub.core.unit import UnitOfWork
from hie_platform.audit import AuditTrail
from hie_platform.auth import require_scope
from hie_platform.bus import Bus
from hie_platform.db import Database
from hie_platform.errors import Forbidden
from hie_platform.http import SessionDep
from hie_platform.outbox import Outbox
from hie_platform.registry_client import RegistryClient
from hie_platform.runtime import Runtime
from hie_schemas.auth import SCOPE_EXCHANGE, TokenClaims
from hie_schemas.directory import InstitutionKind


class ChangeSignal:
    """Wakes whoever waits for a change (long polls, the webhook sender) in this process; a change
    made by another replica of the hub is found by their periodic look instead."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on every change too (a worker's kick)."""
        self._listeners.append(callback)

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
        for callback in self._listeners:
            callback()

    def mark(self) -> asyncio.Event:
        """Take this before looking; ``wait(mark)`` then also sees a change made while looking."""
        return self._event

    async def wait(self, timeout: float, mark: asyncio.Event | None = None) -> bool:
        """True if a change was notified (since ``mark``) within ``timeout`` seconds."""
        try:
            await asyncio.wait_for((mark or self._event).wait(), timeout)
        except TimeoutError:
            return False
        return True


class LocatorMemory:
    """Patient keys the record locator has confirmed for this hub (most recent ``size``).

    The registry never removes a locator entry, so a key it has confirmed needs no second word
    before ITI-65 answers (``federation.declare``): the publish's DocumentPublished event still
    reaches the registry and moves the entry's last_seen. The word cost a request-reply and a
    registry transaction per publish; with it remembered, the registry took about half the CPU per
    publish in the hub bench (docs/operations.md). A registry restored from an older backup is
    told again by each publish's event, as when its answer is late.
    """

    def __init__(self, size: int = 65_536) -> None:
        self._keys: LRUCache[str, None] = LRUCache(maxsize=size)

    def __contains__(self, patient_key: str) -> bool:
        return patient_key in self._keys

    def add(self, patient_key: str) -> None:
        self._keys[patient_key] = None  # the least recently confirmed goes first


@dataclass(frozen=True)
class HubNode:
    settings: HubSettings
    runtime: Runtime
    consent: ConsentGate
    tasks_changed: ChangeSignal = field(default_factory=ChangeSignal)
    webhooks_due: ChangeSignal = field(default_factory=ChangeSignal)
    located: LocatorMemory = field(default_factory=LocatorMemory)

    # The parts of the runtime that domain code uses, named here so that it does not reach through
    # ``runtime`` (issue 16 point 8); set once, as the runtime's parts never change after its start.
    hub: str = field(init=False)
    db: Database = field(init=False)
    audit: AuditTrail = field(init=False)
    outbox: Outbox = field(init=False)
    bus: Bus = field(init=False)
    registry: RegistryClient = field(init=False)

    def __post_init__(self) -> None:
        # object.__setattr__: how a frozen dataclass sets a field of its own, once, here.
        object.__setattr__(self, "hub", self.settings.hub)
        for name in ("db", "audit", "outbox", "bus", "registry"):
            object.__setattr__(self, name, getattr(self.runtime, name))


async def _node(request: Request) -> HubNode:
    node: HubNode = request.app.state.node
    return node


NodeDep = Annotated[HubNode, Depends(_node)]


async def _audit(node: NodeDep) -> AuditTrail:
    return node.audit


# The hub's audit trail, for endpoints that record an access themselves.
AuditDep = Annotated[AuditTrail, Depends(_audit)]


async def record_treatment(
    audit: AuditTrail,
    session: AsyncSession,
    action: str,
    actor: TokenClaims,
    patient_key: str,
    *,
    document_ids: list[str],
    detail: dict[str, Any] | None = None,
) -> None:
    """The audit record of an institution's own work on the records it holds or was sent (a status
    change, a Task moved, its SubmissionSets read): for treatment, and done once it is recorded."""
    await audit.record(
        session,
        action=action,
        actor=actor,
        outcome="success",
        patient_key=patient_key,
        document_ids=document_ids,
        purpose="treatment",
        detail=detail,
    )


async def _hub_actor(
    node: NodeDep, actor: Annotated[TokenClaims, Depends(require_scope(SCOPE_EXCHANGE))]
) -> TokenClaims:
    # A hub node serves its own hospital and affiliated clinics; others reach it only through their hub.
    if actor.hub != node.hub:
        raise Forbidden(
            f"institution {actor.inst} belongs to hub {actor.hub or '(none)'}; "
            f"this node serves hub {node.hub}"
        )
    return actor


HubActor = Annotated[TokenClaims, Depends(_hub_actor)]


async def _reader(
    node: NodeDep, actor: Annotated[TokenClaims, Depends(require_scope(SCOPE_EXCHANGE))]
) -> TokenClaims:
    # A public agency belongs to no hub: it reads what was submitted to it at the holder's hub
    # (documents addressed to it, its Tasks and Subscriptions), and may do nothing else there.
    if actor.kind is InstitutionKind.PUBLIC_AGENCY and actor.hub is None:
        return actor
    return await _hub_actor(node, actor)


ReaderActor = Annotated[TokenClaims, Depends(_reader)]


async def _unit(node: NodeDep, session: SessionDep) -> UnitOfWork:
    return UnitOfWork(node.db, session)


# The request's read phases and its write session, in that order (core/unit.py).
UnitDep = Annotated[UnitOfWork, Depends(_unit)]


@dataclass(frozen=True)
class Reading:
    """What an endpoint that discloses records needs: the node, the reader, the request's unit of
    work (read phases, then the write session) and the audit trail (the access is recorded in the
    request's commit)."""

    node: HubNode
    actor: TokenClaims
    unit: UnitOfWork
    audit: AuditTrail


async def _reading(node: NodeDep, actor: ReaderActor, unit: UnitDep) -> Reading:
    return Reading(node, actor, unit, node.audit)


ReadingDep = Annotated[Reading, Depends(_reading)]
