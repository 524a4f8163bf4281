"""K-CDA (HL7 CDA R2 with the Korean exchange templates) to and from the hub's FHIR documents, pure."""

from hie_schemas.cda.reader import cda_to_fhir
from hie_schemas.cda.writer import document_id_root, fhir_to_cda
from hie_schemas.cda.xml import CDA_MEDIA_TYPE, CdaError, parse_xml

__all__ = ["CDA_MEDIA_TYPE", "CdaError", "cda_to_fhir", "document_id_root", "fhir_to_cda", "parse_xml"]
