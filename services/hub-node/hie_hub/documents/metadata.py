"""What a submission says besides its documents: recipients, purpose of use, replaced documents."""

from __future__ import annotations

import re

from hie_platform.errors import Issue
from hie_schemas.consent import Purpose
from hie_schemas.documents import profiles
from hie_schemas.documents.profiles import Located, dicts, obj, text
from hie_schemas.identifiers import KRNPI_SYSTEM

_INSTITUTION_CODE = re.compile(r"^[0-9]{8}$")


def _issue(message: str, expression: str, code: str = "invalid") -> Issue:
    return Issue(message, code=code, expression=(expression,))


def recipients_of(submission_set: Located) -> tuple[tuple[str, ...], list[Issue]]:
    """요양기관기호 of the IHE intendedRecipient extensions, de-duplicated in order."""
    found: dict[str, None] = {}
    issues: list[Issue] = []
    for j, extension in enumerate(dicts(submission_set.resource.get("extension"))):
        if extension.get("url") != profiles.INTENDED_RECIPIENT_URL:
            continue
        identifier = obj(obj(extension.get("valueReference")).get("identifier"))
        code = text(identifier.get("value"))
        if identifier.get("system") == KRNPI_SYSTEM and code and _INSTITUTION_CODE.fullmatch(code):
            found[code] = None
        else:
            message = f"intendedRecipient must name an institution by its 8-digit {KRNPI_SYSTEM} identifier"
            issues.append(_issue(message, f"{submission_set.path}.extension[{j}].valueReference.identifier"))
    return tuple(found), issues


def purpose_of(submission_set: Located) -> tuple[Purpose, str | None, list[Issue]]:
    """The purpose of the exchange and its justification (SubmissionSet extensions; default treatment)."""
    purpose, justification = Purpose.TREATMENT, None
    issues: list[Issue] = []
    for j, extension in enumerate(dicts(submission_set.resource.get("extension"))):
        path = f"{submission_set.path}.extension[{j}]"
        if extension.get("url") == profiles.PURPOSE_EXTENSION_URL:
            coding = obj(extension.get("valueCoding"))
            code = text(coding.get("code"))
            if coding.get("system") == profiles.PURPOSE_SYSTEM and code in {p.value for p in Purpose}:
                purpose = Purpose(str(code))
            else:
                allowed = ", ".join(p.value for p in Purpose)
                message = f"the exchange purpose must be a code of {profiles.PURPOSE_SYSTEM}: {allowed}"
                issues.append(_issue(message, f"{path}.valueCoding", "code-invalid"))
        elif extension.get("url") == profiles.JUSTIFICATION_EXTENSION_URL:
            justification = (text(extension.get("valueString")) or "").strip() or None
    # An emergency without a justification is a malformed request (400), refused by parse_submission.
    return purpose, justification, issues


def replaced_by(reference: Located, base_url: str | None) -> tuple[tuple[str, ...], list[Issue]]:
    """DocumentReference ids named by relatesTo code 'replaces' (IHE MHD replace); others are kept as
    they are and change nothing."""
    found: list[str] = []
    issues: list[Issue] = []
    prefixes = ["DocumentReference/"] + ([f"{base_url.rstrip('/')}/DocumentReference/"] if base_url else [])
    for j, relation in enumerate(dicts(reference.resource.get("relatesTo"))):
        if relation.get("code") != "replaces":
            continue
        target = text(obj(relation.get("target")).get("reference")) or ""
        prefix = next((p for p in prefixes if target.startswith(p)), None)
        old_id = target[len(prefix) :] if prefix else ""
        if not old_id or "/" in old_id:
            message = "relatesTo replaces must reference a DocumentReference/<id> of this hub"
            issues.append(_issue(message, f"{reference.path}.relatesTo[{j}].target"))
        else:
            found.append(old_id)
    return tuple(dict.fromkeys(found)), issues
