"""Identifiers of the federation: institutions (요양기관기호 and OID) and pseudonymous patient keys.

The resident registration number (RRN, 주민등록번호) is accepted only to derive the patient key and is
never stored or logged; ``Rrn`` hides its value from ``repr``/``str`` so it cannot leak into a log line.

Digits are ASCII ``0-9`` only, everywhere: Python's ``\\d`` and ``int()`` also take Arabic-Indic,
fullwidth and every other Unicode decimal digit, so "٩٠٠١٠١-١٢٣٤٥٦٧" would pass as a valid RRN and
give a patient key of its own, splitting one patient in two. Such a number is refused, not normalised:
no EMR sends one, and one refusal everywhere is simpler to state and test than a normalisation that
every entry point must apply first.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import date

# HL7 Korea KR Core naming system for the HIRA provider number (요양기관기호).
KRNPI_SYSTEM = "http://www.hl7korea.or.kr/Identifier/hira-krnpi"
# The RRN as an EMR sends it; accepted on input only, replaced by the patient key before storage.
RRN_SYSTEM = "http://www.hl7korea.or.kr/Identifier/mois-rrn"
# The federation's pseudonymous patient key (HMAC-SHA256 of the RRN with the federation secret).
PATIENT_KEY_SYSTEM = "https://hie-federation.kr/fhir/sid/patient-key"
# Institution OIDs: 1.2.410.100110.10.<요양기관기호> (KHIS).
INSTITUTION_OID_ROOT = "1.2.410.100110.10"

ASCII_DIGITS_ONLY = "digits must be ASCII 0-9 (Arabic-Indic, fullwidth and other Unicode digits are refused)"
# [0-9], not \d: see the module docstring.
_CODE = re.compile(r"^[0-9]{8}$")
_RRN = re.compile(r"^([0-9]{6})-?([0-9]{7})$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


class InvalidIdentifierError(ValueError):
    """An identifier that does not have the shape its system requires."""

    def __init__(self, system: str, reason: str) -> None:
        super().__init__(f"{system}: {reason}")
        self.system = system
        self.reason = reason


def non_ascii_digits(value: str) -> bool:
    """True when ``value`` has a decimal digit other than ASCII 0-9 (which ``\\d`` and ``int()`` take)."""
    return any(c.isdecimal() and not c.isascii() for c in value)


def validate_institution_code(code: str) -> str:
    """Return the 8-digit 요양기관기호 or raise ``InvalidIdentifierError``."""
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        unicode_digits = isinstance(code, str) and non_ascii_digits(code)
        reason = (
            f"요양기관기호: {ASCII_DIGITS_ONLY}"
            if unicode_digits
            else "요양기관기호 must be exactly 8 digits"
        )
        raise InvalidIdentifierError(KRNPI_SYSTEM, reason)
    return code


def institution_oid(code: str) -> str:
    return f"{INSTITUTION_OID_ROOT}.{validate_institution_code(code)}"


class Rrn:
    """A validated resident registration number whose value never appears in repr or str."""

    __slots__ = ("_digits",)

    def __init__(self, raw: str) -> None:
        match = _RRN.fullmatch(raw.strip()) if isinstance(raw, str) else None
        if match is None:
            if isinstance(raw, str) and non_ascii_digits(raw):
                raise InvalidIdentifierError(RRN_SYSTEM, ASCII_DIGITS_ONLY)
            raise InvalidIdentifierError(RRN_SYSTEM, "must be 13 digits, optionally as YYMMDD-NNNNNNN")
        birth, rest = match.groups()
        century = {"9": 1800, "0": 1800, "1": 1900, "2": 1900, "5": 1900, "6": 1900}.get(rest[0], 2000)
        try:
            date(century + int(birth[:2]), int(birth[2:4]), int(birth[4:6]))
        except ValueError:
            raise InvalidIdentifierError(RRN_SYSTEM, "the birth date part is not a valid date") from None
        # The check digit is not verified: numbers issued since October 2020 no longer carry one.
        self._digits = birth + rest

    def __repr__(self) -> str:
        return "Rrn(<redacted>)"

    __str__ = __repr__

    def patient_key(self, secret: bytes) -> str:
        return hmac.new(secret, self._digits.encode(), hashlib.sha256).hexdigest()


def patient_key_from_rrn(raw_rrn: str, secret: bytes) -> str:
    """The federation-wide pseudonymous key of a patient: HMAC-SHA256(secret, RRN digits), hex."""
    return Rrn(raw_rrn).patient_key(secret)


def validate_patient_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidIdentifierError(PATIENT_KEY_SYSTEM, "must be 64 lowercase hex characters")
    return key


def patient_key_from_identifier(system: str, value: str, secret: bytes) -> str:
    """Resolve a FHIR identifier (RRN or patient key) to the patient key."""
    if system == RRN_SYSTEM:
        return patient_key_from_rrn(value, secret)
    if system == PATIENT_KEY_SYSTEM:
        return validate_patient_key(value)
    raise InvalidIdentifierError(system, f"unsupported patient identifier system; use {RRN_SYSTEM}")


def parse_token_param(param: str) -> tuple[str, str]:
    """Split a FHIR token search parameter ``system|value``; the system is required here."""
    system, sep, value = param.partition("|")
    if not sep or not system or not value:
        # The value may be an RRN: never echo it back in an error.
        raise InvalidIdentifierError("token", "expected system|value")
    return system, value
