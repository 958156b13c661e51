"""``klm.command.sign_checkpoint``: keygen signs the audit chain head (audit has no HSM).

Audit sends the command on ``klm.commands`` every N events or T seconds; keygen signs
``checkpoint_message(sequence, head_hash, time)`` with the HSM-resident checkpoint key and
answers one ``klm.audit.checkpoint`` on ``klm.lifecycle`` through the outbox, in the same
transaction as the inbox claim (a redelivered command is answered once). Its own consumer
group, so the other readers of ``klm.commands`` keep getting every record; other command
types are left to them. A malformed command goes to the DLQ.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from aiokafka import ConsumerRecord

from klm_common import inbox
from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import InfrastructureError, KlmError, StoreUnavailable
from klm_common.events import AuditCheckpoint, SignCheckpoint, checkpoint_message, parse_data
from klm_common.kafka import DeadLetters, split_batch, subscriber_options
from klm_common.outbox import add_to_outbox
from klm_keygen.adapters.hsm_checkpoint import ALGORITHM, CheckpointSignature, sign_checkpoints
from klm_keygen.domain.generation import answer_id

if TYPE_CHECKING:
    from klm_keygen.adapters.hsm import Pkcs11Hsm
    from klm_keygen.bootstrap import Keygen

log = logging.getLogger(__name__)
GROUP_ID = "klm-keygen-checkpoints"
SOURCE = "klm/keygen"


@dataclass
class CheckpointDeps:
    hsm: Pkcs11Hsm
    pool: asyncpg.Pool
    lifecycle_topic: str
    dead_letters: DeadLetters
    on_commit: Callable[[], None] = lambda: None
    retry_delay: float = 1.0


def register(keygen: Keygen) -> None:
    """Subscribe the checkpoint signer to ``klm.commands`` under its own group."""
    deps = CheckpointDeps(hsm=keygen.hsm, pool=keygen.pool,
                          lifecycle_topic=keygen.topics.lifecycle,
                          dead_letters=DeadLetters(keygen.broker, keygen.topics,
                                                   "keygen-checkpoints"),
                          on_commit=keygen.relay.wake)

    @keygen.broker.subscriber(keygen.topics.commands,
                              **subscriber_options(keygen.settings, GROUP_ID))
    async def on_sign_checkpoint(records: list[Any]) -> None:
        await handle_checkpoint_batch(records, deps)


async def handle_checkpoint_batch(records: Sequence[ConsumerRecord[bytes, bytes]],
                                  deps: CheckpointDeps) -> None:
    """Raise (batch redelivered) when the HSM or Postgres is not there."""
    try:
        await _handle(records, deps)
    except InfrastructureError as exc:
        log.warning("checkpoint batch not served (%s); it will be redelivered", exc)
        await asyncio.sleep(deps.retry_delay)
        raise


async def _handle(records: Sequence[ConsumerRecord[bytes, bytes]],
                  deps: CheckpointDeps) -> None:
    mine = [r for r in records if _is_sign_command(r)]
    if not mine:
        return
    commands: dict[str, tuple[CloudEvent, SignCheckpoint]] = {}
    letters = []
    for item in await split_batch(mine, deps.dead_letters):
        if item.event.type != SignCheckpoint.event_type:
            continue
        try:
            data = parse_data(item.event)
        except KlmError as exc:
            letters.append(deps.dead_letters.letter(item.record, exc.message))
            continue
        assert isinstance(data, SignCheckpoint)
        commands.setdefault(item.event.id, (item.event, data))
    await deps.dead_letters.publish(letters)
    await _sign_and_answer(list(commands.values()), deps)


def _is_sign_command(record: ConsumerRecord[bytes, bytes]) -> bool:
    """Cheap pre-filter on the raw bytes; the envelope is parsed for the ones that match."""
    return record.value is not None and SignCheckpoint.event_type.encode() in record.value


async def _sign_and_answer(commands: list[tuple[CloudEvent, SignCheckpoint]],
                           deps: CheckpointDeps) -> None:
    try:
        done = await inbox.already_processed(deps.pool, [c.id for c, _ in commands])
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
    fresh = [(c, d) for c, d in commands if c.id not in done]
    if not fresh:
        return
    messages = [checkpoint_message(d.sequence, d.head_hash, d.time) for _, d in fresh]
    signatures = await deps.hsm.run(sign_checkpoints, messages)
    answers = {c.id: _checkpoint(c, d, s) for (c, d), s in zip(fresh, signatures, strict=True)}
    try:
        async with deps.pool.acquire() as conn, conn.transaction():
            claimed = await inbox.claim(conn, list(answers))
            await add_to_outbox(conn, deps.lifecycle_topic,
                                [a for cid, a in answers.items() if cid in claimed])
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
    deps.on_commit()
    log.info("signed %d audit checkpoint(s), up to sequence %d", len(claimed),
             max(d.sequence for _, d in fresh))


def _checkpoint(command: CloudEvent, data: SignCheckpoint,
                signed: CheckpointSignature) -> CloudEvent:
    fact = AuditCheckpoint(
        sequence=data.sequence, head_hash=data.head_hash, time=data.time,
        signature=base64.b64encode(signed.signature_der).decode(),
        signing_key_id=signed.key_id, algorithm=ALGORITHM,
        public_key=base64.b64encode(signed.public_key_der).decode())
    return make_event(AuditCheckpoint.event_type, fact, source=SOURCE, cause=command,
                      event_id=answer_id(command.id, "checkpoint"))
