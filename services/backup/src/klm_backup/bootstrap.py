"""Wiring: real adapters for the running backup service."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker
from pydantic_settings import BaseSettings, SettingsConfigDict

from klm_backup.adapters.store import PgBackupStore
from klm_backup.adapters.tag_key import load_tag_key
from klm_backup.handlers import Deps
from klm_common.db import create_pool
from klm_common.kafka import DeadLetters, make_broker, make_producer
from klm_common.outbox import OutboxRelay
from klm_common.policy import load_policy
from klm_common.settings import KlmSettings
from klm_common.topics import Topics


class BackupSettings(BaseSettings):
    """The backup service's own knobs (``KLM_BACKUP_`` prefix)."""

    model_config = SettingsConfigDict(env_prefix="KLM_BACKUP_", extra="ignore")

    #: seconds between scheduled restore drills; 0 turns the schedule off
    drill_interval: float = 86400.0
    #: how many backups a drill unwraps
    drill_sample: int = 20


@dataclass
class Backup:
    settings: KlmSettings
    backup_settings: BackupSettings
    topics: Topics
    broker: KafkaBroker
    producer: AIOKafkaProducer
    pool: asyncpg.Pool
    relay: OutboxRelay
    deps: Deps


async def bootstrap(settings: KlmSettings) -> Backup:
    topics = Topics(settings.topic_prefix)
    broker = make_broker(settings, "klm-backup")
    producer = make_producer(settings, "klm-backup-outbox")
    pool = await create_pool(settings, "backup")
    relay = OutboxRelay(pool, producer, batch=settings.outbox_batch)
    # the default crypto policy's `permissions`: what a tenant may request (read at start)
    policy_file = os.environ.get("KLM_POLICY_FILE")
    deps = Deps(store=PgBackupStore(pool), topics=topics,
                tag_key=load_tag_key(settings.secrets_dir),
                dead_letters=DeadLetters(broker, topics, "backup"), on_commit=relay.wake,
                policy=load_policy(Path(policy_file) if policy_file else None))
    return Backup(settings, BackupSettings(), topics, broker, producer, pool, relay, deps)
