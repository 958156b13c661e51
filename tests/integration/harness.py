"""Helpers for integration tests: service processes, an event log of a topic, probes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from klm_common.envelope import CloudEvent, EnvelopeInvalid, parse_envelope
from klm_common.kafka import ensure_topics, kafka_security
from klm_common.settings import KlmSettings

SERVICE_PORT_ENV = {"keygen": "KLM_KEYGEN_PORT", "rotation": "KLM_ROTATION_PORT",
                    "backup": "KLM_BACKUP_PORT", "audit": "KLM_AUDIT_PORT"}


def local_stack_env(repo: Path) -> dict[str, str]:
    """What ``infra/stack.sh env`` exports (empty if the script cannot answer)."""
    try:
        out = subprocess.run([str(repo / "infra" / "stack.sh"), "env"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    env = {}
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export "):].split("=", 1)
            env[name] = value.strip("'\"")
    return env


def kafka_reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",", maxsplit=1)[0].rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=3):
            return True
    except OSError:
        return False


def pg_reachable(dsn: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """A KLM service started as its own process (``klm-<name>``), as in production."""

    def __init__(self, name: str, repo: Path, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.repo = repo
        self.port = free_port()
        self.env = {**os.environ, **env, SERVICE_PORT_ENV[name]: str(self.port)}
        if self.env.get("KLM_KAFKA_SECURITY") == "sasl":  # each service its own principal
            self.env.setdefault("KLM_KAFKA_USERNAME", name)
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(self.repo / ".venv" / "bin" / f"klm-{self.name}")],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()  # a service that never got ready must not outlive its test
                raise

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n" + self.log_tail())

    def log_tail(self, lines: int = 15, width: int = 400) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(line[:width] for line in tail)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no last commit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.terminate()
        self.start()


STACK = Path(__file__).resolve().parents[2] / "infra" / "stack.sh"


async def open_topics(settings: KlmSettings) -> None:
    """The Kafka side of a namespace of one's own (a test module's, a benchmark's), as the
    stack's admin: on the secured stack the service principals' ACLs for its topic prefix
    (``infra/stack.sh kafka-acls``, as production names got theirs at ``make up``), then its
    topics (services may not create topics)."""
    if settings.kafka_security == "sasl":
        done = await asyncio.to_thread(
            subprocess.run, [str(STACK), "kafka-acls", settings.topic_prefix],
            capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"infra/stack.sh kafka-acls {settings.topic_prefix} failed:\n"
                               f"{done.stdout}{done.stderr}")
    await ensure_topics(settings)


async def close_topics(settings: KlmSettings) -> None:
    """Undo :func:`open_topics` when the namespace is dropped: delete the topics under its
    prefix and, on the secured stack, every ACL on a name under it (sub-namespaces such as
    ``<prefix>usage.`` included). Best effort: a stack already gone (the chaos tests) only
    leaves them behind, with a warning."""
    prefix = settings.topic_prefix
    if not prefix or "klm.".startswith(prefix) or prefix.startswith("klm."):
        raise ValueError(f"not a namespace prefix: {prefix!r}")
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                    **kafka_security(settings))
        await admin.start()
        try:
            ours = [t for t in await admin.list_topics() if t.startswith(prefix)]
            if ours:
                await admin.delete_topics(ours)
        finally:
            await admin.close()
    except (KafkaError, OSError) as exc:
        warnings.warn(f"topics under {prefix!r} left behind: {exc}", stacklevel=2)
    if settings.kafka_security == "sasl":
        done = await asyncio.to_thread(
            subprocess.run, [str(STACK), "kafka-drop-acls", prefix],
            capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            warnings.warn(f"ACLs under {prefix!r} left behind: {done.stderr.strip()[-300:]}",
                          stacklevel=2)


def stack_login() -> dict[str, Any]:
    """The Kafka login for the stack in the environment (``infra/stack.sh env``): admin on
    the secured stack, nothing on a PLAINTEXT one. Clients of another instance (the chaos
    tests' own Kafka) pass their own login, ``{}`` for none."""
    return kafka_security(KlmSettings())


class EventLog:
    """Reads a topic from the beginning into memory; tests wait for events in it."""

    def __init__(self, bootstrap: str, topic: str, security: dict[str, Any] | None = None
                 ) -> None:
        """``security``: the Kafka login (``klm_common.kafka.kafka_security``); None: the
        stack's (:func:`stack_login`)."""
        self.topic = topic
        self.events: list[CloudEvent] = []
        self.garbage = 0
        self._changed = asyncio.Condition()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest",
                                          **(stack_login() if security is None else security))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer._client.force_metadata_update()
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _read(self) -> None:
        async for record in self._consumer:
            try:
                event = parse_envelope(record.value)
            except EnvelopeInvalid:
                self.garbage += 1
                continue
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def matching(self, predicate: Callable[[CloudEvent], bool]) -> list[CloudEvent]:
        return [e for e in self.events if predicate(e)]

    async def wait_for(self, predicate: Callable[[CloudEvent], bool], count: int = 1,
                       timeout: float = 60.0) -> list[CloudEvent]:
        async def enough() -> list[CloudEvent]:
            async with self._changed:
                while len(found := self.matching(predicate)) < count:
                    await self._changed.wait()
                return found

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            got = len(self.matching(predicate))
            raise AssertionError(f"{self.topic}: {got} of {count} events after {timeout}s") \
                from None

    def answers_to(self, request_id: str) -> list[CloudEvent]:
        return self.matching(lambda e: e.correlationid == request_id)


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    """One more topic (e.g. a tenant's request topic, made before the services start so
    that their pattern subscriptions see it at once), as the stack's admin."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **stack_login())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions,
                                            replication_factor=1)])
    finally:
        await admin.close()


async def publish(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]],
                  security: dict[str, Any] | None = None) -> None:
    """Publish raw ``(key, value)`` records and wait until Kafka has them all (``security``
    as for :class:`EventLog`)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True,
                                acks="all", linger_ms=5,
                                **(stack_login() if security is None else security))
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def wycheproof_dir(repo: Path) -> Path:
    """The external Wycheproof vectors, read in place (never copied into the repo):
    ``KLM_WYCHEPROOF_DIR``, else ``shared/`` beside the checkout (as CI lays it out)."""
    if os.environ.get("KLM_WYCHEPROOF_DIR"):
        return Path(os.environ["KLM_WYCHEPROOF_DIR"])
    for shared in (repo.parent / "shared", Path("/work/shared")):
        if (shared / "vectors" / "wycheproof").is_dir():
            return shared / "vectors" / "wycheproof"
    return repo.parent / "shared" / "vectors" / "wycheproof"
