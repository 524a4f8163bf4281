"""The K-CDA a hub may keep: every RRN id replaced by the patient key (design.md §5), pure.

``key_of`` derives the key (hie_schemas.identifiers.patient_key_from_rrn with the federation
secret); the caller checks that no form of the returned RRNs is left anywhere in the XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from hie_schemas.cda.vocabulary import system_oid
from hie_schemas.cda.xml import CdaError, parse_xml, tag
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM, InvalidIdentifierError

RRN_ROOT = system_oid(RRN_SYSTEM)
PATIENT_KEY_ROOT = system_oid(PATIENT_KEY_SYSTEM)


def pseudonymise_xml(xml: bytes, key_of: Callable[[str], str]) -> tuple[bytes, list[str]]:
    """(the XML with each ``id`` of the RRN root rewritten to the patient key, the RRNs it carried)."""
    root = parse_xml(xml)
    found: list[str] = []
    for element in root.iter(tag("id")):
        if element.get("root") != RRN_ROOT:
            continue
        raw = element.get("extension") or ""
        try:
            key = key_of(raw)
        except InvalidIdentifierError as exc:  # its reason names the rule, never the value
            raise CdaError(
                f"invalid resident registration number: {exc.reason}", "//id", status=400
            ) from None
        found.append(raw)
        element.attrib.update(root=PATIENT_KEY_ROOT, extension=key, assigningAuthorityName=PATIENT_KEY_SYSTEM)
    rewritten: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return rewritten, found
