"""KlmClient: the Python SDK other systems use to ask KLM for keys.

It publishes a request to ``klm.requests`` and awaits its one answer on ``klm.lifecycle``
(matched by ``correlationid`` = the request's ``id``)::

    async with KlmClient(KlmSettings(), source="billing") as klm:
        fact = await klm.generate_key(owner="billing", name="invoices", algorithm="AES-256")

Usage operations (``sign``, ``verify``, ``encrypt``, ``decrypt``, ``mac``, ``verify_mac``,
``wrap``, ``unwrap``) go over ``klm.crypto.requests`` and are answered on this client's own
reply topic (see :mod:`klm_common.crypto_channel`), opened on the first such call::

        sealed = await klm.encrypt(key_id, b"secret", aad=b"invoice-42", owner="billing")
        opened = await klm.decrypt(sealed, aad=b"invoice-42", owner="billing")
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from klm_common.authorization import tenant_request_topic
from klm_common.crypto_channel import (
    Ciphertext,
    CryptoChannel,
    Mac,
    Opened,
    Signature,
    b64,
    unb64,
)
from klm_common.envelope import CloudEvent, make_event, parse_envelope
from klm_common.errors import KlmError
from klm_common.events import (
    CryptoDecrypt,
    CryptoEncrypt,
    CryptoMac,
    CryptoMacVerify,
    CryptoSign,
    CryptoUnwrap,
    CryptoVerify,
    CryptoWrap,
    EventData,
    GenerateKey,
    RequestRejected,
)
from klm_common.kafka import kafka_security
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
                 timeout: float = 30.0, tenant: str | None = None) -> None:
        """``tenant``: send requests to ``klm.requests.<tenant>`` and usage operations to
        ``klm.crypto.requests.<tenant>`` — the only request topics a tenant's Kafka login
        may write on the secured stack (docs/security.md)."""
        self._settings = settings
        self._tenant = tenant
        self._topics = Topics(settings.topic_prefix)
        self._source = source
        self._request_topic = (tenant_request_topic(self._topics, tenant) if tenant
                               else self._topics.requests)
        self._timeout = timeout
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                          enable_idempotence=True, acks="all",
                                          **kafka_security(settings))
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                          enable_auto_commit=False,
                                          **kafka_security(settings))
        self._waiters: dict[str, asyncio.Future[CloudEvent]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._crypto: CryptoChannel | None = None
        self._crypto_lock = asyncio.Lock()

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
        if self._crypto is not None:
            await self._crypto.stop()
            self._crypto = None
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
        await self._producer.send_and_wait(self._request_topic, event.to_bytes(),
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

    # ---- usage operations (klm.crypto.requests → this client's reply topic) -----------------
    async def crypto(self) -> CryptoChannel:
        """The usage channel, started on first use (its reply topic is created then)."""
        async with self._crypto_lock:
            if self._crypto is None:
                channel = CryptoChannel(self._settings, self._source, self._timeout,
                                        self._tenant)
                await channel.start()
                self._crypto = channel
            return self._crypto

    async def sign(self, key_id: str, data: bytes, *, owner: str, hash: str | None = None,
                   scheme: str | None = None, timeout: float | None = None) -> Signature:
        """Sign with the key's primary version (ECDSA → DER, Ed25519, RSA-PSS/PKCS#1 v1.5)."""
        channel = await self.crypto()
        reply = await channel.call(CryptoSign(
            key_id=key_id, owner=owner, reply_to=channel.reply_topic, data_b64=b64(data),
            hash=hash, scheme=scheme), timeout)
        return Signature(key_id, reply.version or 0, reply.algorithm or "",
                         unb64(reply.signature_b64), reply.warning)

    async def verify(self, key_id: str, data: bytes, signature: bytes | Signature, *,
                     owner: str, version: int | None = None, hash: str | None = None,
                     scheme: str | None = None, timeout: float | None = None) -> bool:
        """True if ``signature`` is valid (inside the HSM); the version defaults to the one
        the :class:`Signature` names, else the primary."""
        if isinstance(signature, Signature):
            version, signature = version or signature.version, signature.signature
        channel = await self.crypto()
        reply = await channel.call(CryptoVerify(
            key_id=key_id, owner=owner, reply_to=channel.reply_topic, data_b64=b64(data),
            signature_b64=b64(signature), version=version, hash=hash, scheme=scheme),
            timeout)
        return bool(reply.valid)

    async def encrypt(self, key_id: str, plaintext: bytes, *, owner: str,
                      aad: bytes | None = None, timeout: float | None = None) -> Ciphertext:
        """AES-GCM (AES keys; ``aad`` is bound to the ciphertext) or RSA-OAEP-SHA256."""
        channel = await self.crypto()
        reply = await channel.call(CryptoEncrypt(
            key_id=key_id, owner=owner, reply_to=channel.reply_topic,
            plaintext_b64=b64(plaintext), aad_b64=b64(aad) if aad is not None else None),
            timeout)
        return Ciphertext(key_id, reply.version or 0, reply.algorithm or "",
                          unb64(reply.ciphertext_b64),
                          unb64(reply.nonce_b64) if reply.nonce_b64 else None)

    async def decrypt(self, ciphertext: Ciphertext, *, owner: str, aad: bytes | None = None,
                      timeout: float | None = None) -> Opened:
        """Open a :class:`Ciphertext` with the version it names."""
        channel = await self.crypto()
        reply = await channel.call(CryptoDecrypt(
            key_id=ciphertext.key_id, owner=owner, reply_to=channel.reply_topic,
            version=ciphertext.version, ciphertext_b64=b64(ciphertext.ciphertext),
            nonce_b64=b64(ciphertext.nonce) if ciphertext.nonce is not None else None,
            aad_b64=b64(aad) if aad is not None else None), timeout)
        return Opened(unb64(reply.plaintext_b64), ciphertext.key_id, reply.version or 0,
                      reply.warning)

    async def mac(self, key_id: str, data: bytes, *, owner: str,
                  timeout: float | None = None) -> Mac:
        channel = await self.crypto()
        reply = await channel.call(CryptoMac(key_id=key_id, owner=owner,
                                             reply_to=channel.reply_topic,
                                             data_b64=b64(data)), timeout)
        return Mac(key_id, reply.version or 0, reply.algorithm or "", unb64(reply.mac_b64))

    async def verify_mac(self, key_id: str, data: bytes, mac: bytes | Mac, *, owner: str,
                         version: int | None = None, timeout: float | None = None) -> bool:
        if isinstance(mac, Mac):
            version, mac = version or mac.version, mac.mac
        channel = await self.crypto()
        reply = await channel.call(CryptoMacVerify(
            key_id=key_id, owner=owner, reply_to=channel.reply_topic, data_b64=b64(data),
            mac_b64=b64(mac), version=version), timeout)
        return bool(reply.valid)

    async def wrap(self, key_id: str, key_material: bytes, *, owner: str,
                   timeout: float | None = None) -> Ciphertext:
        """Wrap a data key under an AES key with AES-KWP (RFC 5649)."""
        channel = await self.crypto()
        reply = await channel.call(CryptoWrap(key_id=key_id, owner=owner,
                                              reply_to=channel.reply_topic,
                                              key_b64=b64(key_material)), timeout)
        return Ciphertext(key_id, reply.version or 0, reply.algorithm or "",
                          unb64(reply.wrapped_b64))

    async def unwrap(self, wrapped: Ciphertext, *, owner: str,
                     timeout: float | None = None) -> Opened:
        channel = await self.crypto()
        reply = await channel.call(CryptoUnwrap(
            key_id=wrapped.key_id, owner=owner, reply_to=channel.reply_topic,
            wrapped_b64=b64(wrapped.ciphertext), version=wrapped.version), timeout)
        return Opened(unb64(reply.key_b64), wrapped.key_id, reply.version or 0, reply.warning)
