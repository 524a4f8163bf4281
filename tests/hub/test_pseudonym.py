"""with_patient_keys, the one pass that copies a submission while it replaces every RRN identifier by
the patient key identifier: held, on generated JSON trees, to the two-step rule it replaced (a full
copy, then a walk of the copy), and to the privacy rule itself (no RRN identifier left, the input
untouched)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hie_hub.documents.pseudonym import key_identifier, with_patient_keys
from hie_platform.errors import BadRequest
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

SECRET = b"s" * 32
RRNS = ["800101-1234567", "9001012345678", "750505-2000001"]


def two_step(root: Any) -> Any:
    """The rule as it was written before the one pass: copy everything, then replace in the copy;
    a list where something was replaced keeps one of each equal element (an RRN and the key of the
    same patient become one)."""
    copied = copy.deepcopy(root)
    stack = [copied]
    while stack:
        node = stack.pop()
        items = list(node.items() if isinstance(node, dict) else enumerate(node))
        replaced = False
        for key, child in items:
            if isinstance(child, dict) and child.get("system") == RRN_SYSTEM:
                node[key] = key_identifier(child, SECRET, "", {})
                replaced = True
            elif isinstance(child, dict | list):
                stack.append(child)
        if replaced and isinstance(node, list):
            first = {json.dumps(v, sort_keys=True): v for v in reversed(node)}
            node[:] = [v for v in node if first.get(json.dumps(v, sort_keys=True)) is v]
    return copied


def rrn_identifier() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda value, use, extra: {"system": RRN_SYSTEM, "value": value, **use, **extra},
        st.sampled_from(RRNS),
        st.sampled_from([{}, {"use": "official"}, {"use": 3}]),
        st.sampled_from([{}, {"type": {"text": "주민등록번호"}}, {"period": {"start": "2020"}}]),
    )


def key_identifier_of(rrn: str) -> dict[str, str]:
    return {"system": PATIENT_KEY_SYSTEM, "value": patient_key_from_rrn(rrn, SECRET)}


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
trees = st.recursive(
    scalars | rrn_identifier() | st.sampled_from(RRNS).map(key_identifier_of),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(["identifier", "system", "value", "entry", "x"]), inner, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["resourceType", "entry", "identifier"]), trees, max_size=4))
def test_the_one_pass_gives_what_the_two_steps_gave(root: dict[str, Any]) -> None:
    before = copy.deepcopy(root)
    result = with_patient_keys(root, SECRET)
    assert root == before  # the input is not changed
    assert result == two_step(before)
    assert RRN_SYSTEM not in json.dumps(result)


def test_nothing_of_the_input_is_shared_with_the_copy() -> None:
    root = {"entry": [{"resource": {"identifier": [{"system": "urn:x", "value": "1"}]}}], "n": [1]}
    result = with_patient_keys(root, SECRET)
    assert result == root
    assert result["entry"] is not root["entry"]
    assert result["entry"][0]["resource"] is not root["entry"][0]["resource"]
    assert result["n"] is not root["n"]


def test_an_rrn_and_the_key_of_the_same_patient_become_one_identifier() -> None:
    patient = {
        "identifier": [
            {"system": RRN_SYSTEM, "value": RRNS[0], "use": "official"},
            {"use": "official", **key_identifier_of(RRNS[0])},
            {"system": "urn:other", "value": "7"},
        ]
    }
    assert with_patient_keys(patient, SECRET)["identifier"] == [
        {"use": "official", **key_identifier_of(RRNS[0])},
        {"system": "urn:other", "value": "7"},
    ]


@pytest.mark.parametrize("bad", ["123", 800101, None])
def test_an_invalid_rrn_is_refused_by_its_path_and_never_echoed(bad: Any) -> None:
    identifiers = [{"system": "urn:x"}, {"system": RRN_SYSTEM, "value": bad}]
    root = {"entry": [{"resource": {"identifier": identifiers}}]}
    with pytest.raises(BadRequest) as refused:
        with_patient_keys(root, SECRET)
    (issue,) = refused.value.issues
    assert issue.expression == ("Bundle.entry[0].resource.identifier[1]",)
    assert bad is None or str(bad) not in json.dumps(refused.value.operation_outcome())
