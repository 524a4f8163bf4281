"""A multi-host federation on one machine: Linux network namespaces as hosts, the dev overlay's settings.

Hosts are network namespaces ("central", "hub1", "hub2") on a bridge in the root namespace, each with
an address of its own. Every process runs with the environment the kubelet would give its container
in the rendered ``deploy/k8s/overlays/dev`` (ConfigMaps and Secrets through ``envFrom`` with their
prefixes, then ``env`` with ``$(VAR)`` expanded). There is no cluster DNS and no kube-proxy here, so
two kinds of value are rewritten, and nothing else:

- addresses: ``<service>.<namespace>.svc.cluster.local[:port]`` (and the NATS routes' pod names)
  become ``<ip of the host running those pods>:<container port the Service targets>``; the ``nats``
  Service spans the three servers, and a client gets the one on its own host;
- paths inside the pod's volume mounts (spool, /tmp, the topology ConfigMap), because the hosts
  share one filesystem where pods each have their own.

Imported by name from the tests (``from multihost_support import ...``), never through conftest.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from multihost_hosts import (
    Network,
    Proc,
    Processes,
    base_env,
    command,
    http_ok,
    in_netns,
    postgres_bin,
    wait_until,
)
from multihost_postgres import PrivatePostgres
from multihost_render import (
    NATS_PODS,
    SERVICE_ADDRESS,
    Addresses,
    Rendered,
    SetupError,
    kubelet_env,
    pod_containers,
)

HUB_OF_HOST = {"hub1": "severance", "hub2": "snubh"}
# The only settings that may differ from the rendered overlay (by env-name suffix), and why.
ADDRESS_SETTINGS = ("DATABASE_URL", "NATS_ADDRESS", "NATS_URL", "PUBLIC_URL", "REGISTRY_URL")
MOUNT_SETTINGS = ("SPOOL_DIR", "CREDENTIALS_FILE", "TOPOLOGY_FILE")


# --- the NATS cluster's configuration --------------------------------------------------------------


def nats_node_files(rendered: Rendered, addresses: Addresses, folder: Path) -> tuple[str, str, list[str]]:
    """The rendered nats.conf with routes as addresses and store/pid paths in folder; the rendered
    accounts.conf unchanged. Returns (nats.conf as run, accounts.conf, the rendered lines changed)."""
    files = rendered.data("ConfigMap", "hie-central", "nats-config")
    original = files["nats.conf"]
    text = addresses.nats_routes(original)
    replacements = {
        "store_dir: /data": f"store_dir: {folder / 'jetstream'}",
        "pid_file: /var/run/nats/nats.pid": f"pid_file: {folder / 'nats.pid'}",
    }
    for old, new in replacements.items():
        if text.count(old) != 1:
            raise SetupError(f"nats.conf: expected one {old!r} (the volume mounts of the StatefulSet)")
        text = text.replace(old, new)
    changed = [line for line in original.splitlines() if line not in text.splitlines()]
    return text, files["accounts.conf"], changed


def json_dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def iter_hie(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    for key in sorted(env):
        if key.startswith("HIE_"):
            yield key, env[key]


# --- the federation across the hosts -------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One pod of the dev overlay run on a host: (namespace, workload, container) and its pod name."""

    host: str
    namespace: str
    name: str
    container: str
    pod: str
    http: str  # the Service URL the other parties use, as the overlay writes it

    @property
    def label(self) -> str:
        return f"{self.name}-{self.namespace.removeprefix('hie-')}"


CENTRAL = (
    Workload(
        "central",
        "hie-central",
        "registry",
        "registry",
        "registry-0",
        "http://registry.hie-central.svc.cluster.local",
    ),
    Workload(
        "central",
        "hie-central",
        "consent",
        "consent",
        "consent-0",
        "http://consent.hie-central.svc.cluster.local",
    ),
)
HUB_WORKLOADS = tuple(
    w
    for host, slug in HUB_OF_HOST.items()
    for w in (
        Workload(
            host,
            f"hie-hub-{slug}",
            "hub-node",
            "hub-node",
            "hub-node-0",
            f"http://hub-node.hie-hub-{slug}.svc.cluster.local",
        ),
        Workload(
            host,
            f"hie-hub-{slug}",
            "imaging-gateway",
            "imaging-gateway",
            "imaging-gateway-0",
            f"http://imaging-gateway.hie-hub-{slug}.svc.cluster.local",
        ),
    )
)


