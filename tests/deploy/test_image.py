"""The container image, as far as this machine can check it without a container engine: the
Dockerfile's shape, the build context, what `pip install .` puts in it, and its entrypoint script."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest
from k8s_helpers import ROOT

from hie_platform.natsd import free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENTRYPOINT = ROOT / "deploy" / "docker" / "hie_service.py"
SERVICES = {
    "registry": "hie_registry",
    "consent": "hie_consent",
    "hub-node": "hie_hub",
    "imaging-gateway": "hie_imaging",
}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))
    )
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def test_dockerfile_is_multi_stage_on_python_slim_and_ends_unprivileged() -> None:
    steps = instructions()
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in steps
    stages = [args for kind, args in steps if kind == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    runtime = steps[[i for i, (k, _) in enumerate(steps) if k == "FROM"][-1] :]
    users = [args for kind, args in runtime if kind == "USER"]
    assert users == ["10001:10001"], "the last stage runs as a numeric non-root user (runAsNonRoot)"
    assert any(k == "RUN" and "PIP_CONSTRAINT=constraints.txt pip install ." in a for k, a in steps)
    assert any(k == "COPY" and a.startswith("--from=build /opt/hie") for k, a in runtime)
    healthcheck = next(a for k, a in runtime if k == "HEALTHCHECK")
    assert 'CMD ["hie-service", "healthcheck"]' in healthcheck
    assert ("ENTRYPOINT", '["hie-service"]') in runtime


def test_build_context_holds_what_the_build_copies_and_nothing_else() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**", "exclude everything, then re-include"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for kind, args in instructions():
        if kind == "COPY" and not args.startswith("--from"):
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied |= {s.rstrip("/").removeprefix("./") for s in sources}
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert any(source == i or source.startswith(i + "/") for i in included), (
            f"{source} is not in the context"
        )
    assert not included & {".venv", ".git", "tests", ".hie", "bench"}


def test_the_installed_package_carries_every_services_migrations(tmp_path: Path) -> None:
    """`pip install .` builds a wheel: Alembic's env.py, versions and template must be in it, and
    every other file of the packages (web templates, stylesheets, catalogs) the services read."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("hie_federation-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in SERVICES.values():
        assert f"{package}/migrations/env.py" in names
        assert f"{package}/migrations/script.py.mako" in names
        assert any(n.startswith(f"{package}/migrations/versions/0001_") for n in names), package
        assert f"{package}/__main__.py" in names
    wheel_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    data = [
        (Path(package).name, path.relative_to(ROOT / package))
        for package in wheel_config["targets"]["wheel"]["packages"]
        for path in (ROOT / package).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert ("hie_platform", Path("webui/templates/layout.html")) in data
    for package, path in data:
        assert f"{package}/{path.as_posix()}" in names, f"{package}/{path} is not in the wheel"


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    return env | extra


@pytest.mark.parametrize(
    ("service", "prefix"),
    [
        ("registry", "HIE_REGISTRY_"),
        ("consent", "HIE_CONSENT_"),
        ("hub-node", "HIE_HUB_"),
        ("imaging-gateway", "HIE_IMAGING_"),
    ],
)
def test_entrypoint_migrates_each_service(tmp_path: Path, service: str, prefix: str) -> None:
    database = tmp_path / f"{service}.db"
    env = clean_env(
        **{
            f"{prefix}DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            f"{prefix}HUB": "snubh",
            f"{prefix}AE_TITLE": "GW_SNUBH",
        }
    )
    result = run_entrypoint("migrate", service, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{service}: database at head" in result.stdout
    with sqlite3.connect(database) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"alembic_version", "outbox", "audit_log"} <= tables


def test_entrypoint_verifies_the_audit_chain_and_finds_tampering(tmp_path: Path) -> None:
    from hie_platform.audit import GENESIS, chain_hash

    database = tmp_path / "hub.db"
    env = clean_env(HIE_HUB_DATABASE_URL=f"sqlite+aiosqlite:///{database}", HIE_HUB_HUB="snubh")
    assert run_entrypoint("migrate", "hub-node", env=env).returncode == 0
    intact = run_entrypoint("verify-audit", "hub-node", env=env)
    assert intact.returncode == 0, intact.stderr[-2000:]
    assert "audit chain intact (0 records)" in intact.stdout

    records = [{"sequence": n, "action": "read", "patient_key": f"k{n}"} for n in (1, 2)]
    previous, rows = GENESIS, []
    for record in records:
        digest = chain_hash(previous, record)
        rows.append((record["sequence"], json.dumps(record), previous, digest))
        previous = digest
    with sqlite3.connect(database) as db:
        db.executemany(
            "insert into audit_log (sequence, recorded_at, record, prev_hash, hash)"
            " values (?, '2026-01-01 00:00:00', ?, ?, ?)",
            rows,
        )
    assert "intact (2 records)" in run_entrypoint("verify-audit", "hub-node", env=env).stdout
    with sqlite3.connect(database) as db:  # someone edits a record after the fact
        db.execute("update audit_log set record = ? where sequence = 2", (json.dumps(records[0]),))
    broken = run_entrypoint("verify-audit", "hub-node", env=env)
    assert broken.returncode == 1
    assert "BROKEN at sequence 2" in broken.stdout


def test_entrypoint_refuses_an_unknown_service() -> None:
    result = run_entrypoint("migrate", "pacs", env=clean_env())
    assert result.returncode == 2
    assert "unknown service 'pacs'" in result.stderr


def test_entrypoint_runs_a_service_and_checks_its_health(nats_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        HIE_REGISTRY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
        HIE_REGISTRY_NATS_URL=nats_url,
        HIE_REGISTRY_PORT=str(port),
        HIE_REGISTRY_REGISTRY_URL=f"http://127.0.0.1:{port}",
        HIE_REGISTRY_MIGRATE_ON_START="false",
        HIE_REGISTRY_NODE="image-test",
    )
    assert run_entrypoint("migrate", "registry", env=env).returncode == 0
    log = (tmp_path / "registry.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT), "registry"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "registry.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "registry not ready"
            time.sleep(0.1)
        # The entrypoint exec'd the service: the process is `python -m hie_registry` itself.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"hie_registry" in cmdline
        assert run_entrypoint("healthcheck", str(process.pid), env=env).returncode == 0
        wrong_port = env | {"HIE_REGISTRY_PORT": str(free_port())}
        unhealthy = run_entrypoint("healthcheck", str(process.pid), env=wrong_port)
        assert unhealthy.returncode == 1
        assert "hie_registry" in unhealthy.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it (so the exit status says why).
    assert process.returncode in (0, -signal.SIGTERM)


def test_healthcheck_has_nothing_to_check_when_no_service_runs() -> None:
    # This test process is not a service; a one-off `docker run IMAGE sh` is not unhealthy.
    assert run_entrypoint("healthcheck", str(os.getpid()), env=clean_env()).returncode == 0
