"""FHIR documents of the hub: ITI-65 submissions, the exchange's document profiles, example builders."""

from hie_hub.documents.submission import Submission, SubmittedDocument, parse_submission
from hie_schemas.documents.profiles import check_document

__all__ = ["Submission", "SubmittedDocument", "check_document", "parse_submission"]
