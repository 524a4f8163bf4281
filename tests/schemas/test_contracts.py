"""Pure contracts: identifiers, subjects, the event envelope, document kinds."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from hie_schemas import contract, subjects
from hie_schemas.codes import DOCUMENT_KINDS, LOINC, TEMPLATE_SYSTEM, DocumentType, document_kind_by_coding
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ConsentRecorded, ExchangeSent, InstitutionChanged
from hie_schemas.identifiers import (
    PATIENT_KEY_SYSTEM,
    RRN_SYSTEM,
    InvalidIdentifierError,
    Rrn,
    institution_oid,
    parse_token_param,
    patient_key_from_identifier,
    patient_key_from_rrn,
    validate_institution_code,
)

SECRET = b"test-secret"


def test_institution_oid_follows_khis_root() -> None:
    assert institution_oid("11100001") == "1.2.410.100110.10.11100001"


@pytest.mark.parametrize("code", ["1110000", "111000011", "1110000a", "", "1111-001"])
def test_malformed_institution_codes_are_refused(code: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        validate_institution_code(code)


def test_patient_key_is_keyed_and_stable_across_rrn_spellings() -> None:
    key = patient_key_from_rrn("900101-1234567", SECRET)
    assert key == patient_key_from_rrn("9001011234567", SECRET)
    assert key != patient_key_from_rrn("900101-1234567", b"another-federation")
    assert len(key) == 64
    assert patient_key_from_identifier(PATIENT_KEY_SYSTEM, key, SECRET) == key
    assert patient_key_from_identifier(RRN_SYSTEM, "900101-1234567", SECRET) == key


@pytest.mark.parametrize(
    "raw", ["901301-1234567", "900100-1234567", "12345", "900101-12345678", "abcdef-1234567"]
)
def test_invalid_rrn_is_refused_without_echoing_it(raw: str) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        Rrn(raw)
    assert raw not in str(info.value)


def test_rrn_never_appears_in_repr_or_logs() -> None:
    rrn = Rrn("900101-1234567")
    assert "1234567" not in repr(rrn)
    assert "900101" not in f"{rrn}"


def test_token_param_error_does_not_echo_the_value() -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        parse_token_param("9001011234567")
    assert "9001011234567" not in str(info.value)
    assert parse_token_param(f"{RRN_SYSTEM}|900101-1234567") == (RRN_SYSTEM, "900101-1234567")


def test_subjects_carry_no_identifiers_and_refuse_injection() -> None:
    delivery = contract.subject(contract.Kind.DELIVERY, to="snubh", sender="severance")
    assert delivery == "hie.hub.snubh.inbox.delivery.severance"
    assert contract.subject(contract.Kind.EXCHANGE_SENT, sender="snubh") == "hie.exchange.exchange.sent.snubh"
    for bad in ("snubh.>", "a b", "*", "", "UPPER"):
        with pytest.raises(ValueError, match="invalid subject token"):
            contract.subject(contract.Kind.DELIVERY, to=bad, sender="severance")
        with pytest.raises(ValueError, match="invalid subject token"):
            contract.subject(contract.Kind.DELIVERY, to="snubh", sender=bad)


def test_envelope_round_trip_and_type_check() -> None:
    payload = ConsentRecorded(
        patient_key="a" * 64,
        version=1,
        policy="ENTIRE_CONSENT",
        effective_at=datetime.now(UTC),
        recorded_by="11301001",
        channel="desk",
    )
    env = Envelope.wrap(payload, Source(service="consent", node="n1"), correlation_id="c1")
    back = Envelope.from_bytes(env.to_bytes())
    assert back == env
    assert back.payload(ConsentRecorded) == payload
    assert json.loads(env.to_bytes())["type"] == subjects.CONSENT_RECORDED
    with pytest.raises(ValueError, match="carries"):
        back.payload(ExchangeSent)
    with pytest.raises(ValueError, match="carries"):
        back.payload(InstitutionChanged)


def test_every_document_kind_is_found_by_its_template_and_loinc() -> None:
    assert len(DOCUMENT_KINDS) == 6
    for kind in DOCUMENT_KINDS.values():
        assert document_kind_by_coding(TEMPLATE_SYSTEM, kind.template_code) is kind
        assert kind.template_oid.startswith("1.2.410.100110.40.2.1.")
        if kind.loinc:
            assert document_kind_by_coding(LOINC, kind.loinc) is kind
    assert DOCUMENT_KINDS[DocumentType.REFERRAL].needs_recipient
    assert not DOCUMENT_KINDS[DocumentType.CARE_RECORD_SUMMARY].needs_recipient
