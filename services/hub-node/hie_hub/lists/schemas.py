"""List at this hub (MHD ITI-66): its search parameters."""

from __future__ import annotations

from hie_hub.core.search import DATE, PAGING, PATIENT, SearchParameter

# What the router accepts and the CapabilityStatement declares.
LIST_SEARCH: dict[str, SearchParameter] = {
    "patient.identifier": SearchParameter("token", PATIENT),
    "code": SearchParameter("token", "submissionset (folders are not kept)"),
    "date": SearchParameter("date", f"List.date; {DATE}"),
    "status": SearchParameter("token", "current"),
    "identifier": SearchParameter("token", "SubmissionSet identifier, system|value or value"),
    "_count": SearchParameter("number", "page size"),
    "_cursor": SearchParameter("string", PAGING),
}
