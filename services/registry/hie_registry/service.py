"""Registry rules: client authentication, token issuance, directory views, demo seeding."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.errors import NotFound
from hie_platform.outbox import Outbox
from hie_registry import repository, seed
from hie_registry.keys import KeyRing
from hie_registry.models import Client, Hub, Institution
from hie_schemas import subjects
from hie_schemas.auth import ALGORITHM, AUDIENCE, SCOPE_AGENCY, SCOPE_EXCHANGE
from hie_schemas.directory import (
    DicomEndpointInfo,
    HubView,
    InstitutionKind,
    InstitutionState,
    InstitutionView,
)
from hie_schemas.events import InstitutionChanged
from hie_schemas.identifiers import InvalidIdentifierError, institution_oid, validate_institution_code


class InvalidClientError(Exception):
    """Unknown client, wrong secret, revoked credentials, or an institution not in good standing."""


def hash_secret(secret: str, salt: str | None = None) -> str:
    # Client secrets are 256-bit random values, so a salted SHA-256 resists guessing as well as a slow
    # KDF would, and keeps token issuance cheap.
    salt = salt or secrets.token_hex(16)
    return f"sha256${salt}${hashlib.sha256((salt + secret).encode()).hexdigest()}"


def secret_matches(secret: str, stored: str) -> bool:
    try:
        _algo, salt, _digest = stored.split("$", 2)
    except ValueError:
        return False
    return hmac.compare_digest(hash_secret(secret, salt), stored)


def institution_view(inst: Institution) -> InstitutionView:
    dicom = None
    if inst.dicom_ae and inst.dicom_host and inst.dicom_port:
        dicom = DicomEndpointInfo(ae_title=inst.dicom_ae, host=inst.dicom_host, port=inst.dicom_port)
    return InstitutionView(
        code=inst.code,
        oid=institution_oid(inst.code),
        name=inst.name,
        name_en=inst.name_en,
        kind=InstitutionKind(inst.kind),
        region=inst.region,
        state=InstitutionState(inst.state),
        hub=inst.hub,
        departments=list(inst.departments or []),
        fhir_base=inst.fhir_base,
        dicom=dicom,
    )


async def known_institution(session: AsyncSession, code: str) -> Institution:
    """The institution with this code, or 404 (a malformed code names none)."""
    try:
        valid = validate_institution_code(code)
    except InvalidIdentifierError as exc:
        raise NotFound(f"no institution {code!r}: {exc.reason}") from None
    inst = await repository.institution(session, valid)
    if inst is None:
        raise NotFound(f"no institution {code}")
    return inst


def hub_view(hub: Hub, inst: Institution) -> HubView:
    gateway = None
    if hub.gateway_ae and hub.gateway_host and hub.gateway_port:
        gateway = DicomEndpointInfo(ae_title=hub.gateway_ae, host=hub.gateway_host, port=hub.gateway_port)
    return HubView(slug=hub.slug, code=inst.code, name=inst.name, fhir_base=hub.fhir_base, gateway=gateway)


async def authenticate_client(
    session: AsyncSession, client_id: str, client_secret: str
) -> tuple[Client, Institution]:
    client = await repository.client(session, client_id)
    if (
        client is None
        or client.revoked_at is not None
        or not secret_matches(client_secret, client.secret_hash)
    ):
        raise InvalidClientError("client authentication failed")
    inst = await repository.institution(session, client.institution_code)
    if inst is None or not InstitutionState(inst.state).in_good_standing:
        raise InvalidClientError("the institution is not a participant in good standing")
    return client, inst


def issue_token(
    ring: KeyRing, issuer: str, ttl: int, client: Client, inst: Institution, scope: str | None
) -> str:
    granted = set(client.scopes.split())
    if scope:
        requested = set(scope.split())
        if not requested <= granted:
            raise InvalidClientError("requested scope not granted to this client")
        granted = requested
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": client.client_id,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "inst": inst.code,
        "kind": inst.kind,
        "hub": inst.hub,
        "scope": " ".join(sorted(granted)),
    }
    key = ring.current
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})


async def publish_change(session: AsyncSession, outbox: Outbox, inst: Institution, change: str) -> None:
    await outbox.add(
        session,
        subjects.REGISTRY_INSTITUTION_CHANGED,
        InstitutionChanged(institution=institution_view(inst), change=change),
    )


async def set_client_secret(
    session: AsyncSession, client_id: str, code: str, secret: str, scopes: str, *, reinstate: bool
) -> None:
    """Give a client this secret (creating the client when new); ``reinstate`` lifts a revocation."""
    client = await repository.client(session, client_id)
    if client is None:
        row = Client(
            client_id=client_id,
            institution_code=code,
            secret_hash=hash_secret(secret),
            scopes=scopes,
            created_at=datetime.now(UTC),
        )
        repository.add_client(session, row)
        return
    if not secret_matches(secret, client.secret_hash):
        client.secret_hash = hash_secret(secret)
    if reinstate:
        client.revoked_at = None


async def _seed_institution(session: AsyncSession, outbox: Outbox, s: seed.SeedInstitution) -> None:
    now = datetime.now(UTC)
    inst = Institution(
        code=s.code,
        name=s.name,
        name_en=s.name_en,
        kind=s.kind.value,
        region=s.region,
        state=InstitutionState.ACTIVE.value,
        hub=s.hub,
        departments=list(s.departments),
        dicom_ae=s.dicom_ae,
        dicom_host="127.0.0.1" if s.dicom_ae else None,
        dicom_port=104 if s.dicom_ae else None,
        contacts={},
        created_at=now,
        updated_at=now,
    )
    await repository.add_institution(session, inst)
    await publish_change(session, outbox, inst, "seeded")
    if s.kind is InstitutionKind.HUB and s.hub:
        repository.add_hub(
            session, Hub(slug=s.hub, institution_code=s.code, gateway_ae=seed.hub_gateway_ae(s.hub))
        )


async def seed_demo(session: AsyncSession, outbox: Outbox, credentials_file: Path | None) -> dict[str, str]:
    """Insert the demo institutions once; returns client id → secret (kept in ``credentials_file``)."""
    stored: dict[str, str] = {}
    if credentials_file is not None and credentials_file.exists():
        stored = json.loads(credentials_file.read_text())
    existing = await repository.institution_codes(session)
    for s in seed.ALL:
        if s.code not in existing:
            await _seed_institution(session, outbox, s)
        agency = s.kind is InstitutionKind.AGENCY
        client_id = seed.AGENCY_CLIENT_ID if agency else s.code
        secret = stored[client_id] = stored.get(client_id) or secrets.token_urlsafe(32)
        scopes = SCOPE_AGENCY if agency else SCOPE_EXCHANGE
        await set_client_secret(session, client_id, s.code, secret, scopes, reinstate=False)
    await repository.flush(session)
    if credentials_file is not None:
        credentials_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = credentials_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(credentials_file)
    return stored


async def apply_topology(session: AsyncSession, outbox: Outbox, topology_file: Path) -> None:
    """Point hubs at their FHIR base and imaging gateway as `hie up` started them."""
    topology = json.loads(topology_file.read_text())
    for slug, entry in topology.get("hubs", {}).items():
        hub = await repository.hub(session, slug)
        if hub is None:
            continue
        gateway = entry.get("gateway") or {}
        hub.fhir_base = entry.get("fhir_base")
        hub.gateway_ae = gateway.get("ae_title", hub.gateway_ae)
        hub.gateway_host = gateway.get("host")
        hub.gateway_port = gateway.get("port")
        inst = await repository.institution(session, hub.institution_code)
        if inst is not None:
            inst.fhir_base = hub.fhir_base
            await publish_change(session, outbox, inst, "endpoint")
    await repository.flush(session)
