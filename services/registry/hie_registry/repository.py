"""All SQL of the registry service: institutions, hubs, clients, signing keys, history, locator."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Insert, Select, Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from hie_platform.db import insert_of
from hie_registry.models import (
    Client,
    ExchangeCount,
    Hub,
    Institution,
    InstitutionEvent,
    LocatorEntry,
    SigningKey,
)

# --- institutions ------------------------------------------------------------------------------------


async def institution(session: AsyncSession, code: str, *, for_update: bool = False) -> Institution | None:
    return await session.get(Institution, code, with_for_update=for_update)


async def add_institution(session: AsyncSession, inst: Institution) -> None:
    """Insert now: the events and the hub row that follow refer to it."""
    session.add(inst)
    await session.flush()


async def institution_codes(session: AsyncSession) -> set[str]:
    return set((await session.scalars(select(Institution.code))).all())


async def institutions(
    session: AsyncSession, *, hub: str | None = None, kind: str | None = None, state: str | None = None
) -> list[Institution]:
    """Institutions in code order, each given filter an exact match."""
    query = select(Institution).order_by(Institution.code)
    for column, value in ((Institution.hub, hub), (Institution.kind, kind), (Institution.state, state)):
        if value is not None:
            query = query.where(column == value)
    return list((await session.scalars(query)).all())


async def institutions_in(session: AsyncSession, states: Iterable[str]) -> list[Institution]:
    """Institutions in the given states, oldest application first."""
    query = (
        select(Institution)
        .where(Institution.state.in_(list(states)))
        .order_by(Institution.created_at, Institution.code)
    )
    return list((await session.scalars(query)).all())


async def regions(session: AsyncSession) -> list[str]:
    return sorted(r for r in (await session.scalars(select(Institution.region).distinct())).all() if r)


def _filtered(query: Select[Any], params: dict[str, str]) -> Select[Any]:
    if params.get("name"):
        pattern = f"%{params['name'].lower()}%"
        query = query.where(
            func.lower(Institution.name).like(pattern) | func.lower(Institution.name_en).like(pattern)
        )
    for column, key in (
        (Institution.region, "region"),
        (Institution.kind, "kind"),
        (Institution.hub, "hub"),
        (Institution.state, "state"),
    ):
        if params.get(key):
            query = query.where(column == params[key])
    return query


async def directory_page(
    session: AsyncSession, params: dict[str, str], size: int, page: int
) -> tuple[int, list[Institution]]:
    """The console's directory: how many match (name substring, exact region/kind/hub/state) and one
    page of them in name order."""
    query = _filtered(select(Institution), params)
    total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    ordered = query.order_by(Institution.name, Institution.code).limit(size).offset((page - 1) * size)
    return total, list((await session.scalars(ordered)).all())


async def directory(
    session: AsyncSession, columns: Sequence[str]
) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    """Every institution's ``columns`` in code order (plain rows, no ORM objects), and each hub's
    institution code by slug."""
    query = select(*(getattr(Institution, name) for name in columns)).order_by(Institution.code)
    rows = [tuple(row) for row in (await session.execute(query)).all()]
    hubs = (await session.execute(select(Hub.slug, Hub.institution_code))).all()
    return rows, {row.slug: row.institution_code for row in hubs}


# --- hubs --------------------------------------------------------------------------------------------


async def hub(session: AsyncSession, slug: str) -> Hub | None:
    return await session.get(Hub, slug)


def add_hub(session: AsyncSession, row: Hub) -> None:
    session.add(row)


async def hubs(session: AsyncSession) -> list[tuple[Hub, Institution]]:
    """Every hub with its institution, by slug."""
    query = select(Hub, Institution).join(Institution, Hub.institution_code == Institution.code)
    rows = (await session.execute(query.order_by(Hub.slug))).all()
    return [(h, i) for h, i in rows]


async def hub_slugs(session: AsyncSession) -> list[str]:
    return list((await session.scalars(select(Hub.slug).order_by(Hub.slug))).all())


# --- clients -----------------------------------------------------------------------------------------


async def client(session: AsyncSession, client_id: str) -> Client | None:
    return await session.get(Client, client_id)


def add_client(session: AsyncSession, row: Client) -> None:
    session.add(row)


async def flush(session: AsyncSession) -> None:
    """Write the changes made to loaded rows now (their errors surface here, not at commit)."""
    await session.flush()


# --- lifecycle history -------------------------------------------------------------------------------


def add_event(session: AsyncSession, row: InstitutionEvent) -> None:
    session.add(row)


async def events(session: AsyncSession, code: str) -> list[InstitutionEvent]:
    """An institution's lifecycle steps, in the order taken."""
    query = select(InstitutionEvent).where(InstitutionEvent.code == code).order_by(InstitutionEvent.id)
    return list((await session.scalars(query)).all())


