"""The K-CDA rendition every DocumentReference offers (issue 17 point 2).

A recipient that reads only K-CDA finds it as the DocumentReference's second content: ITI-68 with
``Accept: application/hl7-cda+xml``. A document that came in as K-CDA carries its kept original
there (cda_api); any other gets K-CDA generated from its FHIR document, at this hub or at a
recipient hub alike. The generation is deterministic: the document id root keeps the national rule
(<template OID>.<요양기관기호>.<timestamp><random>) with its six "random" digits drawn from the
document's id, so every read of one document, at any hub, gives the same bytes, and the content can
state their size and hash.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from cachetools import LRUCache, cached

from hie_hub.core.rest import size_and_hash
from hie_schemas.cda import CDA_MEDIA_TYPE, CdaError, fhir_to_cda
from hie_schemas.codes import DocumentKind
from hie_schemas.documents.profiles import kind_of

FORMAT_SYSTEM = "urn:ietf:rfc:3986"  # DocumentReference.content.format: the K-CDA template as urn:oid


def template_format(kind: DocumentKind) -> dict[str, str]:
    """The format coding of a K-CDA content: the template OID of the document's type."""
    return {"system": FORMAT_SYSTEM, "code": f"urn:oid:{kind.template_oid}"}


def rendition(document_id: str, document: bytes) -> bytes:
    """K-CDA generated from ``document`` (the FHIR document as ITI-68 serves it), the same bytes every
    time for one document; ``CdaError`` if it does not convert."""
    return _rendition(document_id, document)


@lru_cache(maxsize=512)
def _rendition(document_id: str, document: bytes) -> bytes:
    seed = int.from_bytes(hashlib.sha256(document_id.encode()).digest()[:8], "big")
    loaded = json.loads(document)
    return fhir_to_cda(loaded if isinstance(loaded, dict) else {}, rand=lambda: seed)


def rendition_content(document_id: str, kind: DocumentKind, document: bytes) -> dict[str, Any] | None:
    """The DocumentReference content describing the generated K-CDA; None if the document does not
    convert (a document that passed the hub's profile checks always does)."""
    described = _described(document_id, document)
    if described is None:
        return None
    size, digest = described
    attachment = {
        "contentType": CDA_MEDIA_TYPE,
        "language": "ko-KR",
        "url": f"Bundle/{document_id}",
        "size": size,
        "hash": digest,
    }
    return {"attachment": attachment, "format": template_format(kind)}


# Size and hash of each document's rendition, by document id and the SHA-1 of the document it was
# generated from: every search and read presents them, and generating K-CDA takes about 0.5 ms a
# document, which the 512 renditions kept above could not spare a hub with thousands of documents
# (make load: 5 % of the receiving hub's CPU, in searches of 20). An entry is some 200 bytes.
DESCRIBED_ENTRIES = 32_768


@cached(
    LRUCache(maxsize=DESCRIBED_ENTRIES),
    key=lambda document_id, document: (document_id, hashlib.sha1(document).digest()),
)
def _described(document_id: str, document: bytes) -> tuple[int, str] | None:
    try:
        attachment = size_and_hash(rendition(document_id, document))
    except (CdaError, ValueError):
        return None
    return attachment["size"], attachment["hash"]


def with_rendition(docref: dict[str, Any], document: bytes) -> dict[str, Any]:
    """``docref`` with the K-CDA rendition as its second content, when it has none."""
    contents = docref.get("content")
    if not isinstance(contents, list) or len(contents) != 1:
        return docref
    document_id, kind = docref.get("id"), kind_of(docref.get("type"))
    if not isinstance(document_id, str) or kind is None:
        return docref
    second = rendition_content(document_id, kind, document)
    return docref if second is None else {**docref, "content": [*contents, second]}
