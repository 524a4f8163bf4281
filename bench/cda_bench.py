"""K-CDA conversion of a typical document (issue 17: under 10 ms), beside fhir.resources' parse of
the same content.

The typical document is the example referral of docs/fhir-profiles.md (problems, medications, a lab
result, a CT study, a recipient). Each figure is a median and p99 over single-threaded calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.common import Figure, Report, percentile
from hie_schemas.cda import cda_to_fhir, fhir_to_cda
from hie_schemas.codes import DocumentType
from hie_schemas.documents.examples import example_submission
from hie_schemas.fhir import parse_resource

NAME = "cda"
ROUNDS = 400


def _timed(operation: Callable[[], Any], rounds: int = ROUNDS) -> tuple[float, float]:
    """(median, p99) in milliseconds of ``rounds`` calls, after a short warm-up."""
    for _ in range(20):
        operation()
    samples: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        operation()
        samples.append(time.perf_counter() - started)
    return percentile(samples, 50) * 1000, percentile(samples, 99) * 1000


def typical_document() -> dict[str, Any]:
    submission = example_submission(DocumentType.REFERRAL)
    return next(e["resource"] for e in submission["entry"] if e["resource"]["resourceType"] == "Bundle")


async def run(report: Report) -> None:
    document = typical_document()
    xml = fhir_to_cda(document)
    print(f"  typical document: K-CDA {len(xml)} bytes, {len(document['entry'])} FHIR resources", flush=True)
    parse = _timed(lambda: parse_resource(document))
    inbound = _timed(lambda: cda_to_fhir(xml))
    outbound = _timed(lambda: fhir_to_cda(document))
    for q, index in (("median", 0), ("p99", 1)):
        baseline = f"fhir.resources parse {q}"
        report.add(Figure(NAME, f"K-CDA -> FHIR document {q}", inbound[index], "ms", baseline, parse[index]))
        report.add(Figure(NAME, f"FHIR document -> K-CDA {q}", outbound[index], "ms", baseline, parse[index]))
        report.add(Figure(NAME, f"fhir.resources parse of the same document {q}", parse[index], "ms"))
