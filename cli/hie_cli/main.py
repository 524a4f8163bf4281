"""The `hie` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from hie_cli import registry_cli
from hie_cli.launcher import MAX_HUBS, LaunchOptions, run_until_interrupted
from hie_platform.runtime import redact_url

app = typer.Typer(
    help="HIE federation: run it locally, demo it, operate it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: typer's rich panels print "--help <bool>"
)

app.add_typer(registry_cli.app, name="registry")
audit_app = typer.Typer(
    help="Check a hub's tamper-evident audit trail.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(audit_app, name="audit")

DataDir = Annotated[Path, typer.Option("--data-dir", help="where databases, logs and federation.json live")]


@app.command()
def up(
    data_dir: DataDir = Path(".hie"),
    hubs: Annotated[int, typer.Option(help=f"number of hubs to run (1-{MAX_HUBS})")] = 2,
    postgres_url: Annotated[
        str | None, typer.Option(help="run every service on PostgreSQL (one schema each) instead of SQLite")
    ] = None,
    schema_prefix: Annotated[str, typer.Option(help="prefix of the PostgreSQL schemas")] = "hie",
) -> None:
    """Start nats-server, registry, consent and N hubs on this machine; Ctrl-C stops them."""
    code = run_until_interrupted(
        LaunchOptions(data_dir=data_dir, hubs=hubs, postgres_url=postgres_url, schema_prefix=schema_prefix)
    )
    raise typer.Exit(code)


@app.command()
def demo(
    data_dir: DataDir = Path(".hie"),
    instances: Annotated[int, typer.Option(help="CT instances in the demo series")] = 20,
) -> None:
    """Run the referral scenario against a running federation and print its timeline."""
    from hie_cli.demo import DemoError, run_demo
    from hie_cli.federation import Federation

    path = data_dir / "federation.json"
    if not path.exists():
        print(
            f"hie demo: {path} not found; start the federation first with `make run` (hie up)",
            file=sys.stderr,
        )
        raise typer.Exit(1)
    try:
        result = asyncio.run(run_demo(Federation.read(path), instances=instances))
    except DemoError as exc:
        print(f"hie demo: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    result.print_timeline()


@audit_app.command("verify")
def audit_verify(
    database_url: Annotated[
        str, typer.Option("--database-url", help="the hub's database (its HIE_HUB_DATABASE_URL)")
    ],
    schema: Annotated[str | None, typer.Option(help="PostgreSQL schema of the hub, if any")] = None,
) -> None:
    """Walk a hub's audit chain; exit 1 naming the first broken record if it was altered."""
    from hie_hub.audit_verify import verify

    try:
        check = asyncio.run(verify(database_url, schema))
    except Exception as exc:
        print(
            f"hie audit verify: cannot read {redact_url(database_url)}: {type(exc).__name__}", file=sys.stderr
        )
        raise typer.Exit(2) from None
    if not check.ok:
        print(
            f"hie audit verify: chain broken at sequence {check.first_bad_sequence} "
            f"({check.records} records read)",
            file=sys.stderr,
        )
        raise typer.Exit(1)
    print(f"audit chain intact: {check.records} records")


if __name__ == "__main__":
    app()
