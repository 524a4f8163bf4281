"""The public directory held in memory: every institution and hub, with the answers to searches.

Measured at 10,000 institutions (issue 13): a name search cost a full-table LIKE for the page, a
second one for COUNT, and a `SELECT hubs` on every request (p50 86 ms, 89-141 req/s against 688 for
/healthz). The directory changes a few times a day and is read all the time, so the registry keeps a
snapshot of it and the matches of each distinct search; a search is a dictionary lookup and a slice.
Substring search in Python keeps 1- and 2-character Korean terms working ("내과", "서울"), which a
trigram index (SQLite FTS5 trigram, pg_trgm) would not.

A snapshot is rebuilt, once, on the first read after a commit that touched an institution or a hub:
the registry runs as one replica (deploy/k8s/base/registry), and every write goes through its own
sessions, so a change is visible to the next request after the commit that made it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from hie_platform.db import Database
from hie_registry import repository
from hie_registry.models import Hub, Institution
from hie_schemas.directory import InstitutionKind, InstitutionState

# Distinct searches kept per snapshot; past it the cache starts again (a snapshot lives until a change).
MAX_CACHED_SEARCHES = 4096
# Criteria answered from a per-value index of positions instead of a scan of every institution.
INDEXED = ("code", "region", "kind", "hub")

Filter = tuple[tuple[str, str], ...]


class Entry(NamedTuple):
    """One institution as the directory shows it.

    Plain values, not the ORM object: at 10,000 institutions the ORM objects were 81,558 objects the
    collector tracks, these are 11,625 (a tuple subclass stays tracked, but as one object)."""

    code: str
    name: str
    name_en: str | None
    kind: str
    region: str | None
    state: str
    hub: str | None
    fhir_base: str | None
    dicom_ae: str | None
    dicom_host: str | None
    dicom_port: int | None
    contacts: dict[str, Any] | None


Render = Callable[[Entry, dict[str, str], bool], dict[str, Any]]  # directory_endpoints.organization


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the directory: institutions in code order, the hubs' codes, and the
    positions of the institutions by code, region, kind and hub."""

    institutions: tuple[Entry, ...]
    hub_codes: dict[str, str]
    by_code: dict[str, Entry]
    _positions: dict[str, dict[str, tuple[int, ...]]]
    _names: tuple[tuple[str, str], ...]  # (name, name_en) lower-cased, by position
    _matches: dict[Filter, list[Entry]] = field(default_factory=dict)
    _public: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def build(cls, rows: Sequence[tuple[Any, ...]], hub_codes: dict[str, str]) -> Snapshot:
        institutions = tuple(Entry(*row) for row in rows)
        positions: dict[str, dict[str, list[int]]] = {key: {} for key in INDEXED}
        for n, inst in enumerate(institutions):
            for key in INDEXED:
                positions[key].setdefault(getattr(inst, key) or "", []).append(n)
        return cls(
            institutions=institutions,
            hub_codes=hub_codes,
            by_code={inst.code: inst for inst in institutions},
            _positions={k: {v: tuple(p) for v, p in by.items()} for k, by in positions.items()},
            _names=tuple((i.name.lower(), (i.name_en or "").lower()) for i in institutions),
        )

    def public(self, inst: Entry, build: Render) -> bytes:
        """An institution's public resource as JSON, built once per snapshot (it cannot change within
        one); bytes, so the collector never walks the cache."""
        resource = self._public.get(inst.code)
        if resource is None:
            resource = self._public[inst.code] = orjson.dumps(build(inst, self.hub_codes, False))
        return resource

    def search(self, criteria: dict[str, str]) -> list[Entry]:
        """The institutions that match every criterion, in code order (computed once per search)."""
        key: Filter = tuple(sorted(criteria.items()))
        found = self._matches.get(key)
        if found is None:
            found = self._find(criteria)
            if len(self._matches) >= MAX_CACHED_SEARCHES:
                self._matches.clear()
            self._matches[key] = found
        return found

    def _find(self, criteria: dict[str, str]) -> list[Entry]:
        """Scan only the smallest indexed group that a criterion selects (every position without one)."""
        candidates: Sequence[int] = range(len(self.institutions))
        for key in INDEXED:
            if value := criteria.get(key):
                group = self._positions[key].get(value, ())
                candidates = group if len(group) < len(candidates) else candidates
        test = _predicate(criteria)
        names, term = self._names, (criteria.get("name") or "").lower()
        return [
            self.institutions[n]
            for n in candidates
            if (term in names[n][0] or term in names[n][1]) and test(self.institutions[n])
        ]


def _predicate(criteria: dict[str, str]) -> Callable[[Entry], bool]:
    """Every criterion but the name, which _find matches against the lower-cased names."""
    tests: list[Callable[[Entry], bool]] = []
    if region := criteria.get("region"):
        tests.append(lambda i: i.region == region)
    if kind := criteria.get("kind"):
        tests.append(lambda i: i.kind == kind)
    if "hub" in criteria:
        hub, clinic = criteria["hub"], InstitutionKind.CLINIC.value
        tests.append(lambda i: i.hub == hub and i.kind == clinic)
    if active := criteria.get("active"):
        good = active == "true"
        tests.append(lambda i: (i.state == InstitutionState.ACTIVE.value) is good)
    if code := criteria.get("code"):
        tests.append(lambda i: i.code == code)
    return lambda inst: all(test(inst) for test in tests)


class DirectoryIndex:
    """The current snapshot, rebuilt lazily after a committed change (single-flight)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._generation = 0
        self._built = -1
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()
        _INDEXES[db.writer.sync_engine] = self

    def invalidate(self) -> None:
        self._generation += 1

    async def snapshot(self) -> Snapshot:
        if self._snapshot is not None and self._built == self._generation:
            return self._snapshot
        async with self._lock:
            if self._snapshot is None or self._built != self._generation:
                generation = self._generation  # a change committed while reading rebuilds again
                self._snapshot = await self._load()
                self._built = generation
            return self._snapshot

    async def _load(self) -> Snapshot:
        async with self._db.read_sessions() as session:
            rows, hub_codes = await repository.directory(session, Entry._fields)
        return Snapshot.build(rows, hub_codes)


# The registry's writer engine -> its index (an app per engine; several apps share a test process).
_INDEXES: weakref.WeakKeyDictionary[Engine, DirectoryIndex] = weakref.WeakKeyDictionary()
_CHANGED = "hie_registry.directory_changed"


@event.listens_for(Session, "before_flush")
def _note_directory_change(session: Session, _context: Any, _instances: Any) -> None:
    if any(isinstance(o, Institution | Hub) for o in (*session.new, *session.dirty, *session.deleted)):
        session.info[_CHANGED] = True


@event.listens_for(Session, "after_commit")
def _invalidate_after_commit(session: Session) -> None:
    if session.info.pop(_CHANGED, False):
        bind = session.get_bind()
        engine = bind if isinstance(bind, Engine) else bind.engine
        if (index := _INDEXES.get(engine)) is not None:
            index.invalidate()


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED, None)
