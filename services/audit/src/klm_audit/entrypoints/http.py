"""The auditor HTTP API (DESIGN §6): reads, verification and reports, all behind tokens."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from klm_audit.bootstrap import Audit
from klm_audit.domain import reports
from klm_audit.domain.auth import Principal
from klm_audit.domain.inventory import KeyView, replay
from klm_audit.domain.queries import EventFilter, KeyFilter, Scope
from klm_audit.entrypoints.auth import (
    ApiError,
    admin,
    audit_of,
    deny,
    reader,
    scope_of,
    unscoped_reader,
)
from klm_audit.entrypoints.schemas import (
    CheckpointOut,
    EventsPage,
    HistoryOut,
    KeyOut,
    KeysPage,
    VerifyOut,
    events_json,
)
from klm_audit.projection import caught_up
from klm_audit.verification import verify_store

router = APIRouter(prefix="/v1")

#: printable text without NUL (Postgres text cannot hold U+0000), bounded
Text = Annotated[str | None, Query(max_length=256, pattern=r"^[^\x00]*$")]
KeyIdPath = Annotated[str, Path(max_length=256, pattern=r"^[^\x00]*$")]
Limit = Annotated[int, Query(ge=1, le=1000)]
_MAX_SEQUENCE = 2**63 - 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
Reader = Annotated[Principal, Depends(reader)]
UnscopedReader = Annotated[Principal, Depends(unscoped_reader)]
Admin = Annotated[Principal, Depends(admin)]


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
    if "\x00" in value:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
    return value


def _sequence_cursor(cursor: str | None) -> int:
    value = _decode_cursor(cursor)
    if value is None:
        return 0
    if not value.isdigit() or int(value) > _MAX_SEQUENCE:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
    return int(value)


async def _visible_key(request: Request, audit: Audit, key_id: str,
                       principal: Principal) -> None:
    """404 unless the key exists in the caller's scope; a cross-tenant probe is recorded."""
    await caught_up(audit.store)
    if await audit.store.key(key_id, scope_of(principal)) is not None:
        return
    if principal.tenant is not None and await audit.store.key(key_id, Scope()) is not None:
        raise deny(request, 404, "key_not_found", "no such key", principal=principal)
    raise ApiError(404, "key_not_found", "no such key")


@router.get("/keys/{key_id}/history", response_model=HistoryOut)
async def key_history(request: Request, key_id: KeyIdPath,
                      principal: Reader) -> Response:
    """The key's events, and the requests that caused them, in sequence order."""
    audit = audit_of(request)
    await caught_up(audit.store)
    entries = await audit.store.history(key_id, scope_of(principal))
    if not entries:
        await _visible_key(request, audit, key_id, principal)
    return Response(events_json(entries, key_id=key_id), media_type="application/json")


@router.get("/keys/{key_id}", response_model=KeyOut)
async def key_state(request: Request, key_id: KeyIdPath, *,
                    at: Annotated[datetime | None, Query()] = None,
                    principal: Reader) -> KeyOut:
    """The key now (inventory projection), or at ``at`` rebuilt by replaying its events."""
    audit = audit_of(request)
    await _visible_key(request, audit, key_id, principal)
    if at is None:
        view = await audit.store.key(key_id, scope_of(principal))
        assert view is not None
        return KeyOut.of(view)
    moment = _aware(at)
    assert moment is not None
    facts = [f for f in await audit.store.facts_of(key_id) if f.time <= moment]
    past = replay(facts)
    if past is None:
        raise ApiError(404, "key_not_found", "the key did not exist at that time")
    return KeyOut.of(past, as_of=moment)


@router.get("/keys", response_model=KeysPage)
async def keys(request: Request, *, state: Text = None, algorithm: Text = None,
               owner: Text = None, limit: Limit = 100, cursor: Text = None,
               principal: Reader) -> KeysPage:
    """Key inventory: state, algorithm, size, usages, age, policy findings."""
    filters = KeyFilter(state=state, algorithm=algorithm, owner=owner,
                        after_key_id=_decode_cursor(cursor), limit=limit)
    await caught_up(audit_of(request).store)
    views = await audit_of(request).store.keys(filters, scope_of(principal))
    now = datetime.now(UTC)
    next_cursor = _encode_cursor(views[-1].key_id) if len(views) == limit else None
    return KeysPage(keys=[KeyOut.of(v, now) for v in views], next_cursor=next_cursor)


