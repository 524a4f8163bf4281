"""The consent replica's table held in memory, so that a consent decision reads no database (issue 13
point 4: one aiosqlite SELECT per decision was 93% of a hub-local decision).

``ConsentMemory`` maps a patient key to that patient's versions, oldest first, as the
``consent_replica`` table holds them. It is filled by ``hie_platform.consent_replica.ConsentReplica``
(how and when is written there); this module only keeps the versions and says whether a patient's
history is whole. Reads and writes happen on the event loop; a reader in another thread sees the
whole old or the whole new tuple of a patient, never a half-updated one.

Memory (tracemalloc, 100,000 patients with one version each; docs/operations.md "Sizing: consent
replica"): with ``ConsentState(...)`` a patient's entry cost ~1,560 B besides its key, ~1,160 B of
it the state's own ``__pydantic_fields_set__`` set and two empty frozensets. Built here with
``model_construct`` over one shared field set and one shared empty frozenset it costs ~400 B. The
rows come from the service's own table (written from validated events), so skipping validation
skips nothing that could be wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from hie_schemas.consent import ConsentPolicy, ConsentState

# Shared by every state. pydantic mutates a model's field set only on assignment, which a frozen
# model refuses, and model_copy copies it first (pydantic 2.14 main.py __copy__, model_copy).
_FIELDS: set[str] = set(ConsentState.model_fields)
_EMPTY: frozenset[str] = frozenset()
_NONE: tuple[ConsentState, ...] = ()


def as_utc(value: datetime) -> datetime:
    """SQLite hands back (and stores) naive datetimes: they are UTC here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _codes(values: Collection[str]) -> frozenset[str]:
    # Institution codes repeat across patients: interned, each is held once.
    return frozenset(map(sys.intern, values)) if values else _EMPTY


def consent_state(
    version: int,
    policy: str | ConsentPolicy,
    effective_at: datetime,
    excluded_institutions: Collection[str],
    excluded_departments: Collection[str],
) -> ConsentState:
    """One replicated version, compact (see the module docstring for the measured sizes)."""
    return ConsentState.model_construct(
        _FIELDS,
        version=int(version),
        policy=ConsentPolicy(policy),
        effective_at=as_utc(effective_at),
        excluded_institutions=_codes(excluded_institutions),
        excluded_departments=_codes(excluded_departments),
    )


def state_of_row(row: Any) -> tuple[str, ConsentState]:
    """(patient key, version) of a ``consent_replica`` row."""
    return sys.intern(row.patient_key), consent_state(
        row.version, row.policy, row.effective_at, row.excluded_institutions, row.excluded_departments
    )


class ConsentMemory:
    """patient key -> replicated versions, oldest first (duplicates merged away)."""

    def __init__(self) -> None:
        self._versions: dict[str, tuple[ConsentState, ...]] = {}
        self.top_sequence = 0  # the highest HIE_CONSENT sequence merged in (for the peers' poll)

    def __len__(self) -> int:
        return len(self._versions)

    def __iter__(self) -> Iterator[str]:
        """The patients it holds versions of."""
        return iter(list(self._versions))

    def history(self, patient_key: str) -> Sequence[ConsentState]:
        return self._versions.get(patient_key, _NONE)

    def whole(self, patient_key: str) -> bool:
        """Every version from 1 up to the newest is here. Versions start at 1 and are applied only
        after their predecessor, so a hole means a peer's version has not been merged yet."""
        versions = self._versions.get(patient_key, _NONE)
        return not versions or versions[-1].version == len(versions)

    def knows(self, patient_key: str, version: int) -> bool:
        versions = self._versions.get(patient_key, _NONE)
        return any(state.version == version for state in versions)

    def merge(self, states: Iterable[tuple[str, ConsentState]], sequence: int = 0) -> set[str]:
        """Add versions (idempotent); return the patients whose history changed."""
        added: dict[str, list[ConsentState]] = {}
        for key, state in states:
            if not self.knows(key, state.version):
                added.setdefault(key, []).append(state)
        for key, new in added.items():
            merged = {s.version: s for s in (*self._versions.get(key, _NONE), *new)}
            # One assignment: a reader sees the old tuple or the new one.
            self._versions[key] = tuple(merged[v] for v in sorted(merged))
        self.top_sequence = max(self.top_sequence, sequence)
        return set(added)
