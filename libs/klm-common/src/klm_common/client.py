"""KlmClient: the Python SDK other systems use to ask KLM for keys.

It publishes a request to ``klm.requests`` and awaits its one answer on ``klm.lifecycle``
(matched by ``correlationid`` = the request's ``id``)::

    async with KlmClient(KlmSettings(), source="billing") as klm:
        fact = await klm.generate_key(owner="billing", name="invoices", algorithm="AES-256")
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from klm_common.envelope import CloudEvent, make_event, parse_envelope
from klm_common.errors import KlmError
from klm_common.events import EventData, GenerateKey, RequestRejected
from klm_common.settings import KlmSettings
from klm_common.topics import Topics


class RequestRejectedError(KlmError):
    """KLM answered ``klm.request.rejected``; ``code`` is the rejection's code."""

    def __init__(self, answer: CloudEvent) -> None:
        data = RequestRejected.model_validate(answer.data)
        super().__init__(data.message, **data.details)
        self.code = data.code  # type: ignore[misc]  # instance code of the rejection
        self.answer = answer


class AnswerTimeout(KlmError):
    code = "timeout"


class KlmClient:
    def __init__(self, settings: KlmSettings, source: str = "klm/client",
                 timeout: float = 30.0) -> None:
        self._settings = settings
        self._topics = Topics(settings.topic_prefix)
        self._source = source
        self._timeout = timeout
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                          enable_idempotence=True, acks="all")
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                          enable_auto_commit=False)
        self._waiters: dict[str, asyncio.Future[CloudEvent]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KlmClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]
                        ) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self._topics.lifecycle)
        if not parts:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self._topics.lifecycle) or set()
        assigned = [TopicPartition(self._topics.lifecycle, p) for p in parts]
        self._consumer.assign(assigned)
        await self._consumer.seek_to_end(*assigned)
        for tp in assigned:  # resolve positions now, so no answer slips past us
            await self._consumer.position(tp)
        self._listener = asyncio.create_task(self._listen(), name="klm-client-answers")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._consumer.stop()
        await self._producer.stop()

    async def _listen(self) -> None:
        async for record in self._consumer:
            try:
                event = parse_envelope(record.value)
            except KlmError:
                continue
            waiter = self._waiters.pop(event.correlationid or "", None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    async def request(self, data: EventData, *, subject: str | None = None,
                      event_id: str | None = None) -> CloudEvent:
        """Publish a request and return its answer (raise if it was rejected)."""
        event = make_event(data.event_type, data, source=self._source, subject=subject,
                           event_id=event_id)
        answer = await self.send_and_wait(event)
        if answer.type == RequestRejected.event_type:
            raise RequestRejectedError(answer)
        return answer

    async def send_and_wait(self, event: CloudEvent) -> CloudEvent:
        waiter: asyncio.Future[CloudEvent] = asyncio.get_running_loop().create_future()
        self._waiters[event.id] = waiter
        await self._producer.send_and_wait(self._topics.requests, event.to_bytes(),
                                           key=event.partition_key)
        try:
            return await asyncio.wait_for(waiter, self._timeout)
        except TimeoutError:
            raise AnswerTimeout(f"no answer to {event.type} {event.id} "
                                f"within {self._timeout:.0f}s") from None
        finally:
            self._waiters.pop(event.id, None)

    async def generate_key(self, *, owner: str, name: str, algorithm: str,
                           **fields: Any) -> CloudEvent:
        """Ask for a new key; returns the ``klm.key.generated`` fact."""
        return await self.request(GenerateKey(owner=owner, name=name, algorithm=algorithm,
                                              **fields))
