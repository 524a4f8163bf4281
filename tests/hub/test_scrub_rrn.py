"""scrub_rrn, the last guard before a row is written: every RRN identifier becomes the patient key,
wherever it sits; the input is never changed; a clean resource comes back as it is."""

from __future__ import annotations

import copy
import json

from hie_hub.documents.schemas import scrub_rrn
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM

KEY = "a" * 64


def test_every_rrn_identifier_is_replaced_and_the_input_kept() -> None:
    resource = {
        "resourceType": "Bundle",
        "entry": [
            {"resource": {"resourceType": "Organization", "name": "x"}},
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [
                        {"system": "urn:other", "value": "1"},
                        {"system": RRN_SYSTEM, "value": "800101-1234567", "use": "official"},
                    ],
                    "contact": [{"identifier": {"system": RRN_SYSTEM, "value": "800101-2345678"}}],
                }
            },
        ],
        "n": [1, 2.5, None, True],
    }
    before = copy.deepcopy(resource)
    scrubbed = scrub_rrn(resource, KEY)
    assert resource == before  # the input is not changed
    assert RRN_SYSTEM not in json.dumps(scrubbed)
    assert "800101" not in json.dumps(scrubbed)
    patient = scrubbed["entry"][1]["resource"]
    assert patient["identifier"][1] == {"system": PATIENT_KEY_SYSTEM, "value": KEY, "use": "official"}
    assert patient["contact"][0]["identifier"] == {"system": PATIENT_KEY_SYSTEM, "value": KEY}
    assert scrubbed["entry"][0] is resource["entry"][0]  # what held no RRN is shared, not copied
    assert scrubbed["n"] is resource["n"]


def test_a_clean_resource_is_returned_as_it_is() -> None:
    resource = {"resourceType": "List", "entry": [{"item": {"reference": "DocumentReference/1"}}]}
    assert scrub_rrn(resource, KEY) is resource
    assert scrub_rrn([resource, "text", 3], KEY)[0] is resource
