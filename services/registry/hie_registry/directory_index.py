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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from hie_platform.db import Database
from hie_registry import repository
from hie_registry.models import Hub, Institution
from hie_schemas.directory import InstitutionKind, InstitutionState

# Distinct searches kept per snapshot; past it the cache starts again (a snapshot lives until a change).
MAX_CACHED_SEARCHES = 4096

Filter = tuple[tuple[str, str], ...]
Render = Callable[[Institution, dict[str, str], bool], dict[str, Any]]  # directory_endpoints.organization


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the directory: institutions in code order and the hubs' codes."""

    institutions: tuple[Institution, ...]
    hub_codes: dict[str, str]
    by_code: dict[str, Institution]
    _matches: dict[Filter, list[Institution]] = field(default_factory=dict)
    _public: dict[str, dict[str, Any]] = field(default_factory=dict)

    def public(self, inst: Institution, build: Render) -> dict[str, Any]:
        """An institution's public resource, built once per snapshot (it cannot change within one)."""
        resource = self._public.get(inst.code)
        if resource is None:
            resource = self._public[inst.code] = build(inst, self.hub_codes, False)
        return resource

    def search(self, criteria: dict[str, str]) -> list[Institution]:
        """The institutions that match every criterion, in code order (computed once per search)."""
        key: Filter = tuple(sorted(criteria.items()))
        found = self._matches.get(key)
        if found is None:
            test = self._predicate(criteria)
            found = [inst for inst in self.institutions if test(inst)]
            if len(self._matches) >= MAX_CACHED_SEARCHES:
                self._matches.clear()
            self._matches[key] = found
        return found

    def _predicate(self, criteria: dict[str, str]) -> Callable[[Institution], bool]:
        tests: list[Callable[[Institution], bool]] = []
        if name := criteria.get("name"):
            term = name.lower()
            tests.append(lambda i: term in i.name.lower() or term in (i.name_en or "").lower())
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
            institutions, hub_codes = await repository.directory(session)
        return Snapshot(
            institutions=institutions,
            hub_codes=hub_codes,
            by_code={inst.code: inst for inst in institutions},
        )


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
