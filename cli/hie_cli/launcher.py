"""`hie up`: the whole federation on one machine — nats-server, registry, consent, and N hubs
(hub node + imaging gateway each) as separate processes on SQLite (or PostgreSQL schemas).

Locked down as Kubernetes is: nats-server runs the accounts generated from the bus contract with one
user per service (registry, consent, hub-<slug> for a hub node and its gateway), secrets are
generated per data directory (secrets.json), and every file under the data directory is the owner's
only (children run with umask 077; what an older run left is brought to 0600 / 0700)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from hie_cli.federation import Federation, Gateway, HubEntry, InstitutionEntry
from hie_cli.local_secrets import (
    UMASK,
    DataDirBusy,
    local_secrets,
    lock_data_dir,
    lock_down,
    open_log,
    unlock_data_dir,
    write_private,
)
from hie_platform import nats_accounts
from hie_platform.natsd import NatsServer, free_port
from hie_registry import seed

MAX_HUBS = len(seed.HUBS)


class LaunchError(RuntimeError):
    """The federation could not start; the message is one readable line."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    url: str | None = None


@dataclass(frozen=True)
class HubPorts:
    node: int
    gateway: int
    dicom: int


@dataclass
class LaunchOptions:
    data_dir: Path
    hubs: int = 2
    postgres_url: str | None = None
    schema_prefix: str = "hie"
    host: str = "127.0.0.1"
    ready_timeout: float = 90.0
    extra_env: dict[str, str] = field(default_factory=dict)


