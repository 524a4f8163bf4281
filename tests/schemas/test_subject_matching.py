"""hie_schemas.subjects.matches says what nats-server itself delivers: every pair below is asked of
a real server (a subscription on the pattern, a publish on the subject) and of the function."""

from __future__ import annotations

import asyncio
import itertools

import nats
import pytest

from hie_schemas import subjects

PATTERNS = [
    "hie.consent.consent.recorded",
    "hie.exchange.*.sent",
    "hie.hub.snubh.>",
    "hie.*.>",
    "*",
    ">",
    "hie.hub.*.rpc.*.severance",
]
SUBJECTS = [
    "hie.consent.consent.recorded",
    "hie.consent.consent",
    "hie.consent.consent.recorded.severance",
    "hie.exchange.referral.sent",
    "hie.exchange.referral.sent.severance",
    "hie.hub.snubh",
    "hie.hub.snubh.inbox",
    "hie.hub.snubh.inbox.delivery.severance",
    "hie.hub.cnuh.rpc.search.severance",
    "hie",
]


async def _delivered(nc: nats.NATS, pattern: str, subject: str) -> bool:
    got: asyncio.Queue[str] = asyncio.Queue()

    async def took(msg: object) -> None:
        got.put_nowait(subject)

    sub = await nc.subscribe(pattern, cb=took)
    await nc.publish(subject, b"x")
    await nc.flush()
    try:
        await asyncio.wait_for(got.get(), 0.2)
        return True
    except TimeoutError:
        return False
    finally:
        await sub.unsubscribe()


async def test_matching_agrees_with_the_server(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        for pattern, subject in itertools.product(PATTERNS, SUBJECTS):
            server = await _delivered(nc, pattern, subject)
            assert subjects.matches(pattern, subject) == server, (pattern, subject, server)
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("hie.hub.snubh.>", "hie.hub.snubh", False),  # '>' needs at least one token
        ("hie.*", "hie.hub.snubh", False),  # '*' is exactly one token
        ("hie.hub", "hie.hub.snubh", False),
    ],
)
def test_the_wildcards_edges(pattern: str, subject: str, expected: bool) -> None:
    assert subjects.matches(pattern, subject) is expected
