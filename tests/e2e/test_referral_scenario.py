"""The walking skeleton end to end: `hie up` as real processes, then the demo scenario against it."""

from __future__ import annotations

import pytest

from hie_cli.demo import run_demo
from hie_cli.federation import Federation

pytestmark = pytest.mark.e2e


async def test_referral_with_ct_and_return_then_refusal_without_consent(federation: Federation) -> None:
    result = await run_demo(federation, instances=12)

    assert result.referral_task_id
    assert result.documents_read == 2  # the referral and the care record summary, retrieved at hub 2
    assert result.instances_sent == 12
    assert result.instances_identical == 12  # every CT instance reached the PACS with identical pixels
    assert {"referral", "return"} <= set(result.history_kinds)

    assert result.refused_status == 403
    assert result.refused_outcome["resourceType"] == "OperationOutcome"
    assert result.refused_found_at_hub2 == 0  # nothing stored at hub 2
    assert result.refused_instances_at_pacs == 0  # no image left hub 1
    assert result.refused_study_relayed == 0
