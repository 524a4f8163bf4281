"""DocumentReference at this hub: its search parameters (ITI-67) and what the hub writes into and
reads from a DocumentReference it stores (MHD's XDS attributes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hie_hub.core.params import SearchParams, document_types
from hie_hub.core.search import DATE, KRNPI, PAGES, SUMMARY_PARAMS, SearchParameter
from hie_hub.models import DocumentStatus
from hie_platform.errors import BadRequest
from hie_schemas.codes import HIRA_DEPARTMENT
from hie_schemas.events import DocumentFilter
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM, RRN_SYSTEM

# Without a status parameter ITI-67 finds what is not entered-in-error (such a document stays readable).
DEFAULT_STATUSES = (DocumentStatus.CURRENT.value, DocumentStatus.SUPERSEDED.value)


@dataclass(frozen=True)
class DocumentParameter(SearchParameter):
    """A row of DOCUMENT_SEARCH; ``read`` turns the parameter into fields of the DocumentFilter that
    the local query (hie_hub.documents.repository.documents_of_patient) and every holding hub apply."""

    read: Callable[[SearchParams], dict[str, Any]] | None = None


def _types(params: SearchParams) -> dict[str, Any]:
    types = params.any_of("type")
    return {} if types is None else {"types": document_types(types)}


def _statuses(params: SearchParams) -> dict[str, Any]:
    return {"statuses": params.any_of("status") or list(DEFAULT_STATUSES)}


def _dates(params: SearchParams) -> dict[str, Any]:
    """The tightest bounds of every ``date`` (repeats are ANDed); the exact prefixes are checked again
    on the rows (DocumentQuery.dates)."""
    bounds = params.dates("date")
    lower = [b.lower for b in bounds if b.lower is not None]
    upper = [b.upper for b in bounds if b.upper is not None]
    return {"created_from": max(lower, default=None), "created_before": min(upper, default=None)}


def _authors(params: SearchParams) -> dict[str, Any]:
    """author, author:identifier and author.identifier name one institution (they must agree)."""
    author = params.institution("author")
    chained = params.one("author.identifier")
    if chained is not None:
        chained_code = SearchParams.institution_code("author.identifier", chained)
        if author is not None and author != chained_code:
            raise BadRequest("author and author.identifier disagree", expression=("author",))
        author = chained_code
    return {} if author is None else {"authors": [author]}


AUTHOR = f"author institution: {KRNPI}"
# ITI-67's parameters: what the router accepts, the CapabilityStatement declares and, through ``read``,
# the filter every hub applies. docs/architecture.md "Adding a search parameter" says how to add one.
DOCUMENT_SEARCH: dict[str, SearchParameter] = {
    "patient.identifier": SearchParameter("token", "required: RRN (mois-rrn) or patient-key system|value"),
    "type": DocumentParameter(
        "token", "K-CDA template (urn:oid:1.2.410.100110.40.2.1|n) or LOINC document type; comma = or", _types
    ),
    "status": DocumentParameter(
        "token",
        "current | superseded | entered-in-error; comma = or (default: current, superseded; an "
        "entered-in-error document is found only when asked for, and stays readable)",
        _statuses,
    ),
    "date": DocumentParameter(
        "date", f"the document's time (Composition.date = DocumentReference.date); {DATE}", _dates
    ),
    "author": DocumentParameter("reference", AUTHOR, _authors),
    "author:identifier": SearchParameter("reference", AUTHOR),  # read with author
    "author.identifier": SearchParameter("token", AUTHOR),  # read with author
    **PAGES,
    "_federated": SearchParameter(
        "token", "true: search every hub that holds documents for the patient (walk-in search)"
    ),
    "purpose": SearchParameter(
        "token", "with _federated: treatment (default) | emergency (needs justification)"
    ),
    "justification": SearchParameter(
        "string", "why emergency access is needed (or header X-HIE-Justification)"
    ),
    **SUMMARY_PARAMS,
}


def document_filter_fields(params: SearchParams) -> dict[str, Any]:
    """The DocumentFilter fields the parameters of a search give (every row with a ``read``)."""
    fields: dict[str, Any] = {}
    for name, row in DOCUMENT_SEARCH.items():
        if isinstance(row, DocumentParameter) and row.read is not None:
            given = row.read(params)
            # DocumentFilter ignores unknown fields (a hub may be a version behind): a row whose field
            # it lacks would be dropped silently, at this hub and at every holder.
            if unknown := set(given) - set(DocumentFilter.model_fields):
                raise TypeError(
                    f"search parameter {name} fills {sorted(unknown)}, not fields of DocumentFilter"
                )
            fields |= given
    return fields


def organization(code: str) -> dict[str, Any]:
    return {"type": "Organization", "identifier": {"system": KRNPI_SYSTEM, "value": code}}


def document_reference(document_id: str) -> dict[str, Any]:
    return {"reference": f"DocumentReference/{document_id}"}


def scrub_rrn(value: Any, patient_key: str) -> Any:
    """Replace every RRN identifier left in a resource by the patient key (defence in depth: the
    document parser already rewrites them; nothing with an RRN may reach the database).

    Copy on write: what holds no RRN identifier is returned itself, so the usual call, on a resource
    already pseudonymised, copies nothing (27 µs instead of 57 µs on a 10 KB document Bundle)."""
    kind = type(value)
    if kind is dict:
        if value.get("system") == RRN_SYSTEM and "value" in value:
            return {**value, "system": PATIENT_KEY_SYSTEM, "value": patient_key}
        items: Any = value.items()
    elif kind is list:
        items = enumerate(value)
    else:
        return value
    copy: Any = None
    for key, child in items:
        if type(child) is dict or type(child) is list:
            scrubbed = scrub_rrn(child, patient_key)
            if scrubbed is not child:
                if copy is None:
                    copy = dict(value) if kind is dict else list(value)
                copy[key] = scrubbed
    return value if copy is None else copy


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
