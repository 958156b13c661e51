"""Idempotent inbox: a consumer records each event id it processed in the same transaction
as the effect, so a redelivered event is a no-op.

Every consuming service's migrations create::

    CREATE TABLE inbox (event_id text PRIMARY KEY,
                        processed_at timestamptz NOT NULL DEFAULT now());
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

#: record the ids of the ``{ids}`` text[] parameter; the new ones are returned (also a CTE
#: of larger statements: keygen's ``adapters/keystore.py`` ``_SAVE_NEW``)
CLAIM = ("INSERT INTO inbox (event_id) SELECT unnest({ids}::text[]) "
         "ON CONFLICT (event_id) DO NOTHING RETURNING event_id")


async def already_processed(conn: asyncpg.Connection | asyncpg.Pool,
                            event_ids: Sequence[str]) -> set[str]:
    """The ids among ``event_ids`` that were processed before (a cheap pre-check)."""
    if not event_ids:
        return set()
    rows = await conn.fetch("SELECT event_id FROM inbox WHERE event_id = ANY($1::text[])",
                            list(event_ids))
    return {r["event_id"] for r in rows}


async def claim(conn: asyncpg.Connection, event_ids: Sequence[str]) -> set[str]:
    """Record ``event_ids`` as processed in the caller's transaction; return the new ones.

    An id another transaction committed meanwhile is not returned: its effect is not
    applied a second time.
    """
    if not event_ids:
        return set()
    rows = await conn.fetch(CLAIM.format(ids="$1"), list(event_ids))
    return {r["event_id"] for r in rows}
