"""The `hie` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from hie_cli import outbox_cli, registry_cli
from hie_cli.commands import command_group
from hie_cli.launcher import MAX_HUBS, LaunchOptions, run_until_interrupted
from hie_platform.runtime import redact_url

app = command_group("HIE federation: run it locally, demo it, operate it.")

app.add_typer(registry_cli.app, name="registry")
app.add_typer(outbox_cli.app, name="outbox")
audit_app = command_group("Check a hub's tamper-evident audit trail.")
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
    import httpx

    federation = Federation.read(path)
    try:
        result = asyncio.run(run_demo(federation, instances=instances))
    except DemoError as exc:
        print(f"hie demo: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        # A federation killed without a clean stop leaves its address book: say so in one line.
        try:
            where = str(exc.request.url.copy_with(path="/", query=None))
        except RuntimeError:  # httpx raises when the error has no request
            where = federation.registry_url
        print(
            f"hie demo: nothing answers at {where} ({type(exc).__name__}); "
            f"is `hie up` running on {data_dir}?",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    result.print_timeline()
    print(
        f"See it as the patient: {federation.consent_url}/portal/ — sign in with RRN {result.rrn} "
        "and any mobile number (the development code is shown on the page)."
    )


@audit_app.command("verify")
def audit_verify(
    database_url: Annotated[
        str, typer.Option("--database-url", help="the hub's database (its HIE_HUB_DATABASE_URL)")
    ],
    schema: Annotated[str | None, typer.Option(help="PostgreSQL schema of the hub, if any")] = None,
    hub: Annotated[str | None, typer.Option(help="the hub's slug, whose checkpoints to check")] = None,
    checkpoint_key: Annotated[
        Path | None,
        typer.Option(help="the hub's checkpoint public key (PEM, HIE_HUB_AUDIT_CHECKPOINT_KEY_FILE + .pub)"),
    ] = None,
    nats_url: Annotated[
        str | None, typer.Option(help="read the hub's signed checkpoints from this NATS (JetStream)")
    ] = None,
    stream: Annotated[str, typer.Option(help="the stream that keeps the checkpoints")] = "HIE_AUDIT",
    checkpoints_file: Annotated[
        Path | None, typer.Option(help="read the checkpoints from a file of JSON lines instead")
    ] = None,
) -> None:
    """Walk a hub's audit chain and check it against the hub's signed checkpoints; exit 1 on any finding
    (a broken link, truncation, a rewrite, a forged checkpoint), one line each."""
    from hie_hub.audit.verify import verify

    where = redact_url(database_url)
    if nats_url is None and checkpoints_file is None:
        try:
            check = asyncio.run(verify(database_url, schema))
        except Exception as exc:
            print(f"hie audit verify: cannot read {where}: {type(exc).__name__}", file=sys.stderr)
            raise typer.Exit(2) from None
        if not check.ok:
            print(
                f"hie audit verify: chain broken at sequence {check.first_bad_sequence} "
                f"({check.records} records read)",
                file=sys.stderr,
            )
            raise typer.Exit(1)
        print(f"audit chain intact: {check.records} records")
        print(
            "hie audit verify: no checkpoints given (--nats-url or --checkpoints-file): "
            "truncation and rewrite were not checked",
            file=sys.stderr,
        )
        return
    _verify_with_checkpoints(database_url, schema, hub, checkpoint_key, nats_url, stream, checkpoints_file)


def _verify_with_checkpoints(
    database_url: str,
    schema: str | None,
    hub: str | None,
    checkpoint_key: Path | None,
    nats_url: str | None,
    stream: str,
    checkpoints_file: Path | None,
) -> None:
    from hie_hub.audit.verify import read_from_file, read_from_nats, verify_against
    from hie_platform.audit_anchor import load_public_key

    if checkpoint_key is None or hub is None:
        print("hie audit verify: checkpoints need --hub and --checkpoint-key", file=sys.stderr)
        raise typer.Exit(2)
    try:
        public = load_public_key(checkpoint_key)
        if checkpoints_file is not None:
            checkpoints = read_from_file(checkpoints_file, hub)
        else:
            assert nats_url is not None
            checkpoints = asyncio.run(read_from_nats(nats_url, hub, stream))
    except Exception as exc:
        source = checkpoints_file or redact_url(nats_url or "")
        print(f"hie audit verify: cannot read the checkpoints ({source}): {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    try:
        report = asyncio.run(verify_against(database_url, schema, checkpoints, public))
    except Exception as exc:
        print(
            f"hie audit verify: cannot read {redact_url(database_url)}: {type(exc).__name__}",
            file=sys.stderr,
        )
        raise typer.Exit(2) from None
    for finding in report.findings:
        print(f"hie audit verify: {finding}", file=sys.stderr)
    if not report.ok:
        raise typer.Exit(1)
    print(report.summary())


@audit_app.command("checkpoints")
def audit_checkpoints(
    nats_url: Annotated[str, typer.Option(help="the NATS (JetStream) that keeps the checkpoints")],
    hub: Annotated[str, typer.Option(help="the hub's slug")],
    stream: Annotated[str, typer.Option(help="the stream that keeps the checkpoints")] = "HIE_AUDIT",
) -> None:
    """Print a hub's signed audit checkpoints as JSON lines (a copy for `verify --checkpoints-file`)."""
    from hie_hub.audit.verify import read_from_nats

    try:
        checkpoints = asyncio.run(read_from_nats(nats_url, hub, stream))
    except Exception as exc:
        print(f"hie audit checkpoints: cannot read {redact_url(nats_url)}: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    for checkpoint in checkpoints:
        print(checkpoint.model_dump_json())


if __name__ == "__main__":
    app()