@dataclass
class MultiHost:
    """Everything the tests need: the hosts, the processes and what the overlay said they should get."""

    run_dir: Path
    ready_timeout: float = 240.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    rendered: Rendered = field(init=False)
    network: Network = field(init=False)
    addresses: Addresses = field(init=False)
    procs: Processes = field(init=False)
    postgres: PrivatePostgres | None = None
    services: dict[str, Proc] = field(default_factory=dict)  # Workload.label -> running service
    migrations: dict[str, Proc] = field(default_factory=dict)
    nats: dict[str, Proc] = field(default_factory=dict)  # pod -> server
    nats_changed_lines: list[str] = field(default_factory=list)
    federation: Any = None  # hie_cli.federation.Federation once started

    def __post_init__(self) -> None:
        self.network = Network(self.run_id)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Processes(self.network, self.run_dir / "logs")

    # --- volumes: each pod's own directory per volume --------------------------------------------

    def volume_path(self, workload: dict[str, Any], pod: str, container: dict[str, Any], path: str) -> str:
        for mount in container.get("volumeMounts", []):
            root = mount["mountPath"].rstrip("/")
            if path == root or path.startswith(root + "/"):
                folder = self.run_dir / "volumes" / workload["metadata"]["namespace"] / pod / mount["name"]
                self._fill_volume(workload, mount["name"], folder)
                return str(folder) + path[len(root) :]
        # Not mounted in this container (the init containers do not read it): the same as in the pod.
        return path

    def _fill_volume(self, workload: dict[str, Any], name: str, folder: Path) -> None:
        if folder.exists():
            return
        folder.mkdir(parents=True)
        namespace = workload["metadata"]["namespace"]
        volume: dict[str, Any] = next(
            (v for v in workload["spec"]["template"]["spec"].get("volumes", []) if v["name"] == name), {}
        )
        if "configMap" in volume:
            for key, text in self.rendered.data("ConfigMap", namespace, volume["configMap"]["name"]).items():
                (folder / key).write_text(self._resolve_file(key, text))

    def _resolve_file(self, key: str, text: str) -> str:
        if key != "topology.json":
            return self.addresses.resolve(text, None)
        topology = json.loads(text)
        for entry in topology["hubs"].values():
            entry["fhir_base"] = self.addresses.resolve(entry["fhir_base"], None)
            gateway = entry["gateway"]
            m = SERVICE_ADDRESS.fullmatch(gateway["host"])
            if m is None:
                raise SetupError(f"topology.json: gateway host {gateway['host']} is not a Service name")
            gateway["host"], gateway["port"] = self.addresses.endpoint(
                m["namespace"], m["service"], int(gateway["port"]), None
            )
        return json_dump(topology)

    # --- the environment a container gets here ------------------------------------------------------

    def container_env(
        self, w: Workload, container_name: str
    ) -> tuple[dict[str, str], dict[str, str], dict[str, Any], dict[str, Any]]:
        """(rendered env, env as run, workload, container)."""
        workload = self.rendered.workload(w.namespace, w.name)
        container = pod_containers(workload)[container_name]
        rendered = kubelet_env(self.rendered, workload, container, w.pod)
        run = {k: self.addresses.resolve(v, w.host) for k, v in rendered.items()}
        for key, value in run.items():
            if key.endswith(MOUNT_SETTINGS):
                run[key] = self.volume_path(workload, w.pod, container, value)
        return rendered, run, workload, container

    # --- start and stop -------------------------------------------------------------------------

    def start(self) -> None:
        pg_bin = postgres_bin()
        if pg_bin is None:
            raise SetupError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.rendered = Rendered.render()
        self.network.create()
        self.addresses = Addresses(self.rendered, self.network.ips)
        self._start_nats()
        self._start_postgres(pg_bin)
        self._wait_nats()
        self._run_migrations()
        registry = self._spawn_service(CENTRAL[0])
        self._wait_ready([registry])
        rest = [self._spawn_service(w) for w in (*CENTRAL[1:], *HUB_WORKLOADS)]
        self._wait_ready(rest)
        self.federation = self._federation()

    def stop(self) -> list[str]:
        """Stop every process, remove the namespaces, bridge and database; returns what failed."""
        self.procs.stop_all()
        problems = self.network.destroy()
        if self.postgres is not None:
            self.postgres.remove()
        return problems

    def _start_nats(self) -> None:
        nats_set = self.rendered.workload("hie-central", "nats")
        container = pod_containers(nats_set)["nats"]
        from hie_platform.natsd import find_nats_server

        for pod, host in NATS_PODS.items():
            folder = self.run_dir / "nats" / pod
            folder.mkdir(parents=True)
            conf, accounts, self.nats_changed_lines = nats_node_files(self.rendered, self.addresses, folder)
            (folder / "nats.conf").write_text(conf)
            (folder / "accounts.conf").write_text(accounts)
            args = [a.replace("/etc/nats/nats.conf", str(folder / "nats.conf")) for a in container["args"]]
            rendered = kubelet_env(self.rendered, nats_set, container, pod)
            self.nats[pod] = self.procs.spawn(
                pod,
                host,
                [find_nats_server(), *args],
                base_env() | rendered,
                url=f"http://{self.network.ips[host]}:8222",
            )
            self.nats[pod].rendered_env = rendered

    def _wait_nats(self) -> None:
        # The StatefulSet's startupProbe: /healthz on the monitor port (JetStream meta leader included).
        servers = list(self.nats.values())
        wait_until(
            "the NATS cluster (/healthz of all three servers)",
            lambda: all(http_ok(f"{p.url}/healthz") for p in servers),
            self.ready_timeout,
            servers,
        )

    def _start_postgres(self, pg_bin: Path) -> None:
        workload = self.rendered.workload("hie-central", "postgres")
        container = pod_containers(workload)["postgres"]
        env = kubelet_env(self.rendered, workload, container, "postgres-0")
        self.postgres = PrivatePostgres(pg_bin, env)
        self.postgres.init()
        ip, port = self.addresses.endpoint("hie-central", "postgres", 5432, None)
        server = self.procs.spawn(
            "postgres",
            "central",
            self.postgres.argv(f"{ip},127.0.0.1"),
            {"PATH": "/usr/bin:/bin"},
            user="postgres",
        )
        pw = {"PGPASSWORD": env["POSTGRES_PASSWORD"], "PATH": "/usr/bin:/bin"}
        ready = [
            str(pg_bin / "pg_isready"),
            "-h",
            ip,
            "-p",
            str(port),
            "-U",
            env["POSTGRES_USER"],
            "-d",
            "postgres",
        ]
        wait_until(
            "PostgreSQL on the central host",
            lambda: subprocess.run(ready, capture_output=True, env=pw, check=False).returncode == 0,
            self.ready_timeout,
            [server],
        )
        # POSTGRES_DB, as the image creates it on first start.
        create = [
            str(pg_bin / "psql"),
            "-h", ip, "-p", str(port), "-U", env["POSTGRES_USER"], "-d", "postgres", "-v", "ON_ERROR_STOP=1",
            "-c", f'CREATE DATABASE "{env["POSTGRES_DB"]}"',
        ]  # fmt: skip
        result = subprocess.run(create, capture_output=True, text=True, env=pw, check=False, timeout=60)
        if result.returncode != 0:
            raise SetupError(f"creating database {env['POSTGRES_DB']}: {result.stderr.strip()}")

    def _run_migrations(self) -> None:
        # The init containers (Alembic to head), one per pod, all at once as the pods would start.
        pending = []
        for w in (*CENTRAL, *HUB_WORKLOADS):
            rendered, run, workload, container = self.container_env(w, "migrate")
            proc = self.procs.spawn(f"migrate-{w.label}", w.host, command(container), base_env() | run)
            proc.rendered_env, proc.workload, proc.container = rendered, workload, container
            self.migrations[w.label] = proc
            pending.append(proc)
        deadline = time.monotonic() + self.ready_timeout
        for proc in pending:
            try:
                code = proc.process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SetupError(f"{proc.name} did not finish:\n{proc.last_lines()}") from None
            if code != 0:
                raise SetupError(f"{proc.name} exited with {code}:\n{proc.last_lines()}")

    def _spawn_service(self, w: Workload) -> Proc:
        rendered, run, workload, container = self.container_env(w, w.container)
        url = self.addresses.resolve(w.http, None)
        proc = self.procs.spawn(w.label, w.host, command(container), base_env() | run, url=url)
        proc.rendered_env, proc.workload, proc.container = rendered, workload, container
        self.services[w.label] = proc
        return proc

    def _wait_ready(self, procs: list[Proc]) -> None:
        # The readinessProbe: /readyz (database and NATS reachable).
        wait_until(
            "/readyz of " + ", ".join(p.name for p in procs),
            lambda: all(http_ok(f"{p.url}/readyz") for p in procs),
            self.ready_timeout,
            procs,
        )

    def _federation(self) -> Any:
        from hie_cli.federation import Federation, Gateway, HubEntry, InstitutionEntry
        from hie_registry import seed

        registry = self.services["registry-central"]
        credentials_file = Path(registry.env["HIE_REGISTRY_CREDENTIALS_FILE"])
        credentials: dict[str, str] = json.loads(credentials_file.read_text())
        registry_url = registry.url or ""
        directory = httpx.get(f"{registry_url}/institutions", timeout=10, trust_env=False).json()
        hubs = {h["slug"]: h for h in httpx.get(f"{registry_url}/hubs", timeout=10, trust_env=False).json()}
        entries = []
        for slug in HUB_OF_HOST.values():
            hub = hubs[slug]
            gateway = self.services[f"imaging-gateway-hub-{slug}"]
            entries.append(
                HubEntry(
                    slug=slug,
                    code=hub["code"],
                    name=hub["name"],
                    node_url=hub["fhir_base"].removesuffix("/fhir"),
                    fhir_base=hub["fhir_base"],
                    gateway=Gateway(
                        ae_title=hub["gateway"]["ae_title"],
                        host=hub["gateway"]["host"],
                        port=hub["gateway"]["port"],
                        status_url=gateway.url or "",
                    ),
                )
            )
        served = set(HUB_OF_HOST.values())

        def client_id(inst: dict[str, Any]) -> str:
            return seed.AGENCY_CLIENT_ID if inst["kind"] == "agency" else str(inst["code"])

        institutions = [
            InstitutionEntry(
                code=i["code"],
                name=i["name"],
                kind=i["kind"],
                hub=i["hub"],
                client_id=client_id(i),
                client_secret=credentials[client_id(i)],
                dicom_ae=(i.get("dicom") or {}).get("ae_title"),
            )
            for i in directory
            if i["kind"] == "agency" or i["hub"] in served
        ]
        return Federation(
            data_dir=str(self.run_dir),
            nats_url=f"nats://{self.network.ips['central']}:4222",
            registry_url=registry_url,
            consent_url=self.services["consent-central"].url or "",
            hubs=entries,
            institutions=institutions,
        )


def start_pacs_in(netns: str, ae_title: str) -> Any:
    """The destination hospital's PACS on its hub host's loopback: reachable from that host only."""
    from hie_cli.pacs import DemoPacs

    def start() -> DemoPacs:
        pacs = DemoPacs(ae_title, host="127.0.0.1")
        pacs.start()
        return pacs

    return in_netns(netns, start)
