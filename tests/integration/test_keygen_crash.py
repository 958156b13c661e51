"""A keygen killed with SIGKILL in the middle of a batch loses nothing and doubles nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import EventLog
from tests.integration.test_keygen_skeleton import admin_fetch, generate_request, send

pytestmark = pytest.mark.asyncio(loop_scope="session")

REQUESTS = 600


async def test_kill_during_batch_then_restart(start_service: Any, settings: KlmSettings,
                                              topics: Topics, lifecycle: EventLog) -> None:
    keygen = start_service("keygen")
    requests = [generate_request(name=f"crash-{i}", algorithm="EC-P-256")
                for i in range(REQUESTS)]
    ids = {r.id for r in requests}
    await send(settings, topics, *requests)
    # kill as soon as some (not all) answers are out
    await lifecycle.wait_for(lambda e: e.correlationid in ids, count=20, timeout=120)
    keygen.kill()
    answered_before = len(lifecycle.matching(lambda e: e.correlationid in ids))
    assert answered_before < REQUESTS, "keygen finished before it could be killed"

    keygen.start()
    await lifecycle.wait_for(lambda e: e.correlationid in ids, count=REQUESTS, timeout=240)
    await asyncio.sleep(3.0)  # anything doubled would show up now
    answers = lifecycle.matching(lambda e: e.correlationid in ids)
    per_request: dict[str, int] = {}
    for answer in answers:
        per_request[answer.correlationid or ""] = per_request.get(answer.correlationid or "",
                                                                  0) + 1
    assert set(per_request) == ids
    doubled = {k: n for k, n in per_request.items() if n > 1}
    # an answer re-sent by the outbox after the crash carries the same event id
    distinct = {(a.correlationid, a.id) for a in answers}
    assert len(distinct) == REQUESTS, doubled
    rows = await admin_fetch(settings, "SELECT count(*) AS n FROM keygen.keys "
                             "WHERE request_id = ANY($1)", list(ids))
    assert rows[0]["n"] == REQUESTS