class Launcher:
    def __init__(self, options: LaunchOptions) -> None:
        if not 1 <= options.hubs <= MAX_HUBS:
            raise LaunchError(f"--hubs must be between 1 and {MAX_HUBS}")
        self.options = options
        self.data = options.data_dir.resolve()
        self.logs = self.data / "logs"
        self.children: list[Child] = []
        self.nats: NatsServer | None = None
        self._lock: int | None = None
        self._secrets: dict[str, str] = {}
        self._registry_port = 0

    # --- databases ---------------------------------------------------------------------------

    def _database_env(self, prefix: str, name: str) -> dict[str, str]:
        if self.options.postgres_url:
            return {
                f"{prefix}DATABASE_URL": self.options.postgres_url,
                f"{prefix}DATABASE_SCHEMA": f"{self.options.schema_prefix}_{name}".replace("-", "_"),
            }
        return {f"{prefix}DATABASE_URL": f"sqlite+aiosqlite:///{self.data / 'db' / (name + '.db')}"}

    # --- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, module: str, env: dict[str, str], url: str | None) -> Child:
        log = self.logs / f"{name}.log"
        full_env = {**os.environ, **self.options.extra_env, **env}
        out = open_log(log)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=UMASK,
            )
        finally:
            os.close(out)
        child = Child(name, process, log, url)
        self.children.append(child)
        return child

    @staticmethod
    def _answers_ready(http: httpx.Client, child: Child) -> bool:
        """Ready, and it is this child that answers: another service on the same port (seen once, when
        two were given one port) must not pass for it while it fails to bind and exits."""
        try:
            response = http.get(f"{child.url}/readyz")
            if response.status_code != 200:
                return False
            node = response.json().get("node")
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        if node != child.name:
            raise LaunchError(f"{child.url} is answered by {node!r}, not by {child.name} (log: {child.log})")
        return True

    def _wait_ready(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        pending = [c for c in children if c.url]
        with httpx.Client(timeout=2.0) as http:
            while pending:
                for child in list(pending):
                    if child.process.poll() is not None:
                        raise LaunchError(
                            f"{child.name} exited with {child.process.returncode}: "
                            f"{_last_line(child.log)} (log: {child.log})"
                        )
                    if self._answers_ready(http, child):
                        pending.remove(child)
                if pending and time.monotonic() > deadline:
                    names = ", ".join(c.name for c in pending)
                    raise LaunchError(f"not ready after {self.options.ready_timeout:.0f}s: {names}")
                if pending:
                    time.sleep(0.1)

    def _start_nats(self, slugs: list[str]) -> dict[str, str]:
        """nats-server with the generated accounts; returns the data directory's secrets."""
        users = nats_accounts.users(slugs)
        secrets = local_secrets(self.data, users)
        self.nats = NatsServer(
            self.data / "nats",
            host=self.options.host,
            log_file=self.logs / "nats.log",
            accounts=nats_accounts.render(slugs),
            passwords={nats_accounts.password_var(u): secrets[f"nats:{u}"] for u in users},
        ).start()
        return secrets

    def nats_url(self, user: str, secrets: dict[str, str]) -> str:
        assert self.nats is not None
        return self.nats.user_url(user, secrets[f"nats:{user}"])

    def start(self) -> Federation:
        """Lock the data directory, start nats-server, the registry, consent and each hub (node and
        gateway), wait until all answer, and write the address book (federation.json)."""
        self._prepare_data_dir()
        host = self.options.host
        hubs = [hub.hub for hub in seed.HUBS[: self.options.hubs] if hub.hub is not None]
        # Users for every demo hub, running or not: a hub started beside the launcher (bench/hub_bench.py's
        # knuh at scale) connects as its own hub, never as another's.
        self._secrets = self._start_nats([h.hub for h in seed.HUBS if h.hub is not None])
        self._registry_port = free_port(host)
        ports = {slug: HubPorts(free_port(host), free_port(host), free_port(host)) for slug in hubs}
        self._write_topology(ports)
        self._wait_ready([self._spawn_registry()])
        consent_port = free_port(host)
        self._spawn_consent(consent_port)
        entries = [self._spawn_hub(slug, ports[slug]) for slug in hubs]
        self._wait_ready(self.children)  # consent and the hubs start together; the registry is ready
        assert self.nats is not None
        federation = Federation(
            data_dir=str(self.data),
            nats_url=self.nats.url,
            registry_url=self._url(self._registry_port),
            consent_url=self._url(consent_port),
            hubs=entries,
            institutions=self._institutions(set(hubs)),
        )
        federation.write(self.data / "federation.json")
        return federation

    def _url(self, port: int) -> str:
        return f"http://{self.options.host}:{port}"

    def _prepare_data_dir(self) -> None:
        try:
            self._lock = lock_data_dir(self.data)  # before anything in the directory is touched
        except DataDirBusy as exc:
            raise LaunchError(str(exc)) from None
        lock_down(self.data)
        for folder in (self.logs, self.data / "db", self.data / "spool"):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _env(self, prefix: str, name: str, port: int, user: str, **extra: str) -> dict[str, str]:
        """A service's environment: its NATS user, port, node name, the registry, its database."""
        values = {
            "HOST": self.options.host,
            "ENVIRONMENT": "development",
            "NATS_URL": self.nats_url(user, self._secrets),
            "PORT": str(port),
            "NODE": name,
            "REGISTRY_URL": self._url(self._registry_port),
            **extra,
        }
        return {f"{prefix}{k}": v for k, v in values.items()} | self._database_env(prefix, name)

    def _write_topology(self, ports: dict[str, HubPorts]) -> None:
        """Where each hub will listen, for the registry's seed (written before any hub starts)."""
        host = self.options.host
        hubs = {
            slug: {
                "fhir_base": f"http://{host}:{hub.node}/fhir",
                "gateway": {"ae_title": seed.hub_gateway_ae(slug), "host": host, "port": hub.dicom},
            }
            for slug, hub in ports.items()
        }
        write_private(self.data / "topology.json", json.dumps({"hubs": hubs}, indent=2))

    def _spawn_registry(self) -> Child:
        env = self._env(
            "HIE_REGISTRY_",
            "registry",
            self._registry_port,
            "registry",
            CONSOLE_SESSION_SECRET=self._secrets["console_session_secret"],
            SEED_DEMO="true",
            CREDENTIALS_FILE=str(self.data / "credentials.json"),
            TOPOLOGY_FILE=str(self.data / "topology.json"),
        )
        return self._spawn("registry", "hie_registry", env, self._url(self._registry_port))

    def _spawn_consent(self, port: int) -> Child:
        env = self._env(
            "HIE_CONSENT_",
            "consent",
            port,
            "consent",
            PATIENT_KEY_SECRET=self._secrets["patient_key_secret"],
            PORTAL_SESSION_SECRET=self._secrets["portal_session_secret"],
        )
        return self._spawn("consent", "hie_consent", env, self._url(port))

    def _spawn_hub(self, slug: str, ports: HubPorts) -> HubEntry:
        """A hub node and its imaging gateway, both connected to NATS as the hub's user."""
        user, node_url, gateway_url = (
            nats_accounts.hub_user(slug),
            self._url(ports.node),
            self._url(ports.gateway),
        )
        node_env = self._env(
            "HIE_HUB_",
            f"hub-{slug}",
            ports.node,
            user,
            HUB=slug,
            PATIENT_KEY_SECRET=self._secrets["patient_key_secret"],
            AUDIT_CHECKPOINT_KEY_FILE=str(self.data / "keys" / f"audit-checkpoint-{slug}.pem"),
        )
        self._spawn(f"hub-{slug}", "hie_hub", node_env, node_url)
        ae_title = seed.hub_gateway_ae(slug)
        gateway_env = self._env(
            "HIE_IMAGING_",
            f"imaging-{slug}",
            ports.gateway,
            user,
            HUB=slug,
            DICOM_PORT=str(ports.dicom),
            AE_TITLE=ae_title,
            SPOOL_DIR=str(self.data / "spool" / slug),
            # A developer's own PACS (a container, another machine) may call from anywhere
            # in the local run; outside it a registered AE is bound to its registered host.
            BIND_CALLERS_TO_HOST="false",
        )
        self._spawn(f"imaging-{slug}", "hie_imaging", gateway_env, gateway_url)
        hub = next(h for h in seed.HUBS if h.hub == slug)
        return HubEntry(
            slug=slug,
            code=hub.code,
            name=hub.name,
            node_url=node_url,
            fhir_base=f"{node_url}/fhir",
            gateway=Gateway(
                ae_title=ae_title, host=self.options.host, port=ports.dicom, status_url=gateway_url
            ),
        )

    def _institutions(self, served: set[str]) -> list[InstitutionEntry]:
        """The seeded institutions of the running hubs (and the agency) with their client secrets."""
        credentials: dict[str, str] = json.loads((self.data / "credentials.json").read_text())
        with httpx.Client(timeout=5.0) as http:
            directory = http.get(f"{self._url(self._registry_port)}/institutions").json()
        entries = []
        for i in directory:
            if i["kind"] != "agency" and i["hub"] not in served:
                continue
            client_id = seed.AGENCY_CLIENT_ID if i["kind"] == "agency" else i["code"]
            entries.append(
                InstitutionEntry(
                    code=i["code"],
                    name=i["name"],
                    kind=i["kind"],
                    hub=i["hub"],
                    client_id=client_id,
                    client_secret=credentials[client_id],
                    dicom_ae=(i.get("dicom") or {}).get("ae_title"),
                )
            )
        return entries

    def failed_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop children newest first (hubs, consent, registry), then nats-server."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self._lock is not None:
            # A stopped federation leaves no address book behind: `hie demo` and `hie registry` then say
            # that nothing runs instead of trying addresses nobody answers on.
            (self.data / "federation.json").unlink(missing_ok=True)
            unlock_data_dir(self.data, self._lock)
            self._lock = None


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def print_summary(federation: Federation, started_in: float) -> None:
    print(f"HIE federation up in {started_in:.1f}s — data in {federation.data_dir}")
    print(f"  {'service':<22} {'address':<38} detail")
    print(f"  {'nats':<22} {federation.nats_url:<38} JetStream, a user per service")
    print(f"  {'registry':<22} {federation.registry_url:<38} directory, OAuth2 token, JWKS")
    print(f"  {'consent':<22} {federation.consent_url:<38} consent, decisions, history")
    for hub in federation.hubs:
        print(f"  {'hub ' + hub.slug:<22} {hub.fhir_base:<38} {hub.name} ({hub.code})")
        gateway = f"dicom://{hub.gateway.host}:{hub.gateway.port}"
        print(f"  {'imaging ' + hub.slug:<22} {gateway:<38} AE {hub.gateway.ae_title}")
    for hub in federation.hubs:
        status = f"{hub.gateway.status_url}/studies/<study uid>"
        print(f"  {'status ' + hub.slug:<22} {status:<38} imaging status")
    book = Path(federation.data_dir) / "federation.json"
    print(f"  {len(federation.institutions)} demo institutions with credentials in {book}")
    agency = federation.agency
    print(f"Agency console:  {federation.registry_url}/console/ — sign in as client `{agency.client_id}`,")
    print(f"                 its secret is `client_secret` of the agency entry in {book}")
    print(f"Patient portal:  {federation.consent_url}/portal/ — `hie demo` prints its patient's RRN; sign in")
    print("                 with it and any mobile number (the development code is shown on the page)")
    print("Ctrl-C stops everything; `make demo` (hie demo) runs the referral scenario against it.")


def run_until_interrupted(options: LaunchOptions) -> int:
    launcher = Launcher(options)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        federation = launcher.start()
        print_summary(federation, time.monotonic() - started)
        sys.stdout.flush()
        while not stopping:
            dead = launcher.failed_child()
            if dead is not None:
                print(
                    f"{dead.name} stopped unexpectedly ({dead.process.returncode}): {_last_line(dead.log)}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
        print("stopping…")
        return 0
    except LaunchError as exc:
        print(f"hie up: {exc}", file=sys.stderr)
        return 1
    finally:
        launcher.stop()
