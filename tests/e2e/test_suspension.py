"""Issue 3: an institution admitted through the lifecycle works at its hub node and imaging gateway,
and once the agency suspends it both refuse it within seconds, with no restart (real processes)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from hie_cli.federation import Federation
from hie_schemas.identifiers import RRN_SYSTEM

pytestmark = pytest.mark.e2e


def echo(ae_title: str, host: str, port: int, called: str) -> bool:
    ae = AE(ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


async def until(what: str, probe: Any, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while not await probe():
        assert time.monotonic() - started < timeout, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_suspension_reaches_hub_node_and_gateway_within_seconds(federation: Federation) -> None:
    hub = federation.hubs[0]
    code = f"7{random.randint(0, 9999999):07d}"
    ae_title = f"PACS{code}"
    hospital = federation.institution(hub.code)
    async with httpx.AsyncClient(base_url=federation.registry_url, timeout=30) as http:

        async def token(client_id: str, secret: str) -> str:
            r = await http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
            )
            r.raise_for_status()
            return str(r.json()["access_token"])

        agency = {"Authorization": f"Bearer {await token('agency', federation.agency.client_secret)}"}
        hub_token = {"Authorization": f"Bearer {await token(hospital.client_id, hospital.client_secret)}"}
        application = {
            "code": code,
            "name": "새내기의원",
            "kind": "clinic",
            "region": "서울",
            "hub": hub.slug,
            "departments": ["2300"],
            "dicom": {"ae_title": ae_title, "host": "127.0.0.1", "port": 104},
        }
        assert (await http.post("/institutions", json=application, headers=agency)).status_code == 201
        for action, who in (("review", agency), ("sign-agreement", hub_token), ("approve", agency)):
            response = await http.post(f"/institutions/{code}/{action}", json={"reason": "test"}, headers=who)
            assert response.status_code == 200, response.text
        credentials = response.json()["credentials"]
        assert (
            await http.post(f"/institutions/{code}/activate", json={"reason": "go live"}, headers=agency)
        ).status_code == 200
        clinic = {
            "Authorization": f"Bearer {await token(credentials['client_id'], credentials['client_secret'])}"
        }

        search = {"patient.identifier": f"{RRN_SYSTEM}|800101-1234567"}

        async def hub_status() -> int:
            async with httpx.AsyncClient() as node:
                r = await node.get(f"{hub.fhir_base}/DocumentReference", params=search, headers=clinic)
                return r.status_code

        async def gateway_accepts() -> bool:
            return await asyncio.to_thread(
                echo, ae_title, hub.gateway.host, hub.gateway.port, hub.gateway.ae_title
            )

        async def admitted() -> bool:
            return await hub_status() == 200 and await gateway_accepts()

        await until("the new clinic is admitted at the hub and the gateway", admitted)

        assert (
            await http.post(f"/institutions/{code}/suspend", json={"reason": "audit finding"}, headers=agency)
        ).status_code == 200

        async def hub_refuses() -> bool:
            return await hub_status() == 403

        async def gateway_refuses() -> bool:
            return not await gateway_accepts()

        hub_seconds = await until("the hub refuses the suspended clinic's still-valid token", hub_refuses)
        gateway_seconds = await until("the gateway refuses the suspended clinic's AE", gateway_refuses)
        print(f"suspension in force: hub node after {hub_seconds:.2f}s, gateway after {gateway_seconds:.2f}s")

        assert (
            await http.post(f"/institutions/{code}/reinstate", json={"reason": "resolved"}, headers=agency)
        ).status_code == 200
        await until("the reinstated clinic is admitted again", admitted)
