"""`hie registry …`: the agency's command line for the participation lifecycle and the directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from hie_cli.commands import command_group
from hie_schemas.directory import InstitutionKind, InstitutionState

app = command_group("Agency operations on the registry (needs agency credentials).")
pacs_app = command_group(
    "The DICOM endpoint (PACS) the registry lists for an institution; imaging gateways relay to it."
)
app.add_typer(pacs_app, name="pacs")

RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        envvar="HIE_REGISTRY_URL",
        metavar="URL",
        help="defaults to the one in <data-dir>/federation.json",
    ),
]
DataDir = Annotated[
    Path, typer.Option("--data-dir", metavar="DIR", help="where `hie up` wrote federation.json")
]
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
    """Columns aligned by display width (Korean names take two cells a character), plain when piped."""
    grid = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column.upper().replace("_", " "), overflow="fold")
    for row in rows:
        grid.add_row(*(_text(row.get(c)) for c in columns))
    # Piped output is not folded to 80 columns: a script reads whole rows.
    Console(soft_wrap=False, width=None if sys.stdout.isatty() else 400).print(grid)


def _text(value: Any) -> str:
    """A value as a person reads it: lists joined, a DICOM endpoint as AE@host:port, nothing as '-'."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        if {"ae_title", "host", "port"} <= value.keys():
            return f"{value['ae_title']}@{value['host']}:{value['port']}"
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items() if v)
    return str(value)


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

    command.__doc__ = STEPS[action]
    return command


STEPS = {
    "review": "Start the review of an institution's application.",
    "sign-agreement": "Record that an institution signed the participation agreement.",
    "approve": "Approve an institution (issues its client credentials, shown once).",
    "activate": "Put an approved institution into service.",
    "reject": "Reject an institution's application.",
    "suspend": "Suspend an institution: every service refuses its tokens at once.",
    "reinstate": "Reinstate a suspended institution.",
    "revoke": "Revoke an institution's participation for good.",
}
for _action in STEPS:
    app.command(name=_action)(_step(_action))


@app.command(name="list")
def list_institutions(
    hub: Annotated[str | None, typer.Option(metavar="SLUG", help="only this hub's institutions")] = None,
    kind: Annotated[InstitutionKind | None, typer.Option(help="only institutions of this kind")] = None,
    state: Annotated[InstitutionState | None, typer.Option(help="only institutions in this state")] = None,
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """List institutions."""
    chosen = {"hub": hub, "kind": kind.value if kind else None, "state": state.value if state else None}
    params = {k: v for k, v in chosen.items() if v}
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
        print(f"{key:<12} {_text(inst.get(key))}")


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


@pacs_app.command(name="set")
def pacs_set(
    code: Annotated[
        str, typer.Argument(metavar="CODE", help="요양기관기호 of the institution that owns the PACS")
    ],
    ae_title: Annotated[
        str, typer.Option("--ae-title", metavar="AE", help="the PACS's AE title (1-16 characters)")
    ],
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="host name or address the PACS listens on")
    ],
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="the PACS's DICOM port")
    ],
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """Register (or change) an institution's PACS: gateways relay its studies there and accept it as a
    sender from that host."""
    inst = Agency(registry_url, data_dir).call(
        "PUT", f"/institutions/{code}/dicom", json={"ae_title": ae_title, "host": host, "port": port}
    )
    print(f"{inst['code']} {inst['name']}: PACS {_text(inst.get('dicom'))}")


@pacs_app.command(name="show")
def pacs_show(
    code: Annotated[str, typer.Argument(help="요양기관기호")],
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """Show the PACS registered for an institution."""
    inst = Agency(registry_url, data_dir).call("GET", f"/institutions/{code}/detail")
    if not inst.get("dicom"):
        fail(f"{code} has no PACS registered (hie registry pacs set {code} --ae-title … --host … --port …)")
    print(f"{inst['code']} {inst['name']}: PACS {_text(inst['dicom'])}")


# --- the registry's signing keys (docs/operations.md, "Signing keys") ------------------------------

keys_app = command_group("The registry's token signing keys: list, rotate, retire a leaked key at once.")
app.add_typer(keys_app, name="keys")
KeyReason = Annotated[str, typer.Option("--reason", "-r", help="why; kept in the registry's audit trail")]


def _key_change(result: dict[str, Any]) -> None:
    print(f"signing with {result['kid']}; in the JWKS: {', '.join(result['keys'])}")
    if result["retired"]:
        print(f"retired (refused by every service from now on): {', '.join(result['retired'])}")


@keys_app.command(name="list")
def keys_list(registry_url: RegistryUrl = None, data_dir: DataDir = Path(".hie")) -> None:
    """List the signing keys, newest first: which one signs, which are retired."""
    rows = Agency(registry_url, data_dir).call("GET", "/keys")
    table(
        [{**r, "signing": "yes" if r["signing"] else ""} for r in rows],
        ["kid", "created_at", "retired_at", "signing"],
    )


@keys_app.command(name="rotate")
def keys_rotate(
    reason: KeyReason,
    retire_now: Annotated[
        bool,
        typer.Option("--retire-now", help="retire every older key at once (a leaked key), not after expiry"),
    ] = False,
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """Sign with a new key; older keys verify until their tokens expire, or stop at once (--retire-now)."""
    result = Agency(registry_url, data_dir).call(
        "POST", "/keys/rotate", params={"retire_previous": retire_now}, json={"reason": reason}
    )
    _key_change(result)


@keys_app.command(name="retire")
def keys_retire(
    kid: Annotated[str, typer.Argument(metavar="KID", help="the key id (hie registry keys list)")],
    reason: KeyReason,
    registry_url: RegistryUrl = None,
    data_dir: DataDir = Path(".hie"),
) -> None:
    """Retire one key at once: it leaves the JWKS and every service refuses its tokens."""
    _key_change(Agency(registry_url, data_dir).call("POST", f"/keys/{kid}/retire", json={"reason": reason}))
