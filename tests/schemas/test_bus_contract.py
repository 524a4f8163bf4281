"""The bus contract (hie_schemas.contract) is consistent with itself, the streams and the payloads,
and the NATS permissions are generated from it (issue 12 point 6, design §4 "One contract")."""

from __future__ import annotations

import pytest

from hie_platform import nats_accounts
from hie_schemas import contract, streams, subjects
from hie_schemas.contract import DURABLES, MESSAGES, RPCS, Kind, Operation


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_has_one_subject_its_stream_captures_and_parses_back(kind: Kind) -> None:
    msg = MESSAGES[kind]
    assert msg.payload is None or msg.payload.event_type == msg.envelope_type
    where = msg.subject(to="snubh" if contract.TO in msg.template else None, sender="severance")
    assert contract.parse(where) == contract.Address(
        kind,
        "snubh" if contract.TO in msg.template else None,
        "severance" if msg.sender_bound else None,
    )
    in_streams = [s for s in streams.ALL if any(subjects.matches(p, where) for p in s.subjects)]
    assert in_streams == ([msg.stream] if msg.stream else []), where


def test_kinds_and_operations_are_enums_and_subjects_are_distinct() -> None:
    assert set(MESSAGES) == set(Kind)
    assert set(RPCS) == set(Operation)
    templates = [m.template for m in MESSAGES.values()] + [r.template for r in RPCS.values()]
    assert len(set(templates)) == len(templates)
    assert contract.subject(Kind.AUDIT_CHECKPOINT, sender="snubh") == subjects.audit_checkpoint("snubh")


@pytest.mark.parametrize("durable", DURABLES, ids=lambda d: d.name_template)
def test_durable_consumers_have_valid_names_and_filters_in_their_stream(durable: contract.Durable) -> None:
    name = durable.name("snubh")
    assert subjects.token(name, "durable") == name
    assert "{" not in name
    captured = durable.filter("snubh").replace(">", "x")
    assert any(subjects.matches(p, captured) for p in durable.stream.subjects)
    for kind in durable.kinds:
        assert MESSAGES[kind].stream == durable.stream
        assert durable.role in MESSAGES[kind].consumers


def test_the_generated_permissions_follow_the_contract() -> None:
    """The hole of issue 12 point 6: lifecycle.py published document-status, nats_accounts did not
    permit it. Every hub-published kind is now allowed with the hub's own slug, and only that."""
    publish = nats_accounts.hub_publish("snubh")
    for msg in MESSAGES.values():
        if msg.sender_bound and msg.publishers & contract.HUB_ROLES:
            assert msg.pattern(sender="snubh") in publish, msg.kind
            assert msg.pattern(sender="severance") not in publish
            to = "cnuh" if contract.TO in msg.template else None
            forged = msg.subject(to=to, sender="severance")
            assert not any(subjects.matches(p, forged) for p in publish), forged
    assert "hie.hub.*.inbox.document-status.snubh" in publish


@pytest.mark.parametrize("slug", ["consent", "registry", "UPPER", "a.b"])
def test_a_hub_slug_that_would_pass_for_a_central_service_or_break_a_subject_is_refused(slug: str) -> None:
    with pytest.raises(nats_accounts.SlugError):
        nats_accounts.render(["snubh", slug])
