"""What FHIR and K-CDA call the same thing: code systems as URIs and OIDs, identifiers, timestamps.

CDA names a code system or an identifier namespace by OID, FHIR by URI. The international systems
keep their registered OIDs (HL7 OID registry). A Korean system whose OID the hub has no registered
value for (KCD-8, HIRA EDI, HIRA department, the RRN, the federation's patient key) gets a
self-assigned ``2.25`` OID derived from its URI (ITU-T X.667: a UUID as an OID, so it cannot collide
with anyone's arc); the URI also travels in ``codeSystemName``, so any coding survives the trip.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime

from hie_schemas import codes
from hie_schemas.codes import DOCUMENT_KINDS, TEMPLATE_ROOT, DocumentKind, Section
from hie_schemas.identifiers import (
    INSTITUTION_OID_ROOT,
    PATIENT_KEY_SYSTEM,
    RRN_SYSTEM,
)

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CDA_TYPE_ID = ("2.16.840.1.113883.1.3", "POCD_HD000040")
ADMINISTRATIVE_GENDER = "2.16.840.1.113883.5.1"
CONFIDENTIALITY = "2.16.840.1.113883.5.25"


def uuid_oid(uri: str) -> str:
    """The 2.25 OID of a URI (uuid5 in the URL namespace, as an integer arc)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, uri).int}"


_REGISTERED: dict[str, str] = {
    codes.LOINC: "2.16.840.1.113883.6.1",
    SNOMED: "2.16.840.1.113883.6.96",
    codes.ATC: "2.16.840.1.113883.6.73",
    UCUM: "2.16.840.1.113883.6.8",
    codes.DCM: "1.2.840.10008.2.16.4",
}
_SELF_ASSIGNED = (
    codes.KCD8,
    codes.HIRA_EDI_MEDICATION,
    codes.HIRA_DEPARTMENT,
    RRN_SYSTEM,
    PATIENT_KEY_SYSTEM,
)
SYSTEM_OIDS: dict[str, str] = _REGISTERED | {uri: uuid_oid(uri) for uri in _SELF_ASSIGNED}
_SYSTEM_BY_OID = {oid: uri for uri, oid in SYSTEM_OIDS.items()}
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def is_oid(value: str | None) -> bool:
    return value is not None and _OID.fullmatch(value) is not None


def system_oid(system: str) -> str:
    """The OID CDA names ``system`` by: registered, ``urn:oid:`` stripped, else a 2.25 OID."""
    if system in SYSTEM_OIDS:
        return SYSTEM_OIDS[system]
    if system.startswith("urn:oid:") and is_oid(system[8:]):
        return system[8:]
    return uuid_oid(system)


def system_uri(oid: str, name: str | None = None) -> str:
    """The FHIR URI of a CDA code system or id root (``name`` is codeSystemName, when it is the URI)."""
    if oid in _SYSTEM_BY_OID:
        return _SYSTEM_BY_OID[oid]
    if name and ":" in name and uuid_oid(name) == oid:
        return name
    return f"urn:oid:{oid}"


def institution_code(oid: str | None) -> str | None:
    """요양기관기호 from an institution OID 1.2.410.100110.10.<code>."""
    if oid is None or not oid.startswith(INSTITUTION_OID_ROOT + "."):
        return None
    code = oid[len(INSTITUTION_OID_ROOT) + 1 :]
    return code if re.fullmatch(r"[0-9]{8}", code) else None


def section_by_code(code: str | None) -> Section | None:
    try:
        return Section(code) if code else None
    except ValueError:
        return None


def kind_by_template(oid: str | None) -> DocumentKind | None:
    for kind in DOCUMENT_KINDS.values():
        if kind.template_oid == oid:
            return kind
    return None


def is_template(oid: str | None) -> bool:
    return oid is not None and oid.startswith(TEMPLATE_ROOT + ".")


# --- timestamps: FHIR dateTime <-> HL7 v3 TS ---------------------------------------------------------

_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")


def to_ts(value: str) -> str:
    """HL7 v3 TS of a FHIR date or dateTime (``2025-03-04T09:30:00+09:00`` -> ``20250304093000+0900``)."""
    if "T" not in value:
        return value.replace("-", "")
    moment = datetime.fromisoformat(value)
    stamp = moment.strftime("%Y%m%d%H%M%S")
    if moment.microsecond:
        stamp += f".{moment.microsecond:06d}".rstrip("0")
    return stamp + (moment.strftime("%z") if moment.tzinfo else "")


def from_ts(value: str) -> str | None:
    """FHIR date or dateTime of an HL7 v3 TS; None when it is not one."""
    match = _TS.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if hour is None:
        return "-".join(p for p in (year, month, day) if p)
    if zone is None:  # FHIR requires a timezone once there is a time; the date is what is certain
        return f"{year}-{month}-{day}"
    clock = f"{hour}:{minute or '00'}:{second or '00'}{fraction or ''}"
    return f"{year}-{month}-{day}T{clock}{zone[:3]}:{zone[3:]}"
