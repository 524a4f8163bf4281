"""What the hub writes into and reads from a DocumentReference it stores (MHD's XDS attributes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hie_schemas.codes import HIRA_DEPARTMENT
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM, RRN_SYSTEM


def organization(code: str) -> dict[str, Any]:
    return {"type": "Organization", "identifier": {"system": KRNPI_SYSTEM, "value": code}}


def document_reference(document_id: str) -> dict[str, Any]:
    return {"reference": f"DocumentReference/{document_id}"}


def scrub_rrn(value: Any, patient_key: str) -> Any:
    """Replace every RRN identifier left in a resource by the patient key (defence in depth: the
    document parser already rewrites them; nothing with an RRN may reach the database)."""
    if isinstance(value, dict):
        if value.get("system") == RRN_SYSTEM and "value" in value:
            return {**value, "system": PATIENT_KEY_SYSTEM, "value": patient_key}
        return {k: scrub_rrn(v, patient_key) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_rrn(v, patient_key) for v in value]
    return value


def rename_references(value: Any, renames: dict[str, str]) -> Any:
    """A copy of ``value`` with every ``reference`` found in ``renames`` replaced."""
    if isinstance(value, dict):
        return {
            k: (
                renames.get(v, v)
                if k == "reference" and isinstance(v, str)
                else rename_references(v, renames)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [rename_references(v, renames) for v in value]
    return value


def stamp_metadata(
    docref: dict[str, Any], *, author: str, department: str | None, created_at: datetime
) -> dict[str, Any]:
    """Write the document's metadata into its DocumentReference where MHD maps the XDS attributes
    (author institution, creationTime → attachment.creation, practice setting), so that a hub the
    document is delivered to reads the same values the consent rule was asked about."""
    stamped = dict(docref)
    authors = list(stamped.get("author") or [])
    if not any((a.get("identifier") or {}).get("value") == author for a in authors if isinstance(a, dict)):
        authors.append(organization(author))
    stamped["author"] = authors
    contents = [dict(c) for c in stamped.get("content") or [{}]]
    contents[0]["attachment"] = {**(contents[0].get("attachment") or {}), "creation": created_at.isoformat()}
    stamped["content"] = contents
    if department is not None:
        context = dict(stamped.get("context") or {})
        setting = dict(context.get("practiceSetting") or {})
        codings = list(setting.get("coding") or [])
        if not any(c.get("system") == HIRA_DEPARTMENT for c in codings):
            codings.append({"system": HIRA_DEPARTMENT, "code": department})
        context["practiceSetting"] = {**setting, "coding": codings}
        stamped["context"] = context
    return stamped


def read_metadata(docref: dict[str, Any]) -> tuple[str | None, datetime | None]:
    """(department, created_at) as ``stamp_metadata`` wrote them."""
    department = None
    for coding in ((docref.get("context") or {}).get("practiceSetting") or {}).get("coding") or []:
        if coding.get("system") == HIRA_DEPARTMENT and coding.get("code"):
            department = str(coding["code"])
    created_at = None
    contents = docref.get("content") or [{}]
    raw = (contents[0].get("attachment") or {}).get("creation")
    if isinstance(raw, str):
        try:
            created_at = datetime.fromisoformat(raw)
        except ValueError:
            created_at = None
    return department, created_at