@router.get("/events", response_model=EventsPage)
async def events(request: Request, *, type: Text = None, subject: Text = None,
                 actor: Text = None, since: datetime | None = None,
                 until: datetime | None = None, limit: Limit = 100, cursor: Text = None,
                 principal: Reader) -> Response:
    """Events in sequence order (stable); ``actor`` is the envelope's ``source``."""
    filters = EventFilter(type=type, subject=subject, source=actor, since=_aware(since),
                          until=_aware(until), after_sequence=_sequence_cursor(cursor),
                          limit=limit)
    await caught_up(audit_of(request).store)  # subject and tenant go through event_keys
    entries = await audit_of(request).store.events(filters, scope_of(principal))
    next_cursor = _encode_cursor(str(entries[-1].sequence)) if len(entries) == limit else None
    return Response(events_json(entries, next_cursor=next_cursor),
                    media_type="application/json")


@router.get("/audit/verify", response_model=VerifyOut)
async def verify(request: Request, _: UnscopedReader,
                 columns: Annotated[bool, Query()] = True,
                 trusted_key: Annotated[list[str] | None, Query(
                     max_length=16, description="SHA-256 (hex) of a checkpoint public key "
                     "to accept; repeatable. Without it any key is accepted and reported in "
                     "checkpoint_keys, for you to compare with the one you trust.")] = None,
                 ) -> VerifyOut:
    """Recompute the whole chain and check every signed checkpoint against it; name the
    first broken sequence and why.

    ``columns=false`` skips re-checking the indexed columns against each event (faster).
    """
    keys = frozenset(k.lower() for k in trusted_key or [] if _HEX64.fullmatch(k.lower()))
    if trusted_key and len(keys) != len(set(trusted_key)):
        raise ApiError(400, "invalid_trusted_key", "trusted_key must be 64 hex digits")
    result = await verify_store(audit_of(request).store, columns=columns, trusted_keys=keys)
    last = result.last_checkpoint
    return VerifyOut(ok=result.ok, checked=result.checked, head_sequence=result.head_sequence,
                     head_hash=result.head_hash.hex(),
                     first_broken_sequence=result.first_broken_sequence, reason=result.reason,
                     checkpoints_checked=result.checkpoints_checked,
                     checkpoint_keys=list(result.checkpoint_keys),
                     last_checkpoint=None if last is None else CheckpointOut.of(last))


async def _all_keys(audit: Audit, scope: Scope) -> list[KeyView]:
    await caught_up(audit.store)
    views: list[KeyView] = []
    while True:
        after = views[-1].key_id if views else None
        page = await audit.store.keys(KeyFilter(after_key_id=after, limit=1000), scope)
        views += page
        if len(page) < 1000:
            return views


@router.get("/reports/compliance", response_model=None,
            responses={200: {"content": {"text/csv": {}}}})
async def compliance_report(request: Request, principal: Reader, *,
                            format: Annotated[Literal["json", "csv"], Query()] = "json",
                            cryptoperiod_days: Annotated[int, Query(ge=1, le=36500)] = 365,
                            ) -> Response:
    """Per key: algorithm approval, cryptoperiod, compromise, overdue destruction, findings."""
    views = await _all_keys(audit_of(request), scope_of(principal))
    report = reports.compliance(views, datetime.now(UTC), cryptoperiod_days)
    if format == "csv":
        return PlainTextResponse(reports.compliance_csv(report), media_type="text/csv",
                                 headers={"Content-Disposition":
                                          'attachment; filename="klm-compliance.csv"'})
    return JSONResponse(jsonable_encoder(report))


@router.get("/reports/cbom")
async def cbom_report(request: Request, principal: Reader) -> JSONResponse:
    """The key inventory as a CycloneDX 1.6 CBOM (cryptographic-asset components)."""
    views = await _all_keys(audit_of(request), scope_of(principal))
    return JSONResponse(reports.cbom(views, datetime.now(UTC), request.app.version),
                        media_type="application/vnd.cyclonedx+json")


@router.post("/admin/projections/rebuild")
async def rebuild(request: Request, _: Admin) -> JSONResponse:
    """Drop the read models and replay the whole log into them."""
    count = await audit_of(request).store.rebuild_projections()
    return JSONResponse({"keys": count})
