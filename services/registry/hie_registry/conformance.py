"""Conformance review: the applicant's sample documents against the hub's document profiles, and a
C-ECHO to its DICOM endpoint. The registry keeps the evidence; the agency decides with it in view."""

from __future__ import annotations

import asyncio
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from hie_registry.models import Institution
from hie_schemas.documents.profiles import check_document, composition_of, kind_of

ECHO_TIMEOUT = 10.0


def _echo(ae_title: str, host: str, port: int) -> tuple[bool, str]:
    ae = AE("HIE_REGISTRY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False, "association not established (rejected, aborted or refused)"
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if "Status" in status else None
    finally:
        assoc.release()
    return code == 0, f"C-ECHO status {code:#06x}" if code is not None else "no C-ECHO response"


def check_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for number, sample in enumerate(samples, start=1):
        composition = composition_of(sample) if isinstance(sample, dict) else None
        kind = kind_of(composition.get("type")) if composition else None
        if kind is None:
            results.append(
                {
                    "sample": number,
                    "type": None,
                    "passed": False,
                    "issues": ["not a document Bundle of a known Korean document type"],
                }
            )
            continue
        # A sample stands alone: no intended recipients are known, so only document-level rules apply.
        issues = check_document(sample, kind, ["00000000"] if kind.needs_recipient else [])
        results.append(
            {
                "sample": number,
                "type": kind.type.value,
                "passed": not issues,
                "issues": [f"{i.diagnostics} ({', '.join(i.expression)})" for i in issues],
            }
        )
    return results


async def review_evidence(inst: Institution, samples: list[dict[str, Any]]) -> dict[str, Any]:
    if inst.dicom_ae and inst.dicom_host and inst.dicom_port:
        ok, detail = await asyncio.to_thread(_echo, inst.dicom_ae, inst.dicom_host, inst.dicom_port)
        echo: dict[str, Any] = {"ok": ok, "detail": detail, "ae_title": inst.dicom_ae}
    else:
        echo = {"ok": None, "detail": "no DICOM endpoint registered"}
    sample_results = check_samples(samples)
    return {
        "dicom_echo": echo,
        "samples": sample_results,
        "passed": bool(sample_results)
        and all(s["passed"] for s in sample_results)
        and echo["ok"] is not False,
    }
