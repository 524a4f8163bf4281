"""K-CDA at the hub's edge (issue 17): $convert, ITI-65 publishes whose document is CDA, and ITI-68
retrieval as CDA.

The hub stores FHIR only. A CDA document is converted (hie_schemas.cda: hardened parser, template
rules) before the ordinary ITI-65 path (exchange.publish: consent, audit, delivery) sees it; its
original XML is kept as the DocumentReference's second content. A retrieval with ``Accept:
application/hl7-cda+xml`` serves that original, or K-CDA generated from the stored FHIR document.
No normative CDA R2 schema is packaged in the registries this project installs from (docs/kcda.md),
so the structural and template checks of hie_schemas.cda.rules are the validation.

Routes here are listed before fhir_api and documents_api (app.py) and hand every non-CDA request to
their handlers unchanged.
"""

from __future__ import annotations

import base64
import binascii
import copy
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core import endpoints as fhir_api
from hie_hub.core.params import json_body
from hie_hub.core.rest import negotiate, size_and_hash
from hie_hub.documents import endpoints as documents_api
from hie_hub.documents import repository
from hie_hub.documents.cda_rendition import rendition, template_format
from hie_hub.documents.pseudonym import rrn_forms, with_patient_keys
from hie_hub.exchange import service as exchange
from hie_hub.node import HubActor, HubNode, NodeDep, ReaderActor, ReadingDep, UnitDep
from hie_platform.errors import (
    BadRequest,
    FhirError,
    Issue,
    Unprocessable,
    UnsupportedMediaType,
    fhir_response,
)
from hie_schemas.cda import CDA_MEDIA_TYPE, CdaError, cda_to_fhir
from hie_schemas.cda.pseudonym import pseudonymise_xml
from hie_schemas.codes import DOCUMENT_KINDS, DocumentType
from hie_schemas.documents import profiles
from hie_schemas.documents.bundle import BundleIndex, Json, dicts, obj, text
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.identifiers import KRNPI_SYSTEM, patient_key_from_rrn

router = APIRouter(prefix="/fhir", tags=["k-cda"])
_XML_TYPES = (CDA_MEDIA_TYPE, "application/xml", "text/xml")


def problem(error: CdaError) -> FhirError:
    """The OperationOutcome of a CDA that cannot be taken: every finding, each naming its element."""
    issues = [Issue(e.message, code=e.code, expression=(e.location,)) for e in error.all]
    kind = BadRequest if error.status == 400 else Unprocessable
    return kind(error.message, issues=issues)


def convert(xml: bytes) -> Json:
    """CDA -> the FHIR document, or the FhirError that names what is wrong."""
    try:
        document = cda_to_fhir(xml)
    except CdaError as exc:
        raise problem(exc) from None
    kind = profiles.kind_of((profiles.composition_of(document) or {}).get("type"))
    assert kind is not None  # cda_to_fhir checked the template
    recipients = _recipients(document)
    issues = profiles.check_document(document, kind, recipients)
    if issues:
        raise Unprocessable(f"{len(issues)} profile issue(s) in the converted document", issues=issues)
    return document


def _recipients(document: Json) -> list[str]:
    composition = profiles.composition_of(document) or {}
    index = BundleIndex(document)
    found: list[str] = []
    for extension in dicts(composition.get("extension")):
        target = index.resolve(extension.get("valueReference"))
        for identifier in dicts(target.resource.get("identifier") if target else None):
            value = text(identifier.get("value"))
            if value and identifier.get("system") == KRNPI_SYSTEM:
                found.append(value)
    return found


