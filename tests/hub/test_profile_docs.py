"""docs/fhir-profiles.md cannot rot: every JSON example in it passes the hub's parser and profile
checks (or FHIR R4 validation), and its generated parts equal what the code produces today.

After changing a profile or a builder, regenerate the page with
``HIE_UPDATE_DOCS=1 .venv/bin/pytest tests/hub/test_profile_docs.py``.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hie_hub.documents import parse_submission
from hie_schemas.codes import DOCUMENT_KINDS, DocumentType
from hie_schemas.documents.builders import SECTIONS_BY_KIND
from hie_schemas.documents.examples import EXAMPLE_CREATED_AT, EXAMPLES, example_submission
from hie_schemas.documents.profiles import (
    SECTION_RULES,
    check_document,
    composition_of,
    kind_of,
    section_name,
)
from hie_schemas.fhir import parse_resource

DOC = Path(__file__).resolve().parents[2] / "docs" / "fhir-profiles.md"
SECRET = b"docs-example-federation-secret-0001"
GENERATED = re.compile(
    r"<!-- generated: (?P<name>[\w -]+) -->\n(?P<body>.*?)<!-- /generated -->\n", re.DOTALL
)
JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)


def render_kinds() -> str:
    header = "| type | 문서 | K-CDA template (Composition.type) | LOINC | required sections | recipient |"
    lines = [header, "|---|---|---|---|---|---|"]
    for kind in DOCUMENT_KINDS.values():
        required = ", ".join(section_name(s) for s in kind.required_sections)
        template = f"`urn:oid:1.2.410.100110.40.2.1` code `{kind.template_code}` ({kind.template_oid})"
        recipient = "required" if kind.needs_recipient else "optional"
        loinc = kind.loinc or "—"
        lines.append(
            f"| `{kind.type.value}` | {kind.korean} | {template} | {loinc} | {required} | {recipient} |"
        )
    return "\n".join(lines) + "\n"


def render_sections() -> str:
    lines = ["| section | entries must be | coded with |", "|---|---|---|"]
    for section, rule in SECTION_RULES.items():
        entries = " or ".join(rule.entry_types or rule.content_types or ("any",))
        if rule.content_types is not None:
            entries = f"narrative text or {entries}"
        coded = " or ".join(f"`{s}`" for s in rule.code_systems) or "—"
        lines.append(f"| {section_name(section)} | {entries} | {coded} |")
    return "\n".join(lines) + "\n"


def render_example(kind: DocumentType) -> str:
    example = EXAMPLES[kind]
    sections = ", ".join(section_name(s) for s in SECTIONS_BY_KIND[kind])
    to = f" to {example.recipient_name} ({example.recipient_code})" if example.recipient_code else ""
    studies = f", with the CT study {example.studies[0].study_instance_uid}" if example.studies else ""
    intro = f"{example.author_name} ({example.author_code}){to}; sections: {sections}{studies}.\n\n"
    body = json.dumps(example_submission(kind), ensure_ascii=False, indent=2)
    return f"{intro}```json\n{body}\n```\n"


def rendered() -> dict[str, str]:
    parts = {"document kinds": render_kinds(), "section rules": render_sections()}
    parts |= {f"example {kind.value}": render_example(kind) for kind in DocumentType}
    return parts


def test_generated_parts_are_what_the_code_produces() -> None:
    text = DOC.read_text()
    expected = rendered()
    if os.environ.get("HIE_UPDATE_DOCS") == "1":

        def replace(match: re.Match[str]) -> str:
            return f"<!-- generated: {match['name']} -->\n{expected[match['name']]}<!-- /generated -->\n"

        text = GENERATED.sub(replace, text)
        DOC.write_text(text)
    found = {m["name"]: m["body"] for m in GENERATED.finditer(text)}
    assert set(found) == set(expected), "docs/fhir-profiles.md lacks or has extra generated parts"
    stale = [name for name in expected if found[name] != expected[name]]
    assert not stale, f"regenerate docs/fhir-profiles.md (HIE_UPDATE_DOCS=1): {stale}"


def examples() -> list[tuple[int, Any]]:
    return [(n, json.loads(block)) for n, block in enumerate(JSON_BLOCK.findall(DOC.read_text()), start=1)]


def test_there_is_one_complete_example_per_document_type() -> None:
    kinds = []
    for _, body in examples():
        if body.get("resourceType") == "Bundle" and body.get("type") == "transaction":
            for entry in body["entry"]:
                resource = entry["resource"]
                if resource["resourceType"] == "Bundle":
                    kinds.append(kind_of((composition_of(resource) or {}).get("type")))
    assert sorted(k.type.value for k in kinds if k) == sorted(t.value for t in DocumentType)


@pytest.mark.parametrize(("number", "body"), examples())
def test_every_json_example_passes_the_hub(number: int, body: Any) -> None:
    """A transaction is read as the hub reads ITI-65 (and each document checked against its profile);
    any other example must at least be a valid FHIR R4 resource."""
    parse_resource(body)
    if body.get("resourceType") != "Bundle" or body.get("type") != "transaction":
        return
    submission = parse_submission(body, secret=SECRET, now=EXAMPLE_CREATED_AT + timedelta(minutes=1))
    for document in submission.documents:
        kind = DOCUMENT_KINDS[document.document_type]
        assert (
            check_document(document.document, kind, submission.intended_recipients, now=EXAMPLE_CREATED_AT)
            == []
        )
