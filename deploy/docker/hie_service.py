#!/usr/bin/env python3
"""The image's entrypoint: run a service by name, migrate its database, or check its health.

    hie-service registry|consent|hub-node|imaging-gateway   exec `python -m hie_<module>`
    hie-service migrate <service>                            Alembic to head with the service's settings
    hie-service verify-audit <service>                       check the service's hash-chained audit log
    hie-service healthcheck [PID]                            GET /healthz of the service that is PID 1
    hie-service <any other command> [args…]                  exec it as given (python, sh, hie …)

Stdlib only until a service is imported; it runs outside the image too (tests/deploy).
"""

from __future__ import annotations

import importlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Service:
    module: str
    prefix: str  # environment prefix of its Settings class
    settings: str  # module:class
    port: int  # the Settings default


SERVICES = {
    "registry": Service("hie_registry", "HIE_REGISTRY_", "hie_registry.config:RegistrySettings", 8001),
    "consent": Service("hie_consent", "HIE_CONSENT_", "hie_consent.config:ConsentSettings", 8002),
    "hub-node": Service("hie_hub", "HIE_HUB_", "hie_hub.config:HubSettings", 8010),
    "imaging-gateway": Service("hie_imaging", "HIE_IMAGING_", "hie_imaging.config:ImagingSettings", 8020),
}


def usage() -> int:
    sys.stderr.write(__doc__ or "")
    return 2


def configured(command: str, name: str) -> tuple[Service, Any] | None:
    """The service of that name and its settings, read exactly as the service reads them; None, said
    on stderr, for a name that is no service."""
    service = SERVICES.get(name)
    if service is None:
        sys.stderr.write(f"hie-service {command}: unknown service {name!r} ({', '.join(SERVICES)})\n")
        return None
    module_name, class_name = service.settings.split(":")
    return service, getattr(importlib.import_module(module_name), class_name)()


def migrate(name: str) -> int:
    """Bring the service's database to head with exactly the settings the service would read."""
    found = configured("migrate", name)
    if found is None:
        return 2
    service, settings = found
    from hie_platform.migrations import upgrade

    package = importlib.import_module(service.module)
    migrations = Path(package.__file__).parent / "migrations"  # <package dir>/migrations, as app.py
    upgrade(migrations, settings.database_url, settings.database_schema)
    sys.stdout.write(f"{name}: database at head\n")
    return 0


def verify_audit(name: str) -> int:
    """Recompute the audit log's hash chain (hie_platform.audit); exit 1 at the first broken link."""
    import asyncio

    found = configured("verify-audit", name)
    if found is None:
        return 2
    service, settings = found
    from hie_platform.audit import AuditTrail
    from hie_platform.db import Database

    tables = importlib.import_module(f"{service.module}.models").PLATFORM

    async def check() -> tuple[bool, int, int | None]:
        db = Database(settings.database_url, settings.database_schema)
        try:
            async with db.read_sessions() as session:
                result = await AuditTrail(tables.audit, None, settings.node).verify(session)
        finally:
            await db.dispose()
        return result.ok, result.records, result.first_bad_sequence

    ok, records, bad = asyncio.run(check())
    if ok:
        sys.stdout.write(f"{name}: audit chain intact ({records} records)\n")
        return 0
    sys.stdout.write(f"{name}: audit chain BROKEN at sequence {bad} ({records} records read)\n")
    return 1


def running_service(cmdline: bytes) -> Service | None:
    """Which service a process runs, from its /proc/<pid>/cmdline (`python -m hie_…`)."""
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    for index, arg in enumerate(args[:-1]):
        if arg == "-m":
            return next((s for s in SERVICES.values() if s.module == args[index + 1]), None)
    return None


def healthcheck(pid: str = "1") -> int:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    service = running_service(cmdline)
    if service is None:
        return 0  # not a service (a shell, a one-off command): nothing to check
    port = int(os.environ.get(f"{service.prefix}PORT", service.port))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"healthcheck: {service.module} on port {port}: {exc}\n")
        return 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        return usage()
    command, rest = argv[0], argv[1:]
    if command in SERVICES:
        module = SERVICES[command].module
        os.execvp(sys.executable, [sys.executable, "-m", module, *rest])
    if command == "migrate":
        return migrate(rest[0]) if len(rest) == 1 else usage()
    if command == "verify-audit":
        return verify_audit(rest[0]) if len(rest) == 1 else usage()
    if command == "healthcheck" and len(rest) <= 1:
        return healthcheck(*rest)
    os.execvp(command, argv)  # anything else: run it as given
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
