"""The ``klm`` command line: operate a local KLM (migrate, topics, demo) and ask it things."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from klm_common import cli_audit, cli_ceremony
from klm_common.client import KlmClient, RequestRejectedError
from klm_common.contract import export
from klm_common.db import SERVICES, provision
from klm_common.kafka import ensure_topics
from klm_common.settings import KlmSettings

app = typer.Typer(help="KLM — key lifecycle management", no_args_is_help=True)
db_app = typer.Typer(help="Postgres roles, schemas and migrations")
topics_app = typer.Typer(help="Kafka topics")
app.add_typer(db_app, name="db")
app.add_typer(topics_app, name="topics")
console = Console(emoji=False, highlight=False)  # key ids contain ":key:"


@db_app.command("migrate")
def db_migrate() -> None:
    """Create each service's role and schema and apply pending migrations (idempotent)."""
    asyncio.run(provision(KlmSettings()))
    console.print(f"postgres: migrated {', '.join(SERVICES)}")


@topics_app.command("ensure")
def topics_ensure() -> None:
    """Create the KLM topics with their partition counts (idempotent)."""
    asyncio.run(ensure_topics(KlmSettings()))
    console.print("kafka: topics ready")


schemas_app = typer.Typer(help="the public contract: JSON Schemas and AsyncAPI")
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("export")
def schemas_export(folder: Path = Path("docs/contract")) -> None:
    """Write docs/contract/asyncapi.json and one JSON Schema per event type."""
    written = export(folder)
    console.print(f"wrote {len(written)} files under {folder}")


@app.command()
def generate(
    owner: Annotated[str, typer.Option(help="tenant that owns the key")],
    name: Annotated[str, typer.Option(help="human name of the key")],
    algorithm: Annotated[str, typer.Option(help="AES-256, EC-P-256, RSA-3072, Ed25519, …")],
    usage: Annotated[list[str] | None, typer.Option(help="usage (repeat)")] = None,
    protection: str = "hsm-wrapped",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask KLM for a new key and print the answer."""
    async def run() -> None:
        async with KlmClient(KlmSettings(), source="klm/cli") as klm:
            try:
                fact = await klm.generate_key(owner=owner, name=name, algorithm=algorithm,
                                              usages=usage, protection=protection)
            except RequestRejectedError as exc:
                console.print(f"[red]rejected[/red] {exc.code}: {exc.message}")
                raise typer.Exit(1) from None
            if as_json:
                print(json.dumps(fact.to_jsonable(), indent=2))
            else:
                _print_fact(fact.type, fact.data)

    asyncio.run(run())


def _print_fact(type_: str, data: dict[str, object]) -> None:
    table = Table(title=type_, show_header=False)
    for field in ("key_id", "owner", "name", "algorithm", "size", "curve", "usages",
                  "protection", "state", "version", "fingerprint_sha256", "kcv"):
        if data.get(field) is not None:
            table.add_row(field, str(data[field]))
    console.print(table)


@app.command()
def demo() -> None:
    """Publish a few generate requests, show the answers and the audit history."""
    from klm_common.demo import run_demo

    asyncio.run(run_demo(console))


# people's read commands over the audit API: klm keys, klm history, klm verify, klm report
cli_audit.register(app)
# backup KEK custody (klm ceremony init/recover) and klm backup recover/drill
cli_ceremony.register(app)


def main() -> None:
    app()
