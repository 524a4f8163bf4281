"""Typed RPC errors from what nats.py raises against a real nats-server, and the declared error classes."""

from __future__ import annotations

import nats
import pytest
from nats.aio.msg import Msg

from hie_platform.errors import (
    BadRequest,
    FhirError,
    RpcError,
    RpcNoResponders,
    RpcRemoteError,
    RpcTimeout,
    ServiceUnavailable,
)


async def test_a_subject_nobody_serves_is_no_responders_and_a_silent_one_a_timeout(
    nats_url: str, unique: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(nats.errors.NoRespondersError) as nobody:
            await nc.request(f"test.rpc.{unique}.nobody", b"{}", timeout=2.0)
        error = RpcError.from_nats(f"test.rpc.{unique}.nobody", nobody.value)
        assert isinstance(error, RpcNoResponders)
        assert str(error) == f"test.rpc.{unique}.nobody: NoRespondersError"

        async def silent(_msg: Msg) -> None:
            return None  # takes the request and never answers

        await nc.subscribe(f"test.rpc.{unique}.silent", cb=silent)
        await nc.flush()
        with pytest.raises(nats.errors.TimeoutError) as late:
            await nc.request(f"test.rpc.{unique}.silent", b"{}", timeout=0.2)
        timeout = RpcError.from_nats(f"test.rpc.{unique}.silent", late.value)
        assert isinstance(timeout, RpcTimeout)
        assert not isinstance(timeout, RpcNoResponders)
    finally:
        await nc.close()


def test_every_typed_rpc_error_is_caught_as_rpc_error_and_keeps_its_parts() -> None:
    remote = RpcRemoteError("hie.rpc.consent.decide.h1", "refused: sender")
    assert isinstance(remote, RpcError)
    assert (remote.subject, remote.reason) == ("hie.rpc.consent.decide.h1", "refused: sender")
    other = RpcError.from_nats("s", ConnectionResetError("reset"))
    assert type(other) is RpcError
    assert str(other) == "s: ConnectionResetError"


def test_declared_error_classes_carry_their_status_and_issue_code() -> None:
    class Gone(FhirError, status=410, code="expired"):
        """A test class declared the way the service errors are."""

    class Inherits(ServiceUnavailable):
        """Declares nothing: status and code come from its parent."""

    assert (Gone.status, Gone.code) == (410, "expired")
    assert (Inherits.status, Inherits.code) == (503, "transient")
    outcome = Gone("the code expired").operation_outcome()
    assert outcome["issue"][0]["code"] == "expired"
    assert (BadRequest.status, FhirError.status) == (400, 400)
