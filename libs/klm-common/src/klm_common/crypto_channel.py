"""Request/reply for usage operations: ``klm.crypto.requests`` → keygen → a reply topic.

Each channel (one per :class:`~klm_common.client.KlmClient`) owns a reply topic
``<prefix>klm.crypto.replies.<client id>`` that it creates on start (1 partition) and
deletes on stop, so no client reads another's replies (which carry plaintexts and
unwrapped data keys: in production, an ACL gives each client's principal its own reply
topic). Replies are matched to requests by ``correlationid``; a reply nobody waits for any
more (a redelivery, a timed-out call) is dropped. FastStream's ``broker.request()`` only
works under its test broker, hence this small reply path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import uuid
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from klm_common.authorization import tenant_request_topic
from klm_common.envelope import CloudEvent, new_id, now, parse_envelope
from klm_common.errors import KlmError
from klm_common.events import REPLY_TOPIC_BASE, CryptoReply, EventData
from klm_common.kafka import kafka_security
from klm_common.settings import KlmSettings
from klm_common.topics import CRYPTO_REQUESTS, Topics


class CryptoOperationError(KlmError):
    """Keygen refused the operation; ``code`` is the reply's code (``usage_not_permitted``,
    ``key_not_active``, ``forbidden``, ``key_not_found``, ``decryption_failed``, …)."""

    def __init__(self, reply: CryptoReply) -> None:
        super().__init__(reply.message or reply.code or "refused", key_id=reply.key_id)
        self.code = reply.code or "refused"  # type: ignore[misc]  # the reply's code
        self.reply = reply


class CryptoTimeout(KlmError):
    code = "timeout"


@dataclass(frozen=True, slots=True)
class Signature:
    key_id: str
    version: int
    algorithm: str
    signature: bytes
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Ciphertext:
    """The ciphertext envelope: which key and version sealed it, and how."""

    key_id: str
    version: int
    algorithm: str
    ciphertext: bytes
    nonce: bytes | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """Output of a process operation (decrypt, unwrap) and the version that did it."""

    data: bytes
    key_id: str
    version: int
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Mac:
    key_id: str
    version: int
    algorithm: str
    mac: bytes


class CachedPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client) remembered
    per key: its pure-Python hash was ~7 % of a busy client's CPU (py-spy, bench/usage.py),
    and usage requests and replies repeat the same keys (a key id). Same partitions as the
    default, so per-key order is unchanged."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._known: dict[tuple[bytes, tuple[int, ...]], int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int],
                 available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        where = (key, tuple(all_partitions))
        found = self._known.get(where)
        if found is None:
            if len(self._known) >= self._size:
                self._known.clear()
            found = self._known[where] = int(DefaultPartitioner()(key, all_partitions,
                                                                  available))
        return found


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


class CryptoChannel:
    """Sends ``klm.crypto.*`` requests and awaits their replies on its own topic."""

    def __init__(self, settings: KlmSettings, source: str, timeout: float,
                 tenant: str | None = None) -> None:
        """``tenant``: requests go to ``klm.crypto.requests.<tenant>`` and replies come to
        ``klm.crypto.replies.<tenant>-…`` — the topics a tenant's Kafka login may use on the
        secured stack; None: the operators' shared ``klm.crypto.requests``."""
        self._settings = settings
        self._topics = Topics(settings.topic_prefix)
        self._source = source
        self.timeout = timeout
        self._request_topic = (tenant_request_topic(self._topics, tenant, CRYPTO_REQUESTS)
                               if tenant else self._topics.crypto_requests)
        name = tenant or re.sub(r"[^A-Za-z0-9_-]", "-", source)[:60]
        self.reply_topic = (f"{settings.topic_prefix}{REPLY_TOPIC_BASE}"
                            f"{name}-{uuid.uuid4().hex[:12]}")
        # many concurrent calls share one producer: big batches keep the idempotent
        # producer (one request in flight per partition) from queueing behind a 16 KiB batch
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                          enable_idempotence=True, acks="all", linger_ms=0,
                                          max_batch_size=1024 * 1024,
                                          partitioner=CachedPartitioner(),
                                          **kafka_security(settings))
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                          enable_auto_commit=False, fetch_max_wait_ms=20,
                                          **kafka_security(settings))
        self._waiters: dict[str, asyncio.Future[CryptoReply]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._admin(create=True)
        await self._producer.start()
        await self._consumer.start()
        tp = TopicPartition(self.reply_topic, 0)
        self._consumer.assign([tp])
        await self._consumer.seek_to_beginning(tp)  # a fresh topic: nothing missed
        await self._consumer.position(tp)
        self._listener = asyncio.create_task(self._listen(), name="klm-crypto-replies")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._consumer.stop()
        await self._producer.stop()
        with contextlib.suppress(KafkaError, OSError):
            await self._admin(create=False)

    async def _admin(self, *, create: bool) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._settings.kafka_bootstrap,
                                    **kafka_security(self._settings))
        await admin.start()
        try:
            if create:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(self.reply_topic, 1, 1)])
            else:
                await admin.delete_topics([self.reply_topic])
        finally:
            await admin.close()

    async def _listen(self) -> None:
        """Replies are read in batches (one wake-up per fetch, not per record)."""
        while True:
            fetched = await self._consumer.getmany(timeout_ms=1000)
            for records in fetched.values():
                for record in records:
                    self._answer(record.value)

    def _answer(self, value: bytes | None) -> None:
        try:
            event = parse_envelope(value)
            reply = CryptoReply.model_validate(event.data)
        except (KlmError, ValueError):
            return
        waiter = self._waiters.pop(event.correlationid or "", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    async def call(self, data: EventData, timeout: float | None = None) -> CryptoReply:
        """Send one request and return its reply; raise if it was refused or timed out."""
        # the payload is a validated model: build the envelope without validating it again
        # (make_event would; this runs once per operation)
        event = CloudEvent.model_construct(
            id=new_id(), source=self._source, type=data.event_type, time=now(),
            subject=getattr(data, "key_id", None),
            data=data.model_dump(mode="json", exclude_none=True))
        waiter: asyncio.Future[CryptoReply] = asyncio.get_running_loop().create_future()
        self._waiters[event.id] = waiter
        limit = timeout or self.timeout
        try:
            await self._producer.send_and_wait(self._request_topic, event.to_bytes(),
                                               key=event.partition_key)
            reply = await asyncio.wait_for(waiter, limit)
        except TimeoutError:
            raise CryptoTimeout(f"no reply to {event.type} {event.id} within {limit:.1f}s "
                                "(is keygen running?)") from None
        finally:
            self._waiters.pop(event.id, None)
        if not reply.ok:
            raise CryptoOperationError(reply)
        return reply
