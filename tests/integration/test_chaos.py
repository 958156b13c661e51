"""Faults survived: a sustained run of mixed requests while every service is killed with
SIGKILL in turn, the Kafka broker and PostgreSQL are restarted and the HSM token goes away
and comes back — on a Kafka + PostgreSQL + SoftHSM instance of this module's OWN
(``infra/stack.sh`` under a temporary ``KLM_HOME`` on free ports), so restarting them
disturbs no one.

After recovery: every accepted request (acknowledged by Kafka) has exactly one answer;
keys in the keystore = keys announced; audit rows = lifecycle events and the hash chain
verifies; no key material in the clear in the logs, topics or tables (raw bytes of test
keys, exported only here by unwrapping them on the token, searched for in every file of
the instance: Kafka segments, PostgreSQL heap and WAL, service logs).

Short by default (``make test``); ``KLM_CHAOS_REQUESTS=5000`` (``make chaos``) for the long
run. Figures are printed and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from klm_common.db import create_pool
from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey, ReactivateKey, RotateKey, SuspendKey
from klm_common.topics import Topics
from tests.chaos.instance import Namespace, StackInstance, create_namespace, drop_namespace
from tests.integration.harness import EventLog, ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              # minutes, not the suite's default: the long run sends 5,000 requests
              pytest.mark.timeout(int(os.environ.get("KLM_CHAOS_TIMEOUT", "3600")))]

REPO = Path(__file__).resolve().parents[2]
REQUESTS = int(os.environ.get("KLM_CHAOS_REQUESTS", "400"))
#: requests per second: the faults must fall inside the run, not after it
RATE = float(os.environ.get("KLM_CHAOS_RATE", "5"))
SERVICES = ("keygen", "audit", "rotation", "backup")
ANSWER_TIMEOUT = float(os.environ.get("KLM_CHAOS_ANSWER_TIMEOUT", "420"))


@pytest.fixture(scope="module")
def chaos_stack(endpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[StackInstance]:
    instance = StackInstance(tmp_path_factory.mktemp("klm-chaos"))
    try:
        instance.up("kafka", "postgres", "hsm")
    except (RuntimeError, OSError) as exc:
        instance.stack("reset")
        pytest.fail(f"chaos stack did not start: {exc}", pytrace=False)
    yield instance
    instance.stack("reset")  # stops this instance's Kafka and Postgres, deletes its data


@pytest.fixture(scope="module")
def chaos_ns(chaos_stack: StackInstance, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Namespace]:
    env = chaos_stack.env()
    ns = asyncio.run(create_namespace(
        f"chaos{uuid.uuid4().hex[:8]}", admin_dsn=env["KLM_PG_ADMIN_DSN"],
        kafka_bootstrap=chaos_stack.bootstrap, klm_home=str(chaos_stack.home),
        hsm_module=env["KLM_HSM_MODULE"], softhsm_conf=env["SOFTHSM2_CONF"],
        token_dir=tmp_path_factory.mktemp("chaos-token"),
        # its broker's mode, whatever the shared stack's (the environment may say sasl)
        kafka_env={"KLM_KAFKA_SECURITY": chaos_stack.security}))
    yield ns
    with contextlib.suppress(OSError):
        asyncio.run(drop_namespace(ns))


@dataclass
class Load:
    """Mixed requests, each re-sent (same id) until Kafka acknowledged it."""

    bootstrap: str
    topic: str
    keys: Callable[[], list[str]]
    accepted: dict[str, CloudEvent] = field(default_factory=dict)
    send_failures: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(9))

    def next_request(self) -> CloudEvent:
        known = self.keys()
        roll = self.rng.random()
        if known and roll < 0.15:
            data: Any = RotateKey(key_id=self.rng.choice(known))
        elif known and roll < 0.2:
            data = SuspendKey(key_id=self.rng.choice(known))
        elif known and roll < 0.25:
            data = ReactivateKey(key_id=self.rng.choice(known))
        elif roll < 0.32:  # answered with a rejection
            data = GenerateKey(owner="chaos", name="bad", algorithm="DES", size=56)
        else:
            algorithm, extra = self.rng.choice([("AES-256", {}), ("AES-128", {}),
                                                ("EC", {"curve": "P-256"}),
                                                ("HMAC-SHA-256", {})])
            data = GenerateKey(owner="chaos", name=f"k{len(self.accepted)}",
                               algorithm=algorithm, **extra)
        self.kinds[data.event_type.rsplit(".", 1)[-1]] += 1
        return make_event(data.event_type, data, source="tests/chaos",
                          subject=getattr(data, "key_id", None))

    async def run(self, total: int, window: int = 20) -> None:
        producer = await self._producer()
        try:
            while len(self.accepted) < total:
                batch = [self.next_request() for _ in range(min(window,
                                                                 total - len(self.accepted)))]
                began = time.monotonic()
                producer = await self._send(producer, batch)
                await asyncio.sleep(max(0.0, len(batch) / RATE - (time.monotonic() - began)))
        finally:
            await producer.stop()

    async def _producer(self) -> AIOKafkaProducer:
        while True:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                        enable_idempotence=True, request_timeout_ms=8000,
                                        retry_backoff_ms=300)
            try:
                await asyncio.wait_for(producer.start(), 20)
                return producer
            except (KafkaError, OSError, TimeoutError):
                self.send_failures += 1
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(1)

    async def _send(self, producer: AIOKafkaProducer, batch: list[CloudEvent]
                    ) -> AIOKafkaProducer:
        pending = batch
        while pending:
            results = await asyncio.gather(*(self._send_one(producer, e) for e in pending),
                                           return_exceptions=True)
            failed = [e for e, r in zip(pending, results, strict=True)
                      if isinstance(r, BaseException)]
            for event, result in zip(pending, results, strict=True):
                if not isinstance(result, BaseException):
                    self.accepted[event.id] = event
            if failed:
                self.send_failures += len(failed)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 15)
                await asyncio.sleep(1)
                producer = await self._producer()
            pending = failed
        return producer

    async def _send_one(self, producer: AIOKafkaProducer, event: CloudEvent) -> None:
        await asyncio.wait_for(producer.send_and_wait(self.topic, event.to_bytes(),
                                                      key=event.partition_key), 30)


def start(name: str, ns: Namespace, logs: Path) -> ServiceProcess:
    proc = ServiceProcess(name, REPO, ns.env, logs)
    proc.start(wait=False)
    return proc


@dataclass
class Supervisor:
    """What systemd or Kubernetes does in production: a service process that exited (e.g.
    one that cannot reach Kafka at start-up while the broker restarts) is started again."""

    procs: dict[str, ServiceProcess]
    restarts: Counter[str] = field(default_factory=Counter)
    running: bool = True
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.watch())

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            await self.task

    async def watch(self) -> None:
        while self.running:
            for name, proc in self.procs.items():
                if proc.proc is not None and proc.proc.poll() is not None:
                    self.restarts[name] += 1
                    proc.start(wait=False)
            await asyncio.sleep(1)


async def wait_ready(proc: ServiceProcess) -> None:
    await asyncio.to_thread(proc.wait_ready, 180.0)


async def all_ready(procs: dict[str, ServiceProcess], timeout: float = 300) -> None:
    """Every service answers /readyz (the supervisor restarts those that exit meanwhile)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            waiting = []
            for name, proc in procs.items():
                try:
                    ok = (await http.get(f"{proc.url}/readyz")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    waiting.append(name)
            if not waiting:
                return
            assert time.monotonic() < deadline, f"not ready after {timeout}s: {waiting}"
            await asyncio.sleep(1)


async def faults(stack: StackInstance, procs: dict[str, ServiceProcess], load: Load,
                 total: int, log: list[str]) -> None:
    """The fault schedule, driven by how far the load got."""
    async def at(fraction: float) -> None:
        while len(load.accepted) < fraction * total:  # noqa: ASYNC110 - polls the load
            await asyncio.sleep(0.2)

    for i, name in enumerate(SERVICES):
        await at(0.08 + 0.1 * i)
        procs[name].kill()  # the supervisor starts it again
        log.append(f"kill -9 {name} at {len(load.accepted)} accepted")
    await at(0.5)
    await asyncio.to_thread(stack.stack, "down", "kafka")
    log.append(f"Kafka broker stopped at {len(load.accepted)} accepted")
    await asyncio.sleep(3)
    await asyncio.to_thread(stack.stack, "up", "kafka")
    log.append("Kafka broker restarted")
    await at(0.65)
    await asyncio.to_thread(stack.stack, "down", "postgres")
    log.append(f"PostgreSQL stopped at {len(load.accepted)} accepted")
    await asyncio.sleep(3)
    await asyncio.to_thread(stack.stack, "up", "postgres")
    log.append("PostgreSQL restarted")
    await at(0.8)
    tokens = stack.home / "hsm" / "tokens"
    away = stack.home / "hsm" / "tokens.away"
    tokens.rename(away)
    log.append(f"HSM token directory removed at {len(load.accepted)} accepted")
    procs["keygen"].kill()  # the running session would keep its objects in memory
    await asyncio.sleep(8)
    if tokens.exists():
        shutil.rmtree(tokens)  # SoftHSM may recreate an empty directory
    away.rename(tokens)
    log.append("HSM token back")


def answers_by_request(lifecycle: EventLog, ids: set[str]) -> dict[str, dict[str, str]]:
    """request id → {answer event id: type}: the events the request itself caused (later
    facts of the same correlation, e.g. the backup service's klm.key.backed_up, are not
    answers). A redelivered copy of an answer has the same event id and counts once."""
    out: dict[str, dict[str, str]] = {}
    for event in lifecycle.events:
        if event.causationid in ids and event.correlationid == event.causationid:
            out.setdefault(event.causationid, {})[event.id] = event.type
    return out


def answered_twice(answer: dict[str, str]) -> bool:
    """Two answers of one type, or a rejection next to a fact."""
    kinds = Counter(answer.values())
    return any(n > 1 for n in kinds.values()) or \
        ("klm.request.rejected" in kinds and len(kinds) > 1)


async def all_topic_bytes(bootstrap: str, topics: list[str]) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    values: list[bytes] = []
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(t, p) for t in topics
               for p in consumer.partitions_for_topic(t) or set()]
        assert tps, "no topic partitions to search"
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            values += [(r.value or b"") + b"|" + (r.key or b"")
                       for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return values


EXPORT = """
import json, sys, pkcs11
module, label, pin_file = sys.argv[1:4]
blobs = [bytes.fromhex(h) for h in json.load(sys.stdin)]
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(user_pin=open(pin_file).read().strip()) as session:
    kek = session.get_key(label="klm-master-kek", key_type=pkcs11.KeyType.AES,
                          object_class=pkcs11.ObjectClass.SECRET_KEY)
    out = []
    for blob in blobs:
        key = kek.unwrap_key(pkcs11.ObjectClass.SECRET_KEY, pkcs11.KeyType.AES, blob,
                             mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD, store=False,
                             template={pkcs11.Attribute.EXTRACTABLE: True,
                                       pkcs11.Attribute.SENSITIVE: False})
        out.append(bytes(key[pkcs11.Attribute.VALUE]).hex())
json.dump(out, sys.stdout)
"""


def export_secret_keys(ns: Namespace, wrapped: list[bytes]) -> list[bytes]:
    """TEST-ONLY scratch export: unwrap a few AES versions on the token as extractable, to
    learn their raw bytes (keygen itself never does this). In a child process, because
    SoftHSM reads its configuration (this instance's token directory) once per process."""
    env = {**os.environ, "SOFTHSM2_CONF": ns.env["SOFTHSM2_CONF"]}
    done = subprocess.run(
        [sys.executable, "-c", EXPORT, ns.env["KLM_HSM_MODULE"],
         ns.env["KLM_HSM_TOKEN_LABEL"], ns.env["KLM_HSM_PIN_FILE"]],
        input=json.dumps([w.hex() for w in wrapped]), capture_output=True, text=True,
        env=env, check=True, timeout=120)
    return [bytes.fromhex(h) for h in json.loads(done.stdout)]


def forms(raw: bytes) -> list[bytes]:
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
            base64.urlsafe_b64encode(raw).rstrip(b"=")]


