"""A resource's search parameters as one table: the router accepts exactly its rows and the
CapabilityStatement declares them (tests/hub/test_mhd.py checks both against the running node)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

KRNPI = "hira-krnpi system|code (or the bare 8-digit code)"
PAGING = "opaque position of the next page (from the next link); pages are stable while documents are added"
DATE = "eq, gt, lt, ge, le; a date or dateTime without timezone is read in KST (+09:00)"
COUNT = "page size (default 100, at most 1000: a larger value is served as 1000, as the self link says)"
PATIENT = "required: RRN or patient-key system|value"


@dataclass(frozen=True)
class SearchParameter:
    """One row: the FHIR search parameter type and what this hub does with it."""

    type: str
    documentation: str


SearchTable = Mapping[str, SearchParameter]

# _summary and _total on the searches that give Bundle.total.
SUMMARY_PARAMS: dict[str, SearchParameter] = {
    "_summary": SearchParameter(
        "token", "count only (Bundle.total, no entries); other values are not supported"
    ),
    "_total": SearchParameter(
        "token", "none | estimate | accurate: Bundle.total is always the accurate count"
    ),
}
PAGES: dict[str, SearchParameter] = {
    "_count": SearchParameter("number", COUNT),
    "_cursor": SearchParameter("string", PAGING),
}


def declared(table: SearchTable) -> list[dict[str, str]]:
    """CapabilityStatement.rest.resource.searchParam of a table."""
    return [{"name": name, "type": p.type, "documentation": p.documentation} for name, p in table.items()]
