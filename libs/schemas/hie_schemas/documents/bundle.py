"""Reading FHIR JSON that was never validated: tolerant access, and references within one Bundle.

The profile checks and the hub's ITI-65 parser walk untrusted JSON with these; none of them raises on
a value of the wrong shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]


def obj(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def dicts(value: Any) -> list[Json]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def codings(concept: Any) -> list[Json]:
    return dicts(obj(concept).get("coding"))


@dataclass(frozen=True)
class Located:
    """One entry resource of a Bundle and its position."""

    index: int
    resource: Json

    @property
    def path(self) -> str:
        return f"Bundle.entry[{self.index}].resource"

    @property
    def resource_type(self) -> str | None:
        return text(self.resource.get("resourceType"))


class BundleIndex:
    """Resolves references between the entries of one Bundle: fullUrl, Type/id, or base_url/Type/id."""

    def __init__(self, bundle: Json, base_url: str | None = None) -> None:
        self.entries: list[Located] = []
        self._by_reference: dict[str, Located] = {}
        base = base_url.rstrip("/") if base_url else None
        raw_entries = bundle.get("entry")
        for i, entry in enumerate(raw_entries if isinstance(raw_entries, list) else []):
            resource = obj(entry).get("resource")
            if not isinstance(resource, dict):
                continue
            located = Located(i, resource)
            self.entries.append(located)
            keys = [text(obj(entry).get("fullUrl"))]
            rtype, rid = located.resource_type, text(resource.get("id"))
            if rtype and rid:
                keys += [f"{rtype}/{rid}", f"{base}/{rtype}/{rid}" if base else None]
            for key in keys:
                if key is not None:
                    self._by_reference.setdefault(key, located)

    def resolve(self, reference: Any) -> Located | None:
        """The entry a Reference (or a bare reference string) points to, if it is in this Bundle."""
        ref = reference if isinstance(reference, str) else obj(reference).get("reference")
        return self._by_reference.get(ref) if isinstance(ref, str) else None

    def of_type(self, *resource_types: str) -> list[Located]:
        return [e for e in self.entries if e.resource_type in resource_types]


def composition_of(document: Json) -> Json | None:
    """The Composition, which a FHIR document carries as its first entry."""
    entries = document.get("entry")
    first = entries[0] if isinstance(entries, list) and entries else None
    resource = obj(obj(first).get("resource"))
    return resource if resource.get("resourceType") == "Composition" else None
