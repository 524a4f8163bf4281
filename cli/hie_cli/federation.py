"""The local federation's address book: what `hie up` writes to <data-dir>/federation.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel


class Gateway(BaseModel):
    ae_title: str
    host: str
    port: int
    status_url: str


class HubEntry(BaseModel):
    slug: str
    code: str
    name: str
    node_url: str
    fhir_base: str
    gateway: Gateway


class InstitutionEntry(BaseModel):
    code: str
    name: str
    kind: str
    hub: str | None
    client_id: str
    client_secret: str
    dicom_ae: str | None = None


class Federation(BaseModel):
    data_dir: str
    nats_url: str  # without credentials: connect with nats_url_for(user)
    registry_url: str
    consent_url: str
    hubs: list[HubEntry]
    institutions: list[InstitutionEntry]

    def hub(self, slug: str) -> HubEntry:
        return next(h for h in self.hubs if h.slug == slug)

    def institution(self, code: str) -> InstitutionEntry:
        return next(i for i in self.institutions if i.code == code)

    def nats_url_for(self, user: str) -> str:
        """The NATS URL with ``user``'s password from the data directory (ops: the operators' user;
        hub-<slug>, registry, consent: a service's)."""
        stored: dict[str, str] = json.loads((Path(self.data_dir) / "secrets.json").read_text())
        parts = urlsplit(self.nats_url)
        netloc = f"{quote(user, safe='')}:{quote(stored[f'nats:{user}'], safe='')}@{parts.netloc}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def agency(self) -> InstitutionEntry:
        return next(i for i in self.institutions if i.kind == "agency")

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=2, ensure_ascii=False))
        tmp.chmod(0o600)
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> Federation:
        data: dict[str, Any] = json.loads(path.read_text())
        return cls.model_validate(data)
