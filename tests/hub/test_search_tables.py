"""The search-parameter tables: a DocumentReference row's ``read`` fills the DocumentFilter that the
local query and every holding hub apply (docs/architecture.md "Adding a search parameter")."""

from __future__ import annotations

from datetime import datetime

import pytest
from starlette.requests import Request

from hie_hub.core.params import LOCAL_TIME, SearchParams
from hie_hub.documents import schemas
from hie_hub.documents.schemas import DOCUMENT_SEARCH, DocumentParameter, document_filter_fields
from hie_platform.errors import BadRequest
from hie_schemas.events import DocumentFilter


def params(query: str) -> SearchParams:
    request = Request({"type": "http", "method": "GET", "query_string": query.encode(), "headers": []})
    return SearchParams(request, DOCUMENT_SEARCH)


def test_every_document_row_fills_the_federated_filter() -> None:
    query = "type=34133-9,57133-1&status=current&date=ge2025-03-04&date=lt2025-04&author=11301001"
    wanted = DocumentFilter(**document_filter_fields(params(query)))
    assert wanted.types == ["care-record-summary", "referral"]
    assert wanted.statuses == ["current"]
    assert wanted.authors == ["11301001"]
    assert wanted.created_from == datetime(2025, 3, 4, tzinfo=LOCAL_TIME)
    assert wanted.created_before == datetime(2025, 4, 1, tzinfo=LOCAL_TIME)
    # Without a status the default leaves entered-in-error documents out; nothing else is filtered.
    assert DocumentFilter(**document_filter_fields(params("patient.identifier=x"))) == DocumentFilter(
        statuses=["current", "superseded"]
    )


def test_author_and_its_chained_form_must_agree() -> None:
    same = document_filter_fields(params("author=11301001&author.identifier=11301001"))
    assert same["authors"] == ["11301001"]
    with pytest.raises(BadRequest, match="disagree"):
        document_filter_fields(params("author=11301001&author.identifier=31100002"))


def test_a_row_whose_field_the_filter_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    row = DocumentParameter(
        "token", "a parameter added without its DocumentFilter field", lambda _: {"kinds": []}
    )
    monkeypatch.setitem(schemas.DOCUMENT_SEARCH, "kind", row)
    with pytest.raises(TypeError, match="kind fills \\['kinds'\\]"):
        document_filter_fields(params("kind=x"))
