"""One deterministic K-CDA example per document type, for docs/kcda.md and its test.

The example FHIR documents of docs/fhir-profiles.md (hie_schemas.documents.examples) written as
K-CDA by ``fhir_to_cda`` with a fixed random part, indented for reading.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hie_schemas.cda.writer import fhir_to_cda
from hie_schemas.cda.xml import parse_xml
from hie_schemas.codes import DocumentType
from hie_schemas.documents.examples import example_submission

EXAMPLE_RANDOM = 17


def example_xml(kind: DocumentType) -> str:
    """The K-CDA of the example document of ``kind``, indented by two spaces."""
    submission = example_submission(kind)
    document = next(e["resource"] for e in submission["entry"] if e["resource"]["resourceType"] == "Bundle")
    root = parse_xml(fhir_to_cda(document, rand=lambda: EXAMPLE_RANDOM))
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")
