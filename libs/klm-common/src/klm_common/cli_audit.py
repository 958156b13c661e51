"""``klm keys``, ``klm history KEY``, ``klm verify``, ``klm report compliance|cbom``:
the audit API's reads for people (rich tables) and scripts (``--json``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from klm_common.audit_client import AuditApiError, AuditClient

console = Console(emoji=False, highlight=False)
Json = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _run(call: Any) -> Any:
    async def go() -> Any:
        async with AuditClient() as client:
            result = call(client)
            return await result if isinstance(result, Awaitable) else result

    try:
        return asyncio.run(go())
    except AuditApiError as exc:
        console.print(f"[red]audit:[/red] {exc}")
        raise typer.Exit(2) from None


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def keys(state: Annotated[str | None, typer.Option()] = None,
         algorithm: Annotated[str | None, typer.Option()] = None,
         owner: Annotated[str | None, typer.Option()] = None, as_json: Json = False) -> None:
    """The key inventory: state, algorithm, size, usages, age, findings."""
    rows = _run(lambda c: c.keys(state=state, algorithm=algorithm, owner=owner))
    if as_json:
        _dump(rows)
        return
    table = Table(title=f"{len(rows)} key(s)")
    table.add_column("key id", no_wrap=True)
    for column in ("owner", "name", "algorithm", "state", "ver", "age (d)", "findings"):
        table.add_column(column)
    for k in rows:
        size = k.get("curve") or k.get("size") or ""
        table.add_row(*map(_text, (
            k["key_id"], k["owner"], k.get("name"), f"{k.get('algorithm')}-{size}")),
            _state(k["state"]), _text(k.get("primary_version")),
            f"{k['age_days']:.1f}" if k.get("age_days") is not None else "",
            _text(", ".join(f["code"] for f in k.get("findings", []))))
    console.print(table)


def history(key_id: str, as_json: Json = False) -> None:
    """Every event of a key, in the audit log's order, with its chain hash."""
    events = _run(lambda c: c.history(key_id))
    if as_json:
        _dump(events)
        return
    table = Table(title=f"history of {escape(key_id)}")
    for column in ("seq", "time", "type", "source", "hash"):
        table.add_column(column)
    for e in events:
        table.add_row(*map(_text, (e["sequence"], e["time"], e["type"], e["source"],
                                   e["hash"][:16] + "…")))
    console.print(table)


def verify(as_json: Json = False) -> None:
    """Recompute the audit hash chain; exit 1 when it is broken."""
    result = _run(lambda c: c.verify())
    if as_json:
        _dump(result)
    elif result["ok"]:
        console.print(f"[green]chain intact[/green]: {result['checked']} events, head "
                      f"#{result['head_sequence']} {result['head_hash'][:16]}…")
    else:
        console.print(f"[red]chain broken at sequence {result['first_broken_sequence']}"
                      f"[/red]: {escape(str(result['reason']))}")
    if not result["ok"]:
        raise typer.Exit(1)


def report(kind: Annotated[str, typer.Argument(help="compliance or cbom")],
           csv: Annotated[bool, typer.Option("--csv", help="compliance as CSV")] = False,
           as_json: Json = False) -> None:
    """A compliance report (table, JSON or CSV) or the CycloneDX CBOM (JSON)."""
    if kind == "cbom":
        _dump(_run(lambda c: c.cbom()))
    elif kind == "compliance" and csv:
        print(_run(lambda c: c.compliance("csv")), end="")
    elif kind == "compliance":
        body = _run(lambda c: c.compliance("json"))
        if as_json:
            _dump(body)
        else:
            _compliance_table(body)
    else:
        console.print("[red]report must be compliance or cbom[/red]")
        raise typer.Exit(2)


def _compliance_table(body: dict[str, Any]) -> None:
    summary = body.get("summary", {})
    console.print(f"{summary.get('keys', 0)} keys, {summary.get('non_compliant', 0)} "
                  "non-compliant")
    table = Table(title="compliance")
    table.add_column("key id", no_wrap=True)
    for column in ("owner", "algorithm", "state", "compliant", "issues"):
        table.add_column(column)
    for k in body.get("keys", []):
        table.add_row(_text(k["key_id"]), _text(k["owner"]), _text(k.get("algorithm")),
                      _state(k["state"]),
                      "[green]yes[/green]" if k["compliant"] else "[red]no[/red]",
                      _text(", ".join(i["code"] for i in k.get("issues", []))))
    console.print(table)


def _text(value: object) -> str:
    """Data from the API is shown as text, never interpreted as rich markup."""
    return escape("" if value is None else str(value))


def _state(state: str) -> str:
    state = escape(state)
    colour = {"active": "green", "suspended": "yellow", "compromised": "red",
              "destroyed-compromised": "red"}.get(state)
    return f"[{colour}]{state}[/{colour}]" if colour else state


def register(app: typer.Typer) -> None:
    app.command("keys")(keys)
    app.command("history")(history)
    app.command("verify")(verify)
    app.command("report")(report)
