"""The one digit rule of identifiers (issue 12, point 11): ASCII 0-9 only, so that one patient has
one key whichever keyboard typed the number."""

from __future__ import annotations

import pytest

from hie_schemas.identifiers import (
    KRNPI_SYSTEM,
    RRN_SYSTEM,
    InvalidIdentifierError,
    Rrn,
    patient_key_from_identifier,
    patient_key_from_rrn,
    validate_institution_code,
)

SECRET = b"test-secret"
ASCII_RRN = "900101-1234567"
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
EXTENDED_ARABIC_INDIC = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
FULLWIDTH = str.maketrans("0123456789-", "０１２３４５６７８９－")
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


@pytest.mark.parametrize(
    "spelling",
    [
        ASCII_RRN.translate(ARABIC_INDIC),
        ASCII_RRN.translate(EXTENDED_ARABIC_INDIC),
        ASCII_RRN.translate(FULLWIDTH),
        ASCII_RRN.translate(DEVANAGARI),
        "900101-123456" + "7".translate(FULLWIDTH),  # one digit is enough
        ASCII_RRN.replace("-", "").translate(ARABIC_INDIC),
    ],
    ids=["arabic-indic", "extended-arabic-indic", "fullwidth", "devanagari", "one-fullwidth", "no-hyphen"],
)
def test_an_rrn_in_unicode_digits_is_refused_with_a_reason_that_does_not_quote_it(spelling: str) -> None:
    for parse in (
        lambda: Rrn(spelling),
        lambda: patient_key_from_rrn(spelling, SECRET),
        lambda: patient_key_from_identifier(RRN_SYSTEM, spelling, SECRET),
    ):
        with pytest.raises(InvalidIdentifierError) as caught:
            parse()
        assert "ASCII 0-9" in caught.value.reason
        assert spelling not in str(caught.value)


def test_the_ascii_spellings_of_one_rrn_give_one_key() -> None:
    key = patient_key_from_rrn(ASCII_RRN, SECRET)
    assert patient_key_from_rrn(ASCII_RRN.replace("-", ""), SECRET) == key
    assert patient_key_from_rrn(f" {ASCII_RRN} ", SECRET) == key


@pytest.mark.parametrize("code", ["11100001".translate(ARABIC_INDIC), "1110000" + "1".translate(FULLWIDTH)])
def test_an_institution_code_in_unicode_digits_is_refused(code: str) -> None:
    with pytest.raises(InvalidIdentifierError) as caught:
        validate_institution_code(code)
    assert caught.value.system == KRNPI_SYSTEM
    assert "ASCII 0-9" in caught.value.reason
