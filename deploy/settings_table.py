"""Write the table of every setting each service reads into docs/operations.md.

    python deploy/settings_table.py            # print the tables
    python deploy/settings_table.py --write    # replace them in docs/operations.md
    python deploy/settings_table.py --check    # exit 1 if docs/operations.md is stale

Read from the Settings classes themselves (fields, types, defaults) and from deploy/k8s (which
ConfigMap, Secret or env entry sets each one), so neither can drift from the page unnoticed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from hie_consent.config import ConsentSettings
from hie_hub.config import HubSettings
from hie_imaging.config import ImagingSettings
from hie_registry.config import RegistrySettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOC = ROOT / "docs" / "operations.md"
BEGIN, END = "<!-- settings:begin (deploy/settings_table.py) -->", "<!-- settings:end -->"

SERVICES: list[tuple[str, type[BaseSettings], str]] = [
    ("registry", RegistrySettings, "registry"),
    ("consent", ConsentSettings, "consent"),
    ("hub node", HubSettings, "hub-node"),
    ("imaging gateway", ImagingSettings, "imaging-gateway"),
]
# Set per container in the workload's env (not in a ConfigMap or Secret).
FROM_ENV = {
    "node": "env: the pod's name",
    "nats_url": "env: nats://$(NATS_USER):$(NATS_PASSWORD)@$(NATS_ADDRESS)",
}


def literals(kustomization: Path, name: str) -> dict[str, str]:
    """The literals of one configMapGenerator or secretGenerator entry."""
    data = yaml.safe_load(kustomization.read_text())
    found: dict[str, str] = {}
    for generator in (*data.get("configMapGenerator", []), *data.get("secretGenerator", [])):
        if generator["name"] == name:
            found |= dict(item.split("=", 1) for item in generator.get("literals", []))
    return found


def where_set(field: str, base: str) -> str:
    key = field.upper()
    config = literals(K8S / "base" / base / "kustomization.yaml", f"{base}-config")
    if key in config:
        return f"`{base}-config`: `{config[key]}`"
    central = K8S / "overlays" / "central" / "kustomization.yaml"
    hub = K8S / "overlays" / "hub-snubh" / "kustomization.yaml"
    settings = literals(hub if base in ("hub-node", "imaging-gateway") else central, "federation-settings")
    if key in settings:
        return "overlay `federation-settings`"
    secret = literals(K8S / "overlays" / "dev" / "kustomization.yaml", f"{base}-secrets")
    if key in secret:
        return f"Secret `{base}-secrets`"
    return FROM_ENV.get(field, "")


def default(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "*(development placeholder; refused outside development)*"
    if value is None:
        return "—"
    text = str(value.value if hasattr(value, "value") else value)
    return f"`{text}`"


def kind(annotation: Any) -> str:
    """`str | None` reads "str, optional" (a bar would split the Markdown cell)."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if args and len(args) < len(getattr(annotation, "__args__", ())):
        return ", ".join(kind(a) for a in args) + ", optional"
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")


def table(title: str, cls: type[BaseSettings], base: str) -> list[str]:
    prefix = cls.model_config.get("env_prefix", "")
    lines = [
        f"#### {title} (`{prefix}*`)",
        "",
        "| variable | type | default | set by deploy/k8s |",
        "|---|---|---|---|",
    ]
    for name, field in cls.model_fields.items():
        required = field.is_required()
        shown = "**required**" if required else default(field.default)
        lines.append(
            f"| `{prefix}{name.upper()}` | {kind(field.annotation)} | {shown} | {where_set(name, base)} |"
        )
    return [*lines, ""]


def render() -> str:
    lines = [BEGIN, ""]
    for title, cls, base in SERVICES:
        lines += table(title, cls, base)
    return "\n".join([*lines, END])


def main() -> int:
    parser = argparse.ArgumentParser(description="the settings tables of docs/operations.md")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args()
    tables = render()
    if not (args.write or args.check):
        sys.stdout.write(tables + "\n")
        return 0
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    updated = text[:start] + tables + text[end:]
    if args.check:
        if updated != text:
            sys.stderr.write(
                "docs/operations.md lists other settings: run python deploy/settings_table.py --write\n"
            )
            return 1
        return 0
    DOC.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
