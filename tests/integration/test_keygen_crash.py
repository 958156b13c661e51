"""A keygen killed with SIGKILL in the middle of 2,000 requests loses nothing and doubles
nothing: after the restart every request has exactly one answer, the keystore holds one key
per accepted request, and no hsm-resident object is left without its keystore row."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute

from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from klm_keygen.adapters.hsm import object_id
from klm_keygen.adapters.hsm_lifecycle import RESIDENT_LABEL
from klm_keygen.domain.generation import key_id_for
from tests.integration.harness import EventLog
from tests.integration.test_keygen_skeleton import admin_fetch, generate_request, send

pytestmark = pytest.mark.asyncio(loop_scope="session")

REQUESTS = 2000
#: every RESIDENT_EVERY-th request asks for an hsm-resident key (persistent token objects)
RESIDENT_EVERY = 20


def resident_objects_on_token(env: dict[str, str]) -> Counter[bytes]:
    """How many resident-key objects each CKA_ID has on the session's token."""
    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
    lib = pkcs11.lib(env["KLM_HSM_MODULE"])
    lib.reinitialize()
    token = lib.get_token(token_label=env["KLM_HSM_TOKEN_LABEL"])
    with token.open(user_pin=Path(env["KLM_HSM_PIN_FILE"]).read_text().strip()) as session:
        return Counter(bytes(o[Attribute.ID])
                       for o in session.get_objects({Attribute.TOKEN: True})
                       if RESIDENT_LABEL.match(o[Attribute.LABEL] or ""))


async def test_kill_during_batch_then_restart(start_service: Any, klm_env: dict[str, str],
                                              settings: KlmSettings, topics: Topics,
                                              lifecycle: EventLog) -> None:
    keygen = start_service("keygen")
    requests = [generate_request(name=f"crash-{i}", algorithm="EC-P-256",
                                 protection="hsm-resident" if i % RESIDENT_EVERY == 0
                                 else "hsm-wrapped")
                for i in range(REQUESTS)]
    ids = {r.id for r in requests}
    await send(settings, topics, *requests)
    # kill as soon as some (not all) answers are out
    await lifecycle.wait_for(lambda e: e.correlationid in ids, count=20, timeout=120)
    keygen.kill()
    answered_before = len(lifecycle.matching(lambda e: e.correlationid in ids))
    assert answered_before < REQUESTS, "keygen finished before it could be killed"

    keygen.start()
    try:
        await lifecycle.wait_for(lambda e: e.correlationid in ids, count=REQUESTS, timeout=300)
        await asyncio.sleep(3.0)  # anything doubled would show up now
    finally:
        keygen.terminate()
    answers = lifecycle.matching(lambda e: e.correlationid in ids)
    # exactly one answer per request: the outbox may re-send an answer it published just
    # before the kill (at-least-once), but a re-sent answer carries the SAME event id, so a
    # consumer's inbox sees one answer; a second decision would have a different id
    distinct: dict[str, set[str]] = {}
    for answer in answers:
        distinct.setdefault(answer.correlationid or "", set()).add(answer.id)
    assert set(distinct) == ids
    doubled = {k: v for k, v in distinct.items() if len(v) > 1}
    assert not doubled, f"{len(doubled)} requests got two different answers"
    unique = list({a.id: a for a in answers}.values())
    print(f"\n{REQUESTS} requests; answered before the kill: {answered_before}; "
          f"answers re-sent by the outbox after the restart: {len(answers) - len(unique)}")
    answers = unique
    accepted = [a for a in answers if a.type == "klm.key.generated"]
    rows = await admin_fetch(settings, "SELECT count(*) AS n FROM keygen.keys "
                             "WHERE request_id = ANY($1)", list(ids))
    assert rows[0]["n"] == len(accepted) == REQUESTS
    # one key pair per resident request on the token: an object made before the kill but
    # never committed would be a second pair under the same CKA_ID (the sweep destroys those)
    expected = {object_id(key_id_for(r.id), 1) for r in requests
                if r.data["protection"] == "hsm-resident"}
    resident = await admin_fetch(
        settings, "SELECT v.hsm_object_id FROM keygen.key_versions v JOIN keygen.keys k "
        "USING (key_id) WHERE k.request_id = ANY($1) AND v.hsm_object_id IS NOT NULL",
        list(ids))
    assert {bytes(r["hsm_object_id"]) for r in resident} == expected
    on_token = resident_objects_on_token(klm_env)
    assert {oid: on_token.get(oid, 0) for oid in expected} == dict.fromkeys(expected, 2)
