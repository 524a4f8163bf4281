"""The patient portal's one-time codes: counted guesses, expiry, the lock-out, hashed storage, and
malformed identity refused without an echo (split from test_portal.py)."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import httpx
from consent_helpers import (
    ConsentService,
    answer,
    expire,
    new_rrn,
    open_challenge,
    portal_consent,
    sign_in,
    wrong,
)


async def test_a_wrong_code_counts_and_the_right_one_still_works(consent_service: ConsentService) -> None:
    challenge = (await open_challenge(consent_service, new_rrn())).json()
    bad = await answer(consent_service, challenge["challenge_id"], wrong(challenge["dev_code"]))
    assert bad.status_code == 422
    assert "4 attempt(s) left" in bad.json()["issue"][0]["diagnostics"]
    # The refusal is raised, yet the counted attempt is committed (hie_platform.db.raise_after_commit).
    assert await challenge_row(consent_service, challenge["challenge_id"]) == {
        "attempts": 1,
        "locked_until": None,
        "verified_at": None,
    }
    good = await answer(consent_service, challenge["challenge_id"], challenge["dev_code"])
    assert good.status_code == 200
    reused = await answer(consent_service, challenge["challenge_id"], challenge["dev_code"])
    assert reused.status_code == 409  # a code works once


async def challenge_row(service: ConsentService, challenge_id: str) -> dict[str, Any]:
    """What the database holds of one challenge's attempts, lockout and verification."""
    (row,) = [r for r in await service.rows("identity_challenges") if r["id"] == challenge_id]
    return {k: row[k] for k in ("attempts", "locked_until", "verified_at")}


async def test_an_expired_or_replaced_code_is_gone(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    first = (await open_challenge(consent_service, rrn)).json()
    second = (await open_challenge(consent_service, rrn)).json()
    replaced = await answer(consent_service, first["challenge_id"], first["dev_code"])
    assert replaced.status_code == 410
    await expire(consent_service, second["challenge_id"])
    expired = await answer(consent_service, second["challenge_id"], second["dev_code"])
    assert expired.status_code == 410
    assert expired.json()["issue"][0]["code"] == "expired"
    unknown = await answer(consent_service, str(uuid.uuid4()), "123456")
    assert unknown.status_code == 404


async def test_five_wrong_codes_lock_the_patient_out_for_fifteen_minutes(
    consent_service: ConsentService,
) -> None:
    rrn = new_rrn()
    challenge = (await open_challenge(consent_service, rrn)).json()
    wrong_code = wrong(challenge["dev_code"])
    statuses = [
        (await answer(consent_service, challenge["challenge_id"], wrong_code)).status_code for _ in range(4)
    ]
    assert statuses == [422, 422, 422, 422]
    assert (await challenge_row(consent_service, challenge["challenge_id"]))["attempts"] == 4
    locked = await answer(consent_service, challenge["challenge_id"], wrong_code)
    assert locked.status_code == 429
    assert 880 <= int(locked.headers["Retry-After"]) <= 901
    assert locked.json()["issue"][0]["code"] == "throttled"
    # The fifth attempt and the lockout are committed although the 429 is raised.
    row = await challenge_row(consent_service, challenge["challenge_id"])
    assert row["attempts"] == 5
    assert row["locked_until"] is not None
    assert row["verified_at"] is None
    # Locked means locked: the right code, a new code, or the call centre do not get through.
    assert (
        await answer(consent_service, challenge["challenge_id"], challenge["dev_code"])
    ).status_code == 429
    assert (await open_challenge(consent_service, rrn)).status_code == 429
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        by_phone = await http.post(
            "/call-centre/requests",
            json={"rrn": rrn, "phone": "010-1234-5678", "policy": "ENTIRE_CONSENT"},
            headers=await consent_service.headers("agency"),
        )
    assert by_phone.status_code == 429
    # ...and only this patient is locked.
    assert (await open_challenge(consent_service, new_rrn())).status_code == 201


async def test_a_new_code_does_not_buy_more_guesses(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    first = (await open_challenge(consent_service, rrn)).json()
    for _ in range(3):
        assert (
            await answer(consent_service, first["challenge_id"], wrong(first["dev_code"]))
        ).status_code == 422
    second = (await open_challenge(consent_service, rrn)).json()
    assert second["attempts_left"] == 2
    assert (
        await answer(consent_service, second["challenge_id"], wrong(second["dev_code"]))
    ).status_code == 422
    assert (
        await answer(consent_service, second["challenge_id"], wrong(second["dev_code"]))
    ).status_code == 429


async def test_codes_are_kept_hashed_and_the_rrn_and_phone_nowhere(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    phone = f"010-{secrets.randbelow(9000) + 1000}-{secrets.randbelow(9000) + 1000}"
    challenge = (await open_challenge(consent_service, rrn, phone)).json()
    session = await sign_in(consent_service, rrn)
    assert (await portal_consent(consent_service, session, "ENTIRE_CONSENT")).status_code == 201
    (row,) = [
        r for r in await consent_service.rows("identity_challenges") if r["id"] == challenge["challenge_id"]
    ]
    assert challenge["dev_code"] not in json.dumps(row, default=str)
    assert len(row["code_hash"]) == 64
    forms = (rrn, rrn.replace("-", ""), phone, phone.replace("-", ""))
    for table in ("identity_challenges", "consent_versions", "outbox", "audit_log"):
        dump = json.dumps(
            [
                {k: v.decode() if isinstance(v, bytes) else v for k, v in r.items()}
                for r in await consent_service.rows(table)
            ],
            default=str,
        )
        assert not any(f in dump for f in forms), f"found in {table}"


async def test_malformed_identity_is_refused_without_echo(consent_service: ConsentService) -> None:
    rrn = "900117-12345"  # too short
    bad_rrn = await open_challenge(consent_service, rrn)
    assert bad_rrn.status_code == 400
    assert rrn not in bad_rrn.text
    bad_phone = await open_challenge(consent_service, new_rrn(), phone="02-123-4567")
    assert bad_phone.status_code == 400
    assert await consent_service.rows("identity_challenges") == []