@router.post("/$convert", summary="K-CDA -> FHIR document (checked, nothing stored)")
@router.post("/Bundle/$convert", include_in_schema=False)
async def convert_document(request: Request, node: NodeDep, actor: ReaderActor) -> JSONResponse:
    """The document as the hub would store it: the RRN already replaced by the patient key."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _XML_TYPES:
        raise UnsupportedMediaType(f"$convert takes {CDA_MEDIA_TYPE} (got {content_type[:80] or 'nothing'})")
    document = convert(await request.body())
    return fhir_response(200, with_patient_keys(document, node.settings.patient_key_bytes))


def kept_original(node: HubNode, xml: bytes) -> bytes:
    """The XML the hub keeps: RRN ids rewritten to the patient key, and no RRN left anywhere else."""
    secret = node.settings.patient_key_bytes
    try:
        kept, rrns = pseudonymise_xml(xml, lambda raw: patient_key_from_rrn(raw, secret))
    except CdaError as exc:
        raise problem(exc) from None
    if any(form.encode() in kept for form in rrn_forms(rrns)):
        message = (
            "a resident registration number appears in the CDA outside the patient id (e.g. in narrative)"
        )
        raise BadRequest(message, expression=("/ClinicalDocument",))
    return kept


# --- ITI-65 with a CDA document --------------------------------------------------------------------


def _cda_bytes(resource: Json, path: str) -> bytes | None:
    """The XML of a Binary (or attachment) whose contentType is CDA; None for anything else."""
    if (text(resource.get("contentType")) or "").split(";")[0].strip().lower() != CDA_MEDIA_TYPE:
        return None
    try:
        return base64.b64decode(text(resource.get("data")) or "", validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the CDA document is not valid base64", expression=(f"{path}.data",)) from None


def _check_described(attachment: Json, xml: bytes, path: str) -> None:
    """attachment.size / hash, when the EMR gives them, describe the CDA as sent (FHIR R4: SHA-1, base64)."""
    actual = size_and_hash(xml)
    for element in ("size", "hash"):
        if element in attachment and attachment[element] != actual[element]:
            message = f"attachment.{element} does not match the CDA document ({element} {actual[element]})"
            raise Unprocessable(message, expression=(f"{path}.{element}",))


def unwrap(body: Any) -> tuple[Any, dict[int, bytes]]:
    """The ITI-65 transaction with every CDA document (a Binary the DocumentReference points at)
    replaced by its FHIR document, and the original XML by the index of its DocumentReference entry."""
    if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
        return body, {}
    entries = body["entry"]
    by_url = {text(obj(e).get("fullUrl")): i for i, e in enumerate(entries)}
    originals: dict[int, bytes] = {}
    # Copied at the first CDA document: most transactions carry none, and copying every one took 2 % of
    # a hub's busy time in the referral bench (py-spy).
    converted: Any = None
    for i, entry in enumerate(entries):
        reference = obj(obj(entry).get("resource"))
        if reference.get("resourceType") != "DocumentReference":
            continue
        for j, content in enumerate(dicts(reference.get("content"))):
            attachment = obj(content.get("attachment"))
            target = by_url.get(text(attachment.get("url")))
            binary = obj(obj(entries[target]).get("resource")) if target is not None else {}
            if binary.get("resourceType") != "Binary" or target is None:
                continue
            xml = _cda_bytes(binary, f"Bundle.entry[{target}].resource")
            if xml is None:
                continue
            path = f"Bundle.entry[{i}].resource.content[{j}].attachment"
            _check_described(attachment, xml, path)
            converted = copy.deepcopy(body) if converted is None else converted
            converted["entry"][target]["resource"] = convert(xml)
            converted["entry"][target]["request"] = {"method": "POST", "url": "Bundle"}
            new_attachment = converted["entry"][i]["resource"]["content"][j]["attachment"]
            new_attachment["contentType"] = FHIR_JSON
            for element in ("size", "hash"):  # they described the XML; the hub sets the FHIR document's
                new_attachment.pop(element, None)
            originals[i] = xml
    return (body if converted is None else converted), originals


async def _keep_originals(session: AsyncSession, response: Json, originals: dict[int, bytes]) -> None:
    """The original XML as the second content of each stored DocumentReference (application/hl7-cda+xml)."""
    for index, xml in originals.items():
        location = text(obj(obj(response["entry"][index]).get("response")).get("location")) or ""
        row = await repository.document(session, location.split("/")[1]) if "/" in location else None
        if row is None or len(row.docref.get("content") or []) > 1:
            continue  # a replay: kept the first time
        kind = DOCUMENT_KINDS[DocumentType(row.document_type)]
        attachment = {
            "contentType": CDA_MEDIA_TYPE,
            "language": "ko-KR",
            "url": f"Bundle/{row.document_id}",
            "data": base64.b64encode(xml).decode(),
            **size_and_hash(xml),
        }
        second = {"attachment": attachment, "format": template_format(kind)}
        row.docref = {**row.docref, "content": [*row.docref["content"], second]}
    await session.flush()


@router.post("", include_in_schema=False)
@router.post("/", include_in_schema=False)
async def publish(request: Request, node: NodeDep, actor: HubActor, unit: UnitDep) -> Response:
    """ITI-65: a transaction carrying CDA is converted first; any other goes to fhir_api.publish as is."""
    negotiate(request)
    body = await json_body(request)
    converted, sent = unwrap(body)
    if not sent:
        return await fhir_api.publish(request, node, actor, unit)
    originals = {index: kept_original(node, xml) for index, xml in sent.items()}
    result = await exchange.publish(node, unit, actor, converted)
    await _keep_originals(unit.writing(), result, originals)
    return fhir_response(200, result)


# --- ITI-68 as CDA ---------------------------------------------------------------------------------


def wants_cda(request: Request) -> bool:
    ranges = [p.split(";")[0].strip().lower() for p in request.headers.get("accept", "").split(",")]
    return CDA_MEDIA_TYPE in ranges


def stored_original(docref: Json) -> bytes | None:
    for content in dicts(docref.get("content"))[1:]:
        attachment = obj(content.get("attachment"))
        data = text(attachment.get("data"))
        if attachment.get("contentType") == CDA_MEDIA_TYPE and data:
            return base64.b64decode(data)
    return None


@router.api_route("/Bundle/{document_id}", methods=["GET", "HEAD"], include_in_schema=False)
async def retrieve_document(document_id: str, request: Request, reading: ReadingDep) -> Response:
    """ITI-68: the same access decision and audit as documents_api (it is called), then CDA if asked."""
    if not wants_cda(request):
        negotiate(request)
        return await documents_api.retrieve_document(document_id, request, reading)
    answer = await documents_api.retrieve_document(document_id, request, reading)
    if answer.status_code != 200:
        return answer
    async with reading.unit.reading() as read:
        row = await repository.document(read, document_id)
    original = stored_original(row.docref) if row is not None else None
    if original is None:
        try:
            original = rendition(document_id, bytes(answer.body))
        except CdaError as exc:
            raise problem(exc) from None
    return Response(b"" if request.method == "HEAD" else original, media_type=CDA_MEDIA_TYPE)
