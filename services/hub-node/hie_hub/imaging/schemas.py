"""ImagingStudy at this hub (XDS-I.b): its search parameters."""

from __future__ import annotations

from hie_hub.core.search import PAGING, PATIENT, SearchParameter

# What the router accepts and the CapabilityStatement declares.
STUDY_SEARCH: dict[str, SearchParameter] = {
    "patient.identifier": SearchParameter("token", PATIENT),
    "identifier": SearchParameter(
        "token",
        "urn:dicom:uid|urn:oid:<Study Instance UID> (urn:oid: may be left out), |<accession number>, "
        "or a bare value for either; comma = or",
    ),
    "_count": SearchParameter("number", "page size (default 100, at most 1000)"),
    "_cursor": SearchParameter("string", PAGING),
}