async def application(session: AsyncSession, code: str) -> InstitutionEvent | None:
    """The institution's application step (its samples are kept in the evidence)."""
    query = select(InstitutionEvent).where(InstitutionEvent.code == code, InstitutionEvent.action == "apply")
    return await session.scalar(query)


async def event_count(session: AsyncSession, code: str) -> int:
    return int(await session.scalar(select(func.count()).where(InstitutionEvent.code == code)) or 0)


async def latest_evidence(
    session: AsyncSession, codes: Sequence[str], action: str
) -> dict[str, dict[str, Any]]:
    """The evidence of each institution's latest ``action`` step."""
    query = (
        select(InstitutionEvent)
        .where(InstitutionEvent.code.in_(list(codes)), InstitutionEvent.action == action)
        .order_by(InstitutionEvent.id)
    )
    return {r.code: dict(r.evidence) for r in await session.scalars(query)}


# --- signing keys ------------------------------------------------------------------------------------


async def add_signing_key(session: AsyncSession, row: SigningKey) -> None:
    session.add(row)
    await session.flush()


async def signing_keys(session: AsyncSession, *, unretired: bool = False) -> list[SigningKey]:
    query = select(SigningKey)
    if unretired:
        query = query.where(SigningKey.retired_at.is_(None))
    return list((await session.scalars(query)).all())


# --- record locator and statistics -------------------------------------------------------------------


async def seen(session: AsyncSession, patient_key: str, hub: str, at: datetime) -> None:
    """Note that ``hub`` holds documents for ``patient_key`` (first and last time seen): one upsert,
    no read first, and no race between the event and the locate-add RPC inserting the same entry."""
    row = {"patient_key": patient_key, "hub": hub, "first_seen": at, "last_seen": at}
    await session.execute(_upserts(session.get_bind().dialect.name).seen, row)


async def count_exchange(session: AsyncSession, at: datetime, kind: str) -> None:
    """One more exchange of ``kind`` in ``at``'s month: one upsert."""
    row = {"month": at.strftime("%Y-%m"), "kind": kind, "count": 1}
    await session.execute(_upserts(session.get_bind().dialect.name).count_exchange, row)


@dataclass(frozen=True)
class _Upserts:
    seen: Insert
    count_exchange: Insert


@functools.cache
def _upserts(dialect: str) -> _Upserts:
    """The locator's two upserts, built once per dialect: they run for every hub event the registry
    takes in, and building them each time (the ON CONFLICT clause, its EXCLUDED columns, the cache
    key SQLAlchemy derives from them) made a ``seen`` cost 170-200 µs of CPU instead of 34 (SQLite,
    2,000 in one transaction)."""
    later = func.greatest if dialect == "postgresql" else func.max
    locator, counts = cast(Table, LocatorEntry.__table__), cast(Table, ExchangeCount.__table__)
    seen = insert_of(dialect, locator)
    return _Upserts(
        seen=seen.on_conflict_do_update(
            index_elements=[locator.c.patient_key, locator.c.hub],
            set_={"last_seen": later(locator.c.last_seen, seen.excluded.last_seen)},
        ),
        count_exchange=insert_of(dialect, counts).on_conflict_do_update(
            index_elements=[counts.c.month, counts.c.kind], set_={"count": counts.c.count + 1}
        ),
    )


async def hubs_for(session: AsyncSession, patient_key: str) -> list[str]:
    query = select(LocatorEntry.hub).where(LocatorEntry.patient_key == patient_key)
    return list((await session.scalars(query.order_by(LocatorEntry.hub))).all())


async def _grouped(session: AsyncSession, column: InstrumentedAttribute[Any]) -> dict[str, int]:
    rows = (await session.execute(select(column, func.count()).group_by(column))).all()
    return {str(key): int(count) for key, count in rows}


async def statistics(session: AsyncSession) -> dict[str, object]:
    """Institutions by kind, region and state; exchanges per month and kind."""
    query = select(ExchangeCount.month, ExchangeCount.kind, ExchangeCount.count)
    exchanges = (await session.execute(query.order_by(ExchangeCount.month))).all()
    return {
        "institutions": {
            "by_kind": await _grouped(session, Institution.kind),
            "by_region": await _grouped(session, Institution.region),
            "by_state": await _grouped(session, Institution.state),
        },
        "exchanges_per_month": [{"month": m, "kind": k, "count": c} for m, k, c in exchanges],
    }
