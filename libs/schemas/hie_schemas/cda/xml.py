"""A hardened XML reader for K-CDA documents, and the error that names the element at fault.

CDA documents never need a DTD, so any DOCTYPE is refused outright: that closes external entities
(XXE), entity expansion (billion laughs) and any network or file access in one rule. The size and the
nesting depth are bounded before and while parsing. Built on the standard library's expat so that no
parser option can be forgotten: the handlers below are the whole configuration.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from xml.parsers import expat

V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSI_TYPE = f"{{{XSI}}}type"
CDA_MEDIA_TYPE = "application/hl7-cda+xml"
MAX_BYTES = 5 * 1024 * 1024  # a K-CDA summary is tens of kilobytes; images travel as DICOM, not in CDA
MAX_DEPTH = 64  # CDA nests sections and entryRelationships a dozen levels deep at most

ET.register_namespace("", V3)
ET.register_namespace("xsi", XSI)


class CdaError(ValueError):
    """A K-CDA document that cannot be read or breaks a template rule; ``location`` is an XPath-like
    path of the element at fault (e.g. ``/ClinicalDocument/component/structuredBody/component[2]``)."""

    def __init__(
        self,
        message: str,
        location: str,
        *,
        code: str = "invalid",
        status: int = 422,
        more: tuple[CdaError, ...] = (),
    ) -> None:
        super().__init__(f"{location}: {message}")
        self.message = message
        self.location = location
        self.code = code  # FHIR OperationOutcome issue type
        self.status = status  # 400 for XML that is not acceptable as XML, 422 for a template rule
        self.more = more  # the other findings of the same check, when there were several

    @property
    def all(self) -> tuple[CdaError, ...]:
        return (self, *self.more)


def tag(local: str) -> str:
    return f"{{{V3}}}{local}"


def local_name(name: str) -> str:
    return name.rpartition("}")[2]


class _Reader:
    """expat callbacks building an ElementTree; every declaration that could pull in or expand
    content is an error, and so is nesting deeper than MAX_DEPTH."""

    def __init__(self, max_depth: int) -> None:
        self.builder = ET.TreeBuilder()
        self.path: list[str] = []
        self.siblings: list[dict[str, int]] = [{}]
        self.max_depth = max_depth
        self.parser = expat.ParserCreate(namespace_separator="}")
        p = self.parser
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartDoctypeDeclHandler = self.doctype
        p.EntityDeclHandler = self.entity
        p.ExternalEntityRefHandler = self.external
        p.StartElementHandler = self.start
        p.EndElementHandler = self.end
        p.CharacterDataHandler = self.builder.data
        p.buffer_text = True
        p.ordered_attributes = False

    def where(self) -> str:
        return "/" + "/".join(self.path) if self.path else "/"

    def refuse(self, message: str) -> CdaError:
        line = f" (line {self.parser.CurrentLineNumber})"
        return CdaError(message + line, self.where(), code="security", status=400)

    def doctype(self, *_: Any) -> None:
        raise self.refuse("a DOCTYPE is not accepted: K-CDA documents carry no DTD (XXE, entity expansion)")

    def entity(self, *_: Any) -> None:
        raise self.refuse("entity declarations are not accepted")

    def external(self, *_: Any) -> int:
        raise self.refuse("external entities are not resolved")

    def start(self, name: str, attributes: dict[str, str]) -> None:
        qualified = "{" + name if "}" in name else name
        local = local_name(qualified)
        counts = self.siblings[-1]
        counts[local] = counts.get(local, 0) + 1
        self.path.append(local if counts[local] == 1 else f"{local}[{counts[local]}]")
        self.siblings.append({})
        if len(self.path) > self.max_depth:
            raise self.refuse(f"elements nest deeper than {self.max_depth} levels")
        attrs = {("{" + k if "}" in k else k): v for k, v in attributes.items()}
        self.builder.start(qualified, attrs)

    def end(self, name: str) -> None:
        self.builder.end("{" + name if "}" in name else name)
        self.path.pop()
        self.siblings.pop()


def parse_xml(data: bytes | str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> ET.Element:
    """The root element of ``data``; ``CdaError`` (status 400) for XML that is too large, not
    well-formed, or declares a DOCTYPE or entities."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise CdaError(f"the document is larger than {max_bytes} bytes", "/", code="too-costly", status=400)
    reader = _Reader(max_depth)
    try:
        reader.parser.Parse(raw, True)
    except expat.ExpatError as exc:
        message = (
            f"not well-formed XML: {expat.ErrorString(exc.code)} at line {exc.lineno} column {exc.offset}"
        )
        raise CdaError(message, reader.where(), code="structure", status=400) from None
    root = reader.builder.close()
    if root is None:  # pragma: no cover - expat refuses an empty document first
        raise CdaError("no root element", "/", code="structure", status=400)
    return root


class Node:
    """An element with the XPath-like path it was found at, so every error can name it."""

    __slots__ = ("element", "path")

    def __init__(self, element: ET.Element, path: str) -> None:
        self.element = element
        self.path = path

    def all(self, local: str) -> Iterator[Node]:
        found = self.element.findall(tag(local))
        for i, child in enumerate(found, 1):
            yield Node(child, f"{self.path}/{local}" + (f"[{i}]" if len(found) > 1 else ""))

    def first(self, *locals_: str) -> Node | None:
        node: Node | None = self
        for local in locals_:
            node = next(node.all(local), None) if node is not None else None
        return node

    def need(self, *locals_: str) -> Node:
        found = self.first(*locals_)
        if found is None:
            missing = "/".join(locals_)
            raise CdaError(f"{missing} is required", f"{self.path}/{missing}", code="required")
        return found

    def attr(self, name: str) -> str | None:
        value = self.element.get(name)
        return value.strip() if value is not None and value.strip() else None

    def text(self) -> str:
        return " ".join("".join(self.element.itertext()).split())

    def child_text(self, local: str) -> str | None:
        node = self.first(local)
        value = node.text() if node is not None else ""
        return value or None
