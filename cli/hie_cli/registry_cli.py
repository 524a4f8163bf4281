"""`hie registry …`: the agency's command line for the participation lifecycle and the directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

app = typer.Typer(
    help="Agency operations on the registry (needs agency credentials).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry-url", envvar="HIE_REGISTRY_URL", help="defaults to the one in <data-dir>/federation.json"
    ),
]
DataDir = Annotated[Path, typer.Option("--data-dir", help="where `hie up` wrote federation.json")]
Reason = Annotated[str, typer.Option("--reason", "-r", help="why; recorded in the institution's history")]


def fail(message: str) -> NoReturn:
    print(f"hie registry: {message}", file=sys.stderr)
    raise typer.Exit(1)


class Agency:
    def __init__(self, registry_url: str | None, data_dir: Path) -> None:
        client_id = os.environ.get("HIE_AGENCY_CLIENT_ID")
        secret = os.environ.get("HIE_AGENCY_CLIENT_SECRET")
        federation = data_dir / "federation.json"
        if (registry_url is None or not client_id) and federation.exists():
            data = json.loads(federation.read_text())
            registry_url = registry_url or data["registry_url"]
            agency = next(i for i in data["institutions"] if i["kind"] == "agency")
            client_id, secret = client_id or agency["client_id"], secret or agency["client_secret"]
        if not registry_url or not client_id or not secret:
            fail(
                "no registry or agency credentials: run `hie up`, or set HIE_REGISTRY_URL, "
                "HIE_AGENCY_CLIENT_ID and HIE_AGENCY_CLIENT_SECRET"
            )
        self.url = registry_url.rstrip("/")
        self.http = httpx.Client(timeout=30.0)
        try:
            response = self.http.post(
                f"{self.url}/oauth2/token",
                data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
            )
        except httpx.HTTPError as exc:
            fail(f"cannot reach the registry at {self.url}: {type(exc).__name__}")
        if response.status_code != 200:
            fail(f"agency sign-in refused: {response.json().get('error_description', response.status_code)}")
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the registry at {self.url}: {type(exc).__name__}")
        if response.status_code >= 400:
            try:
                body = response.json()
                message = "; ".join(i.get("diagnostics", "") for i in body.get("issue", [])) or str(body)
            except ValueError:
                message = response.text[:200]
            fail(f"{response.status_code}: {message}")
        return response.json()


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c) or "")) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c) or "").ljust(widths[c]) for c in columns))


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="application JSON (code, name, kind, region, hub, …)")],
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """Enter an institution's application."""
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read {file}: {exc}")
    inst = Agency(registry_url, data_dir).call("POST", "/institutions", json=body)
    print(f"{inst['code']} {inst['name']}: {inst['state']}")


def _step(action: str) -> Any:
    def command(
        code: Annotated[str, typer.Argument(help="요양기관기호")],
        reason: Reason,
        registry_url: RegistryUrl = None,
        data_dir: DataDir = Path(".hie"),
    ) -> None:
        result = Agency(registry_url, data_dir).call(
            "POST", f"/institutions/{code}/{action}", json={"reason": reason}
        )
        inst = result["institution"]
        print(f"{inst['code']} {inst['name']}: {inst['state']}")
        if result.get("evidence"):
            print(json.dumps(result["evidence"], indent=2, ensure_ascii=False))
        if result.get("credentials"):
            creds = result["credentials"]
            print(f"client_id={creds['client_id']} client_secret={creds['client_secret']} (shown once)")

    command.__doc__ = f"{action.replace('-', ' ').capitalize()} an institution."
    return command


for _action in (
    "review",
    "sign-agreement",
    "approve",
    "activate",
    "reject",
    "suspend",
    "reinstate",
    "revoke",
):
    app.command(name=_action)(_step(_action))


@app.command(name="list")
def list_institutions(
    hub: Annotated[str | None, typer.Option(help="hub slug")] = None,
    kind: Annotated[str | None, typer.Option(help="hub, clinic, public-agency")] = None,
    state: Annotated[str | None, typer.Option(help="applied, under-review, active, suspended, …")] = None,
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """List institutions."""
    params = {k: v for k, v in {"hub": hub, "kind": kind, "state": state}.items() if v}
    rows = Agency(registry_url, data_dir).call("GET", "/institutions", params=params)
    table(rows, ["code", "name", "kind", "region", "hub", "state"])


@app.command()
def show(code: str, registry_url: RegistryUrl = None, data_dir: DataDir = Path(".hie")) -> None:
    """Show one institution, with contacts."""
    inst = Agency(registry_url, data_dir).call("GET", f"/institutions/{code}/detail")
    for key in (
        "code",
        "oid",
        "name",
        "name_en",
        "kind",
        "region",
        "hub",
        "state",
        "departments",
        "fhir_base",
        "dicom",
        "contacts",
    ):
        print(f"{key:<12} {inst.get(key)}")


@app.command()
def history(code: str, registry_url: RegistryUrl = None, data_dir: DataDir = Path(".hie")) -> None:
    """Show every lifecycle step of an institution."""
    rows = Agency(registry_url, data_dir).call("GET", f"/institutions/{code}/history")
    table(rows, ["at", "action", "from_state", "to_state", "actor", "reason"])


@app.command()
def statistics(registry_url: RegistryUrl = None, data_dir: DataDir = Path(".hie")) -> None:
    """Institutions by kind, region and state; exchanges per month."""
    stats = Agency(registry_url, data_dir).call("GET", "/statistics")
    for group, counts in stats["institutions"].items():
        print(f"{group}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    table(stats["exchanges_per_month"], ["month", "kind", "count"])
