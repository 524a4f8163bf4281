"""Flows the web tests share: the consent service under test, a clinic's application, signing in to
the console and the portal in the browser. (A module of its own: ``conftest`` is ambiguous across
test directories, and test modules should not import each other.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from web_helpers import PHONE, Browser, RunningApp

from hie_consent.app import create_app
from hie_consent.config import ConsentSettings
from hie_platform.natsd import free_port
from hie_schemas.codes import DocumentType
from hie_schemas.documents.builders import build_document
from hie_schemas.identifiers import patient_key_from_rrn


@dataclass
class ConsentWeb:
    url: str
    settings: ConsentSettings
    registry: Any
    nats_url: str

    def patient_key(self, rrn: str) -> str:
        return patient_key_from_rrn(rrn, self.settings.patient_key_bytes)

    async def bearer(self, client_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.registry.token(client_id)}"}

    async def versions(self, rrn: str) -> list[dict[str, Any]]:
        """The patient's consent versions through the agency's API (what is really stored)."""
        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.get(
                "/consent-records",
                params={"patient.identifier": f"http://www.hl7korea.or.kr/Identifier/mois-rrn|{rrn}"},
                headers=await self.bearer("agency"),
            )
        assert response.status_code == 200, response.text
        versions: list[dict[str, Any]] = response.json()
        return versions


async def start_consent(
    nats_url: str, registry: Any, data: Path, name: str, **overrides: Any
) -> tuple[RunningApp, ConsentSettings]:
    port = free_port()
    settings = ConsentSettings(
        database_url=f"sqlite+aiosqlite:///{data / f'{name}.db'}",
        nats_url=nats_url,
        registry_url=registry.url,
        port=port,
        node=name,
        # Durables of their own: the stream keeps other tests' events.
        history_consumer=f"{name}-history",
        access_consumer=f"{name}-access",
        **overrides,
    )
    return await RunningApp(create_app(settings), port).start(), settings


# --- the console ---


async def agency(registry: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {await registry.token('agency')}"}


async def apply_clinic(registry: Any, code: str, with_sample: bool = True) -> None:
    """A clinic's application entered through the API, as after the prior consultation."""
    samples = (
        [
            build_document(
                DocumentType.CARE_RECORD_SUMMARY,
                author_code=code,
                author_name="웹테스트의원",
                patient_rrn="800101-1234567",
            )
        ]
        if with_sample
        else []
    )
    body = {
        "code": code,
        "name": f"웹테스트의원 {code}",
        "kind": "clinic",
        "region": "대전",
        # Under a hub whose clinics no other test counts (tests/registry lists snubh's exactly).
        "hub": "cnuh",
        "departments": ["2300"],
        "contacts": {"person": "김담당", "phone": "031-000-0000"},
        "samples": samples,
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{registry.url}/institutions", json=body, headers=await agency(registry))
    assert response.status_code == 201, response.text


async def history(registry: Any, code: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{registry.url}/institutions/{code}/history", headers=await agency(registry)
        )
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()
    return entries


async def console_sign_in(browser: Browser, registry: Any) -> None:
    await browser.open(f"{registry.url}/console/")
    assert "/console/sign-in" in await browser.url()
    await browser.fill("client_id", "agency")
    await browser.fill("client_secret", registry.credentials["agency"])
    await browser.submit("form[action='/console/sign-in'] button")
    assert browser.status == 200, await browser.text()
    assert await browser.url() == f"{registry.url}/console/"


# --- the portal ---


async def open_code_page(browser: Browser, consent: ConsentWeb, rrn: str) -> str:
    """Ask for a code; returns the development code shown on the page."""
    await browser.open(f"{consent.url}/portal/")
    assert "/portal/sign-in" in await browser.url()
    await browser.fill("rrn", rrn)
    await browser.fill("phone", PHONE)
    await browser.submit("form[action='/portal/sign-in'] button")
    assert browser.status == 200, await browser.text()
    shown = await browser.text("#dev-code")
    code = shown.split("인증번호는 ")[1].split(" ")[0]
    assert code.isdigit()
    assert len(code) == 6
    return code


async def portal_sign_in(browser: Browser, consent: ConsentWeb, rrn: str) -> None:
    code = await open_code_page(browser, consent, rrn)
    await browser.fill("code", code)
    await browser.submit("form[action='/portal/sign-in/verify'] button")
    assert browser.status == 200, await browser.text()
    assert await browser.url() == f"{consent.url}/portal/consent"
