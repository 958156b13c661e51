"""Wiring: real adapters for the running service (unit tests wire fakes into ``Deps``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker

from klm_common.crypto_channel import CachedPartitioner
from klm_common.db import create_pool
from klm_common.kafka import DeadLetters, make_broker, make_producer
from klm_common.outbox import OutboxRelay
from klm_common.policy import PolicySet, load_policy_set
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from klm_keygen.adapters.certificate_requests import CertificateRequests
from klm_keygen.adapters.hsm import Pkcs11Hsm
from klm_keygen.adapters.keystore import PgKeystore
from klm_keygen.handlers.pipeline import PipelinedConsumer
from klm_keygen.handlers.requests import Deps


@dataclass
class Keygen:
    settings: KlmSettings
    topics: Topics
    broker: KafkaBroker
    producer: AIOKafkaProducer
    pool: asyncpg.Pool
    hsm: Pkcs11Hsm
    relay: OutboxRelay
    deps: Deps
    #: the hot topics' consumers (handlers/pipeline.py): started once the HSM is open,
    #: drained (answers in flight sent and committed) and stopped before the broker stops
    consumers: list[PipelinedConsumer] = field(default_factory=list)
    #: last words of the areas (e.g. the usage summary of the interval in progress), said
    #: once nothing is consumed any more, while Postgres and the outbox relay still run
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


async def bootstrap(settings: KlmSettings) -> Keygen:
    topics = Topics(settings.topic_prefix)
    # FastStream's "Received"/"Processed" lines per batch at DEBUG: at INFO they were ~6 %
    # of keygen's CPU serving one-request batches (py-spy, docs/benchmarks.md)
    broker = make_broker(settings, "klm-keygen", log_level=logging.DEBUG)
    # also sends usage replies, keyed by key id: the partition is hashed once per key
    producer = make_producer(settings, "klm-keygen-outbox", partitioner=CachedPartitioner())
    pool = await create_pool(settings, "keygen", reset=_keep_session)
    # the PIN is read at each (re)open: a corrected PIN file is picked up without a restart
    hsm = Pkcs11Hsm(settings.hsm_module, settings.hsm_token_label, settings.hsm_user_pin)
    relay = OutboxRelay(pool, producer, batch=settings.outbox_batch)
    policies = _policies()
    # the keystore hands its committed answers to the relay (published from memory, or
    # the relay woken for them): no wake-up per batch
    deps = Deps(hsm=hsm, keystore=PgKeystore(pool, topics.lifecycle, relay),
                dead_letters=DeadLetters(broker, topics, "keygen"),
                day_seconds=settings.day_seconds, policy=policies.default, policies=policies,
                csrs=CertificateRequests(hsm, pool))
    return Keygen(settings, topics, broker, producer, pool, hsm, relay, deps)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections go back without asyncpg's reset query (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL): one round trip per acquire — a batch acquires three times —
    for state keygen never leaves on them. Keygen works in transactions only: its settings
    are ``SET LOCAL``/``set_config(..., true)``, its advisory locks transaction-level, and
    it listens on a connection of its own (``usage_store.KeyCache``). asyncpg still rolls
    back a transaction left open before this is called."""
    del conn


def _policies() -> PolicySet:
    """The crypto policies rotation enforces, read at start: the default one
    (``KLM_POLICY_FILE``, else the shipped default), whose ``permissions`` say which tenant
    may request what, and the named ones of ``KLM_POLICY_DIR``, the names a new key may
    carry. Rotation reloads them live; keygen takes a new name after a restart."""
    path, directory = os.environ.get("KLM_POLICY_FILE"), os.environ.get("KLM_POLICY_DIR")
    return load_policy_set(Path(path) if path else None, Path(directory) if directory else None)
