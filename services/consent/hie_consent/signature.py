"""The signature image of a consent given at a desk (KHIS keeps it): Consent.sourceAttachment."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

from hie_platform.errors import PayloadTooLarge, Unprocessable

# The file signatures of the two formats sign pads and scanners produce.
MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
_WHERE = ["Consent.sourceAttachment"]


@dataclass(frozen=True)
class SignatureImage:
    content_type: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def fhir_hash(self) -> str:
        """R4 Attachment.hash: the base64 of the SHA-1 of the data."""
        return base64.b64encode(hashlib.sha1(self.data, usedforsecurity=False).digest()).decode()


def _not_an_image(detail: str) -> Unprocessable:
    return Unprocessable(f"signature is not an image: {detail}", expression=_WHERE)


def signature_image(attachment: dict[str, Any] | None, max_bytes: int) -> SignatureImage:
    """Read and check the attachment: PNG or JPEG, declared and actual type agreeing, within the limit."""
    if not attachment:
        raise Unprocessable(
            "a consent given at an institution needs the signature image as Consent.sourceAttachment",
            expression=_WHERE,
        )
    content_type = str(attachment.get("contentType") or "").split(";")[0].strip().lower()
    if content_type not in MAGIC:
        raise _not_an_image("contentType must be image/png or image/jpeg")
    encoded = attachment.get("data")
    if not isinstance(encoded, str) or not encoded:
        raise _not_an_image("the image must be sent inline as Attachment.data (base64)")
    if len(encoded) * 3 // 4 > max_bytes + 3:  # refuse before decoding a huge value
        raise PayloadTooLarge(f"the signature image exceeds {max_bytes} bytes", expression=_WHERE)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _not_an_image("Attachment.data is not base64") from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the signature image exceeds {max_bytes} bytes", expression=_WHERE)
    if not data.startswith(MAGIC[content_type]):
        raise _not_an_image(f"the data is not a {content_type.removeprefix('image/').upper()} file")
    return SignatureImage(content_type, data)
