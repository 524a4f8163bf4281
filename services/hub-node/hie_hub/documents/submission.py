"""IHE MHD ITI-65 Provide Document Bundle: validate, pseudonymise and split into storable documents.

A submission is a transaction Bundle holding one SubmissionSet List, one DocumentReference per
document and the FHIR documents themselves (Bundles of type document), cross-referenced by their
``urn:uuid`` fullUrls. The RRN is accepted only to derive the patient key: every RRN identifier is
replaced by the key before anything leaves this module, and no RRN reaches an error message.
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from hie_hub.core.rest import canonical, size_and_hash, with_meta
from hie_hub.documents.metadata import purpose_of, recipients_of, replaced_by
from hie_hub.documents.pseudonym import pseudonymised, redact, rrn_strings
from hie_platform.errors import BadRequest, Issue, Unprocessable
from hie_schemas import codes
from hie_schemas.codes import DocumentType
from hie_schemas.consent import Purpose
from hie_schemas.documents import profiles
from hie_schemas.documents.profiles import (
    MHD_LIST_TYPES,
    BundleIndex,
    Json,
    Located,
    codings,
    dicts,
    obj,
    text,
)
from hie_schemas.events import StudyRef
from hie_schemas.fhir import FHIR_JSON, parse_resource
from hie_schemas.identifiers import (
    PATIENT_KEY_SYSTEM,
    RRN_SYSTEM,
    InvalidIdentifierError,
    validate_patient_key,
)

# Document ids derived from Bundle.identifier (system|value) so that a resubmission gets the same id.
_DOCUMENT_ID_NAMESPACE = uuid.UUID("6f1c1f64-3b8e-5a4e-9c43-8f0d2a6c9e21")
_INSTITUTION_CODE = re.compile(r"^[0-9]{8}$")


@dataclass(frozen=True)
class SubmittedDocument:
    """One document of a submission, rewritten for storage (ids assigned, RRN replaced by the key)."""

    document_reference: Json
    document: Json
    document_id: str
    document_type: DocumentType
    author_institution: str
    author_department: str | None
    created_at: datetime
    studies: tuple[StudyRef, ...]
    replaces: tuple[str, ...] = ()  # ids of the DocumentReferences it supersedes (relatesTo replaces)


@dataclass(frozen=True)
class Submission:
    """A validated ITI-65 submission: the SubmissionSet, its documents, the patient and the recipients."""

    submission_set: Json
    documents: tuple[SubmittedDocument, ...]
    patient_key: str
    intended_recipients: tuple[str, ...]
    purpose: Purpose = Purpose.TREATMENT
    justification: str | None = None
    # What each entry of the transaction became, in request order: (resourceType, stored id); the
    # transaction-response answers in this order (FHIR http: one entry per request entry).
    entry_order: tuple[tuple[str, str], ...] = ()


def parse_submission(
    body: Any, *, secret: bytes, base_url: str | None = None, now: datetime | None = None
) -> Submission:
    """Read the body of ``POST {hub}/fhir`` (ITI-65) into a Submission.

    ``BadRequest``: not a well-formed transaction of valid FHIR R4 resources (broken references, invalid
    identifiers, different patients). ``Unprocessable``: one issue per profile finding, all of them.
    ``base_url`` resolves references written as this server's absolute URLs; ``now`` (aware) is the clock.
    """
    secrets = rrn_strings(body)
    bundle = _transaction(body)
    _validate(bundle, "Bundle", secrets, nested=True)
    bundle = pseudonymised(bundle, secret, secrets)
    index = BundleIndex(bundle, base_url)
    submission_set, pairs = _structure(index)
    _check_attachments(body, pairs)
    patient_key, issues = _patient_key(submission_set, pairs)
    recipients, recipient_issues = recipients_of(submission_set)
    issues += recipient_issues
    purpose, justification, purpose_issues = purpose_of(submission_set)
    _require_justification(purpose, justification, submission_set)
    issues += purpose_issues
    ids = {r.index: _assigned_id(bundle, r) for r in (submission_set, *(r for r, _ in pairs))}
    ids |= {d.index: _document_id(d.resource) for _, d in pairs}
    if len({ids[d.index] for _, d in pairs}) != len(pairs):
        raise _bad("two documents of the submission carry the same Bundle.identifier", "Bundle.entry")
    documents: list[SubmittedDocument] = []
    clock = now or datetime.now(UTC)
    for reference, document in pairs:
        submitted, document_issues = _read_document(
            reference, document, submission_set, recipients, clock, ids[document.index], base_url
        )
        issues += document_issues
        documents += [submitted] if submitted is not None else []
    if issues or patient_key is None or len(documents) != len(pairs):
        issues = list(dict.fromkeys(issues)) or [_issue("the submission could not be read", "Bundle")]
        raise Unprocessable(f"{len(issues)} profile issue(s) in the submission", issues=issues)
    _rewrite(bundle, index, submission_set, pairs, ids, patient_key, clock)
    stored_as = {submission_set.index: ("List", ids[submission_set.index])}
    for reference, document in pairs:
        stored_as[reference.index] = ("DocumentReference", ids[document.index])
        stored_as[document.index] = ("Bundle", ids[document.index])
    return Submission(
        submission_set.resource,
        tuple(documents),
        patient_key,
        recipients,
        purpose,
        justification,
        tuple(stored_as[i] for i in sorted(stored_as)),
    )


def _bad(message: str, *expression: str) -> BadRequest:
    return BadRequest(message, expression=expression)


def _require_justification(purpose: Purpose, justification: str | None, submission_set: Located) -> None:
    """One status wherever an emergency is asserted (ITI-65 here, ITI-67 and $generate-crs too): 400.
    The purpose of use is a claim about the request, like a security header, not profile content."""
    if purpose is Purpose.EMERGENCY and justification is None:
        raise _bad(
            "emergency exchange needs a justification (extension "
            f"{profiles.JUSTIFICATION_EXTENSION_URL} with a non-blank valueString)",
            f"{submission_set.path}.extension",
        )


def _issue(message: str, expression: str, code: str = "invalid") -> Issue:
    return Issue(message, code=code, expression=(expression,))


# --- structure ---------------------------------------------------------------------------------------


def _transaction(body: Any) -> Json:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise _bad("ITI-65 expects a FHIR Bundle of type transaction", "Bundle")
    if body.get("type") != "transaction":
        raise _bad("ITI-65 expects Bundle.type transaction", "Bundle.type")
    entries = body.get("entry")
    if not isinstance(entries, list) or not entries:
        raise _bad("the transaction has no entries", "Bundle.entry")
    for i, entry in enumerate(entries):
        if not isinstance(obj(entry).get("resource"), dict):
            raise _bad("every entry needs a resource", f"Bundle.entry[{i}].resource")
        if obj(obj(entry).get("request")).get("ifNoneExist") is not None:
            raise _bad(
                "conditional create (ifNoneExist) is not supported: a document is stored once per "
                "Bundle.identifier, and re-sending the transaction answers as the first time",
                f"Bundle.entry[{i}].request.ifNoneExist",
            )
    return body


def _check_attachments(sent: Json, pairs: list[tuple[Located, Located]]) -> None:
    """attachment.size / hash, when given, must describe the document as sent: its canonical JSON
    (keys sorted, no whitespace, UTF-8), SHA-1 in base64 (FHIR R4). A mismatch is 422, nothing stored."""
    issues: list[Issue] = []
    for reference, document in pairs:
        attachment = obj(obj(dicts(reference.resource.get("content"))[0]).get("attachment"))
        if "size" not in attachment and "hash" not in attachment:
            continue  # nothing to check: no canonical JSON to serialize and hash
        actual = size_and_hash(canonical(sent["entry"][document.index]["resource"]))
        for element in ("size", "hash"):
            if element in attachment and attachment[element] != actual[element]:
                issues.append(
                    _issue(
                        f"DocumentReference.content.attachment.{element} {str(attachment[element])[:40]!r} "
                        f"does not match the document at {document.path} ({element} of its canonical "
                        f"JSON: {actual[element]})",
                        f"{reference.path}.content[0].attachment.{element}",
                        "value",
                    )
                )
    if issues:
        raise Unprocessable(issues[0].diagnostics, issues=issues)


def _validate(resource: Json, path: str, secrets: list[str], *, nested: bool) -> None:
    """Validate a Bundle's shell and each entry resource separately so that errors name the entry."""
    entries = resource.get("entry")
    shell = dict(resource)
    if isinstance(entries, list):  # anything but an object stays in the shell for the validator to refuse
        shell["entry"] = [
            {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e for e in entries
        ]
    _parse(shell, path, secrets)
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        child, child_path = obj(entry).get("resource"), f"{path}.entry[{i}].resource"
        if nested and obj(child).get("resourceType") == "Bundle":
            _validate(obj(child), child_path, secrets, nested=False)
        elif child is not None:
            _parse(child, child_path, secrets)


def _parse(resource: Any, path: str, secrets: list[str]) -> None:
    try:
        parse_resource(resource)
    # Besides ValueError, fhir_core raises AttributeError/TypeError on some mistyped primitives (a number
    # where a url belongs); whatever the validator trips on, it is the client's malformed JSON.
    except Exception as exc:
        raise _bad(f"{path} is not valid FHIR R4: {redact(str(exc), secrets)}", path) from None


def _structure(index: BundleIndex) -> tuple[Located, list[tuple[Located, Located]]]:
    """The SubmissionSet and the (DocumentReference, document Bundle) pairs, matched by reference."""
    lists, references, documents = _classify(index)
    if len(lists) != 1 or not references:
        raise _bad("the transaction needs one SubmissionSet List and a DocumentReference", "Bundle.entry")
    pairs = _pairs(index, references, documents)
    for j, item in enumerate(dicts(lists[0].resource.get("entry"))):
        target = index.resolve(obj(item.get("item")))
        if target is None or target.resource_type != "DocumentReference":
            raise _bad(
                "SubmissionSet entries must reference its DocumentReferences", f"{lists[0].path}.entry[{j}]"
            )
    return lists[0], pairs


def _classify(index: BundleIndex) -> tuple[list[Located], list[Located], dict[int, Located]]:
    """The entries by role: SubmissionSet Lists, DocumentReferences, documents (by entry index)."""
    lists: list[Located] = []
    references: list[Located] = []
    documents: dict[int, Located] = {}
    for entry in index.entries:
        kind = entry.resource_type
        list_codes = {
            (text(c.get("system")), text(c.get("code"))) for c in codings(entry.resource.get("code"))
        }
        if kind == "List" and (MHD_LIST_TYPES, "submissionset") in list_codes:
            lists.append(entry)
        elif kind == "DocumentReference":
            references.append(entry)
        elif kind == "Bundle" and entry.resource.get("type") == "document":
            documents[entry.index] = entry
        else:
            raise _bad("ITI-65 takes a SubmissionSet List, DocumentReferences and documents only", entry.path)
    return lists, references, documents


def _pairs(
    index: BundleIndex, references: list[Located], documents: dict[int, Located]
) -> list[tuple[Located, Located]]:
    """Each DocumentReference with the one document its attachment.url names; every document described."""
    pairs: list[tuple[Located, Located]] = []
    for reference in references:
        contents = dicts(reference.resource.get("content"))
        if len(contents) != 1:
            raise _bad(
                "a DocumentReference has exactly one content, the document", f"{reference.path}.content"
            )
        target = index.resolve(obj(contents[0].get("attachment")).get("url"))
        url_path = f"{reference.path}.content[0].attachment.url"
        if target is None or target.index not in documents:
            raise _bad("attachment.url must be the fullUrl of a document Bundle in the transaction", url_path)
        if any(document.index == target.index for _, document in pairs):
            raise _bad("two DocumentReferences describe the same document", url_path)
        pairs.append((reference, target))
    described = {document.index for _, document in pairs}
    for document in documents.values():
        if document.index not in described:
            raise _bad("no DocumentReference describes this document", document.path)
    return pairs


# --- the patient -------------------------------------------------------------------------------------


def _keys_of(identifiers: list[Json], path: str) -> set[str]:
    found: set[str] = set()
    for i, identifier in enumerate(identifiers):
        value = identifier.get("value")
        if identifier.get("system") == PATIENT_KEY_SYSTEM:
            try:
                found.add(validate_patient_key(value if isinstance(value, str) else ""))
            except InvalidIdentifierError as exc:
                raise _bad(f"invalid patient key: {exc.reason}", f"{path}[{i}]") from None
    return found


def _subject_key(resource: Located) -> str | None:
    """The patient key a DocumentReference or List names in its subject (a logical reference)."""
    identifier = obj(resource.resource.get("subject")).get("identifier")
    path = f"{resource.path}.subject.identifier"
    if identifier is None:
        return None
    if obj(identifier).get("system") != PATIENT_KEY_SYSTEM:
        raise _bad(f"the subject must be identified by {RRN_SYSTEM} or {PATIENT_KEY_SYSTEM}", path)
    return _keys_of([obj(identifier)], path).pop()


def _document_patient(document: Located) -> Located | None:
    """The Composition.subject Patient, or the only Patient of the document."""
    index = BundleIndex(document.resource)
    subject = index.resolve((profiles.composition_of(document.resource) or {}).get("subject"))
    if subject is not None and subject.resource_type == "Patient":
        return subject
    patients = index.of_type("Patient")
    return patients[0] if len(patients) == 1 else None


def _patient_key(
    submission_set: Located, pairs: list[tuple[Located, Located]]
) -> tuple[str | None, list[Issue]]:
    """The one patient of the submission; BadRequest when documents or metadata disagree."""
    issues: list[Issue] = []
    keys: set[str] = set()
    for reference, document in pairs:
        patient = _document_patient(document)
        document_keys: set[str] = set()
        if patient is not None:
            path = f"{document.path}{patient.path.removeprefix('Bundle')}.identifier"
            document_keys = _keys_of(dicts(patient.resource.get("identifier")), path)
            if not document_keys:
                message = f"the Patient needs an identifier of system {RRN_SYSTEM} or {PATIENT_KEY_SYSTEM}"
                issues.append(_issue(message, path, "required"))
        if len(document_keys) > 1:
            raise _bad("the identifiers of the Patient name different patients", document.path)
        reference_key = _subject_key(reference)
        if reference_key is not None and document_keys and reference_key not in document_keys:
            raise _bad("DocumentReference.subject and its document name different patients", reference.path)
        keys |= document_keys | ({reference_key} if reference_key else set())
    keys |= {k for k in [_subject_key(submission_set)] if k}
    if len(keys) > 1:
        raise _bad("all documents of a submission must be about the same patient", "Bundle.entry")
    return (keys.pop() if keys else None), issues


# --- one document ------------------------------------------------------------------------------------


def _rebase(issue: Issue, document_path: str, list_path: str) -> Issue:
    """Move a document-relative expression onto the transaction (and a List-relative one onto the List)."""

    def move(expression: str) -> str:
        if expression.startswith("Bundle"):
            return document_path + expression.removeprefix("Bundle")
        return list_path + expression.removeprefix("List") if expression.startswith("List") else expression

    return replace(issue, expression=tuple(move(e) for e in issue.expression))


def _read_document(
    reference: Located,
    document: Located,
    submission_set: Located,
    recipients: tuple[str, ...],
    now: datetime,
    document_id: str,
    base_url: str | None,
) -> tuple[SubmittedDocument | None, list[Issue]]:
    composition = profiles.composition_of(document.resource)
    at = f"{document.path}.entry[0].resource"
    if composition is None:
        return None, [_issue("the first entry of a document must be its Composition", at, "required")]
    kind = profiles.kind_of(composition.get("type"))
    if kind is None:
        message = (
            f"Composition.type needs the K-CDA template coding ({codes.TEMPLATE_SYSTEM}) of a known type"
        )
        return None, [_issue(message, f"{at}.type", "code-invalid")]
    checked = profiles.check_document(document.resource, kind, recipients, now=now)
    issues = [_rebase(i, document.path, submission_set.path) for i in checked]
    stated = profiles.kind_of(reference.resource.get("type"))
    if stated is not None and stated != kind:
        issues.append(
            _issue("DocumentReference.type disagrees with Composition.type", f"{reference.path}.type")
        )
    replaces, relation_issues = replaced_by(reference, base_url)
    issues += relation_issues
    if document_id in replaces:
        issues.append(_issue("a document cannot replace itself", f"{reference.path}.relatesTo"))
    created_at = profiles.composition_date(composition)
    institution = profiles.author_institution(document.resource)
    if issues or created_at is None or institution is None:
        return None, issues
    reference.resource.setdefault("type", copy.deepcopy(composition.get("type")))
    submitted = SubmittedDocument(
        document_reference=reference.resource,
        document=document.resource,
        document_id=document_id,
        document_type=kind.type,
        author_institution=institution,
        author_department=profiles.author_department(document.resource),
        created_at=created_at,
        studies=profiles.document_studies(document.resource),
        replaces=replaces,
    )
    return submitted, []


# --- output ------------------------------------------------------------------------------------------


def _document_id(document: Json) -> str:
    """Stable id of a document: from Bundle.identifier when present (idempotent resubmission), else its id."""
    identifier = obj(document.get("identifier"))
    value = text(identifier.get("value"))
    if value is None:
        return text(document.get("id")) or str(uuid.uuid4())
    if value.lower().startswith("urn:uuid:"):
        try:
            return str(uuid.UUID(value[len("urn:uuid:") :]))
        except ValueError:
            pass
    return str(uuid.uuid5(_DOCUMENT_ID_NAMESPACE, f"{text(identifier.get('system')) or ''}|{value}"))


def _assigned_id(bundle: Json, entry: Located) -> str:
    """Keep a server-style id; a resource posted under a urn:uuid fullUrl (or without id) gets a new one."""
    full_url = text(obj(bundle["entry"][entry.index]).get("fullUrl")) or ""
    current = text(entry.resource.get("id"))
    return current if current and not full_url.startswith("urn:") else str(uuid.uuid4())


def _rewrite(
    bundle: Json,
    index: BundleIndex,
    submission_set: Located,
    pairs: list[tuple[Located, Located]],
    ids: dict[int, str],
    patient_key: str,
    at: datetime,
) -> None:
    """Give the stored resources their ids, relative references and the patient key as subject; a
    document its first version (meta), and its DocumentReference the size and hash of the document
    as stored and served (ITI-68 answers exactly its canonical JSON)."""
    targets = {r.index: f"DocumentReference/{ids[r.index]}" for r, _ in pairs}
    targets |= {d.index: f"Bundle/{ids[d.index]}" for _, d in pairs}
    subject = {"type": "Patient", "identifier": {"system": PATIENT_KEY_SYSTEM, "value": patient_key}}
    for reference, document in pairs:
        document.resource["id"] = ids[document.index]
        reference.resource["id"] = ids[reference.index]
        reference.resource["subject"] = copy.deepcopy(subject)
        attachment = reference.resource["content"][0]["attachment"]
        attachment.pop("data", None)
        attachment.update(contentType=FHIR_JSON, url=targets[document.index])
        document.resource["meta"] = with_meta(document.resource, 1, at)["meta"]
        # What is stored is not what was sent (pseudonymised): size and hash of the stored document.
        attachment.update(size_and_hash(canonical(document.resource)))
    listed = submission_set.resource
    listed["id"] = ids[submission_set.index]
    if "subject" in listed:
        listed["subject"] = copy.deepcopy(subject)
    for resource in [listed, *(r.resource for r, _ in pairs)]:
        _rewrite_references(resource, index, targets)
    items = {obj(e.get("item")).get("reference") for e in dicts(listed.get("entry"))}
    missing = [{"item": {"reference": targets[r.index]}} for r, _ in pairs if targets[r.index] not in items]
    listed["entry"] = [*dicts(listed.get("entry")), *missing]


def _rewrite_references(node: Any, index: BundleIndex, targets: dict[int, str]) -> None:
    stack = [node]
    while stack:
        current = stack.pop()
        for key, child in list(current.items() if isinstance(current, dict) else enumerate(current)):
            if key == "reference" and isinstance(current, dict) and isinstance(child, str):
                target = index.resolve(child)
                if target is not None and target.index in targets:
                    current[key] = targets[target.index]
            elif isinstance(child, dict | list):
                stack.append(child)