def files_containing(folder: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                hits += [str(path) for n in needles if n in data]
    return hits


async def test_sustained_load_survives_every_fault(chaos_stack: StackInstance,
                                                   chaos_ns: Namespace,
                                                   tmp_path_factory: pytest.TempPathFactory
                                                   ) -> None:
    topics = Topics(chaos_ns.env["KLM_TOPIC_PREFIX"])
    logs = tmp_path_factory.mktemp("chaos-logs")
    procs = {name: start(name, chaos_ns, logs) for name in SERVICES}
    lifecycle = EventLog(chaos_stack.bootstrap, topics.lifecycle, {})
    supervisor = Supervisor(procs)
    try:
        await asyncio.gather(*(wait_ready(p) for p in procs.values()))
        await lifecycle.start()

        def known_keys() -> list[str]:
            return [e.subject for e in lifecycle.events[-2000:]
                    if e.type == "klm.key.generated" and e.subject]

        load = Load(chaos_stack.bootstrap, topics.requests, known_keys)
        fault_log: list[str] = []
        supervisor.start()
        started = time.monotonic()
        await asyncio.gather(load.run(REQUESTS),
                             faults(chaos_stack, procs, load, REQUESTS, fault_log))
        sent_for = time.monotonic() - started
        await all_ready(procs)

        ids = set(load.accepted)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while (len(answers_by_request(lifecycle, ids)) < len(ids)  # noqa: ASYNC110
               and time.monotonic() < deadline):
            await asyncio.sleep(1)
        answers = answers_by_request(lifecycle, ids)
        lost = len(ids) - len(answers)
        doubled = sum(1 for a in answers.values() if answered_twice(a))
        copies = sum(n - 1 for n in Counter(e.id for e in lifecycle.events).values())
        outcomes = Counter(e.type if e.type != "klm.request.rejected"
                           else f"rejected:{(e.data or {}).get('code')}"
                           for e in lifecycle.events
                           if e.causationid in ids and e.correlationid == e.causationid)
        print(f"\nchaos: {len(ids)} requests accepted in {sent_for:.0f}s "
              f"({dict(load.kinds)}), {load.send_failures} sends retried; faults: "
              + "; ".join(fault_log))
        print(f"chaos: lost {lost}, answered twice {doubled}, redelivered copies of "
              f"answers (same event id) {copies}; outcomes {dict(outcomes)}; "
              f"process restarts by the supervisor {dict(supervisor.restarts)}")
        assert lost == 0, f"{lost} accepted requests never answered"
        assert doubled == 0, f"{doubled} requests answered twice"

        await check_keystore_and_audit(chaos_ns, lifecycle, procs)
    finally:
        await supervisor.stop()
        for proc in procs.values():
            proc.terminate()
        await lifecycle.stop()
    await check_no_material_in_clear(chaos_stack, chaos_ns, topics, logs)


async def check_keystore_and_audit(ns: Namespace, lifecycle: EventLog,
                                   procs: dict[str, ServiceProcess]) -> None:
    from klm_audit.adapters.postgres_store import PostgresAuditStore
    from klm_audit.verification import verify_store

    settings = ns.settings()
    announced = {e.subject for e in lifecycle.events if e.type == "klm.key.generated"}
    keygen_pool = await create_pool(settings, "keygen")
    audit_pool = await create_pool(settings, "audit")
    try:
        stored = await keygen_pool.fetchval("SELECT count(*) FROM keys")
        print(f"chaos: keys in keystore {stored}, keys announced {len(announced)}")
        assert stored == len(announced)
        lifecycle_ids = {e.id for e in lifecycle.events}
        deadline = time.monotonic() + 180
        while True:  # the audit service catches up after its restart
            rows = await audit_pool.fetchval(
                "SELECT count(*) FROM audit_log WHERE topic = $1", lifecycle.topic)
            if rows >= len(lifecycle_ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        distinct = await audit_pool.fetchval(
            "SELECT count(DISTINCT event_id) FROM audit_log WHERE topic = $1", lifecycle.topic)
        verification = await verify_store(PostgresAuditStore(audit_pool))
        print(f"chaos: audit rows for klm.lifecycle {rows} (distinct {distinct}), lifecycle "
              f"events {len(lifecycle_ids)}; chain verified {verification.ok} over "
              f"{verification.checked} rows")
        assert rows == distinct == len(lifecycle_ids)
        assert verification.ok, verification.reason
    finally:
        await keygen_pool.close()
        await audit_pool.close()
    assert all(p.proc is not None and p.proc.poll() is None for p in procs.values())


async def check_no_material_in_clear(stack: StackInstance, ns: Namespace, topics: Topics,
                                     logs: Path) -> None:
    settings = ns.settings()
    pool = await create_pool(settings, "keygen")
    try:
        rows = await pool.fetch(
            "SELECT v.wrapped FROM key_versions v JOIN keys k USING (key_id) "
            "WHERE k.algorithm LIKE 'AES%' AND v.wrapped IS NOT NULL LIMIT 20")
    finally:
        await pool.close()
    raws = await asyncio.to_thread(export_secret_keys, ns, [bytes(r["wrapped"]) for r in rows])
    assert raws, "no AES key to look for"
    needles = [f for raw in raws for f in forms(raw)]
    control = logs / "positive-control"  # the search does find a key that IS there
    control.mkdir()
    (control / "planted").write_bytes(b"x" + base64.b64encode(raws[0]) + b"y")
    assert files_containing(control, needles)
    shutil.rmtree(control)
    topic_hits = [v for v in await all_topic_bytes(stack.bootstrap, list(topics.all()))
                  if any(n in v for n in needles)]
    file_hits = files_containing(stack.home, needles) + files_containing(logs, needles)
    pg_data = (stack.home / "pg").resolve()
    file_hits += files_containing(pg_data, needles)
    print(f"chaos: raw bytes of {len(raws)} exported test keys searched in every topic, "
          f"Kafka segment, PostgreSQL heap/WAL file and service log: {len(topic_hits)} "
          f"topic hits, {len(file_hits)} file hits")
    assert not topic_hits and not file_hits, file_hits[:5]

