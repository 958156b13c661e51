"""Keygen benchmark: raw in-process SoftHSM generation rate next to keygen's end-to-end rate
through Kafka (request published → ``klm.key.generated`` consumed; the fact leaves the outbox
only after the keystore transaction committed), with p50/p99 latency at half the maximum
load, and the ratio pipeline/raw. Writes the "## Keygen" section of docs/benchmarks.md.

Runs against the local stack (``eval "$(infra/stack.sh env)"``) in its own namespace: a
topic prefix, a fresh database and a fresh SoftHSM token, with its own keygen process.

    .venv/bin/python bench/keygen.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pkcs11
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from benchlib import CpuMeter, KlmNamespace
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the integration harness starts services as processes

from tests.integration.harness import (  # noqa: E402
    ServiceProcess,
    stack_login,
)

from klm_common.envelope import make_event  # noqa: E402
from klm_common.events import GenerateKey  # noqa: E402
from klm_common.topics import Topics  # noqa: E402

ALGORITHMS = {"AES-256": {"algorithm": "AES-256"},
              "EC P-256": {"algorithm": "EC", "curve": "P-256"},
              "RSA-2048": {"algorithm": "RSA-2048"}}
P256_OID = "1.2.840.10045.3.1.7"


# ---- raw SoftHSM ----------------------------------------------------------------------------
def raw_rates(ns: KlmNamespace, seconds: float, windows: int = 3
              ) -> dict[str, tuple[float, float]]:
    """Per algorithm: (generate/s, generate+KWP-wrap/s) of session keys, one thread; the
    best of ``windows`` windows of ``seconds``, so that another process's burst on this
    shared machine does not pass for the HSM's limit (the ratio to it is then
    conservative)."""
    os.environ["SOFTHSM2_CONF"] = ns.env["SOFTHSM2_CONF"]
    lib = pkcs11.lib(ns.env["KLM_HSM_MODULE"])
    token = lib.get_token(token_label=ns.name)
    with token.open(rw=True, user_pin=Path(ns.env["KLM_HSM_PIN_FILE"]).read_text()) as session:
        kek = session.generate_key(KeyType.AES, 256, template={
            Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.EXTRACTABLE: False})
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(P256_OID)},
            local=True)
        makers = {
            "AES-256": lambda: session.generate_key(
                KeyType.AES, 256, template={Attribute.EXTRACTABLE: True,
                                            Attribute.SENSITIVE: True}),
            "EC P-256": lambda: params.generate_keypair(
                private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True})[1],
            "RSA-2048": lambda: session.generate_keypair(
                KeyType.RSA, 2048, private_template={Attribute.EXTRACTABLE: True,
                                                     Attribute.SENSITIVE: True})[1],
        }
        out = {}
        for name, make in makers.items():
            gen = max(_rate(make, seconds, lambda key: key.destroy())
                      for _ in range(windows))
            wrap = max(_rate(make, seconds, lambda key: (
                kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD), key.destroy()))
                for _ in range(windows))
            out[name] = (gen, wrap)
    return out


def _rate(make: Any, seconds: float, after: Any) -> float:
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        after(make())
        count += 1
    return count / elapsed


# ---- end to end through Kafka ---------------------------------------------------------------
class Answers:
    """Consumes klm.lifecycle from its end; records when each answer arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.arrived: dict[str, tuple[float, str]] = {}
        self.stamps: dict[str, tuple[float, float, float]] = {}
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=5, **stack_login())
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self._consumer.start()
        parts = await self._consumer._client.fetch_all_metadata()
        tps = [TopicPartition(self.topic, p) for p in parts.partitions_for_topic(self.topic)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for record in self._consumer:
            got = time.perf_counter()
            event = json.loads(record.value)
            corr = event.get("correlationid")
            if corr and corr not in self.arrived:
                self.arrived[corr] = (got, event["type"])
                # wall clock: when keygen made the key, when the relay produced the fact
                made = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                self.stamps[corr] = (made.timestamp(), record.timestamp / 1000, time.time())
                self._changed.set()

    async def wait(self, ids: set[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not ids <= self.arrived.keys():
            if time.perf_counter() > deadline:
                missing = len(ids - self.arrived.keys())
                raise TimeoutError(f"{missing} of {len(ids)} answers missing")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 1.0)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()


def request_bytes(fields: dict[str, Any], i: int) -> tuple[str, bytes]:
    ev = make_event(GenerateKey.event_type, {"owner": "bench", "name": f"b{i}", **fields},
                    source="bench")
    return ev.id, ev.to_bytes()


async def max_rate(producer: AIOKafkaProducer, answers: Answers, topic: str,
                   fields: dict[str, Any], n: int) -> float:
    """Publish ``n`` requests at once; keys per second until the last answer."""
    batch = [request_bytes(fields, i) for i in range(n)]
    start = time.perf_counter()
    for rid, value in batch:
        await producer.send(topic, value, key=rid.encode())
    await producer.flush()
    ids = {rid for rid, _ in batch}
    await answers.wait(ids, timeout=max(120.0, n / 2))
    _check_generated(answers, ids)
    return n / (max(answers.arrived[i][0] for i in ids) - start)


async def paced_latencies(producer: AIOKafkaProducer, answers: Answers, topic: str,
                          fields: dict[str, Any], rate: float, seconds: float
                          ) -> tuple[list[float], tuple[float, ...]]:
    """Publish at ``rate`` per second for ``seconds``: per-request latency in ms, and the
    median of each stage (publish → key made in keygen → fact produced by the outbox relay
    → fact consumed), from the fact's ``time`` and its Kafka record timestamp."""
    n = max(10, int(rate * seconds))
    batch = [request_bytes(fields, i) for i in range(n)]
    sent: dict[str, float] = {}
    wall: dict[str, float] = {}
    start = time.perf_counter()
    for i, (rid, value) in enumerate(batch):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[rid], wall[rid] = time.perf_counter(), time.time()
        await producer.send(topic, value, key=rid.encode())
    await answers.wait(set(sent), timeout=120.0)
    _check_generated(answers, set(sent))
    stages = [(answers.stamps[r][0] - wall[r], answers.stamps[r][1] - answers.stamps[r][0],
               answers.stamps[r][2] - answers.stamps[r][1]) for r in sent]
    medians = tuple(statistics.median(s) * 1000 for s in zip(*stages, strict=True))
    return [(answers.arrived[rid][0] - t) * 1000 for rid, t in sent.items()], medians


def _check_generated(answers: Answers, ids: set[str]) -> None:
    bad = {answers.arrived[i][1] for i in ids} - {"klm.key.generated"}
    if bad:
        raise RuntimeError(f"unexpected answers: {bad}")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


# ---- report ---------------------------------------------------------------------------------
def machine_facts() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "?")
    softhsm = subprocess.run(["softhsm2-util", "--version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    load = os.getloadavg()
    return [f"CPU: {cpu}, {os.cpu_count()} cores; RAM {int(mem) // 1024} MiB; "
            f"{platform.system()} {platform.release()}",
            f"Python {platform.python_version()}, python-pkcs11 "
            f"{_version('python-pkcs11')}, aiokafka {_version('aiokafka')}, "
            f"SoftHSM {softhsm}, Kafka 4.4 (single KRaft node), PostgreSQL local cluster",
            f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average at the end: "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on 2 cores (shared with other "
            "engineers' test runs and benchmarks: every process got a fraction of a core)"]


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


NOTES = [
    "Raw = one thread generating session keys in process with python-pkcs11, nothing else "
    "running in that process (the HSM's physical limit here; the best of three 1.5 s "
    "windows since 2026-11-28 19:35 UTC, before one 3 s window, which another process's "
    "burst could halve); *gen+wrap* adds the AES-KWP "
    "wrap under the master KEK that every hsm-wrapped key needs, so it is the ceiling of "
    "the pipeline. E2e = request published on `klm.requests` → batch consumed → per chunk "
    "of ≤128 requests one HSM call (generate + wrap) and one Postgres transaction (inbox + "
    "keys + versions + outbox, in one statement since 2026-11-28 21:35 UTC), the next chunk "
    "generated while one commits → the committed facts published from memory (their outbox "
    "rows deleted once Kafka has them, at most one delete per 20 ms; the relay publishes "
    "only what that misses) → `klm.key.generated` consumed (so the keystore row "
    "is committed). The maximum is a "
    "burst of *n* requests published at once (time to the last answer); latency is then "
    "measured with requests paced at half that rate for 10 s.",
    "",
    "Stages (medians, from the fact's `time` = when keygen had the key and its Kafka "
    "timestamp = when it was produced): *in→made* = Kafka to keygen, inbox pre-check, "
    "queueing, HSM; *→relayed* = keystore transaction, then the produce (from memory since "
    "2026-11-28 19:00 UTC; before, the relay's wake-up and read); *→consumed* = Kafka to "
    "the reader.",
]


ANALYSIS = [
    "Reading the figures: when the second table shows keygen getting a fraction of one core "
    "while the machine is busy, the rates and latencies measure CPU starvation, not the "
    "pipeline: keygen's own CPU cost per key (SoftHSM's work included) allows the one-core "
    "ceiling shown, and the raw figure is measured with nothing else running in its "
    "process. For EC P-256 the HSM work alone (gen+wrap) is most of that cost, so the "
    "ceiling is close to the gen+wrap rate, and the end-to-end maximum is close to the "
    "ceiling. Done for throughput: a batch is served in pipelined chunks (the HSM generates "
    "chunk i+1 while chunk i commits), one HSM call and one transaction per chunk; since "
    "2026-11-28 14:20 UTC the batches of `klm.requests` are pipelined too "
    "(`handlers/pipeline.py`, `KLM_REQUESTS_PIPELINE_DEPTH`, default 3): the next batch's "
    "keys are generated while the previous batch's transaction commits, transactions stay "
    "in order, offsets are committed only up to the batches that are durable, and a failed "
    "batch and those after it are rewound and delivered again; FastStream's per-batch log "
    "lines moved to DEBUG (they were ~6 % of keygen's CPU with one-request batches). Since "
    "2026-11-28 17:00 UTC keygen reads `klm.requests` with a plain aiokafka consumer "
    "(`PipelinedConsumer`: `getmany` waits for records, no FastStream middleware stack per "
    "batch), producers send without linger (aiokafka's 1-2 ms linger added 2-5 ms per hop), "
    "offsets are committed at most every 50 ms, and the other services' FastStream "
    "subscribers no longer poll every 5 ms (idle, the four services used ~30 % of a core "
    "doing that; now ~8 %).",
    "",
    "Latency at half the burst maximum: the burst is served in batches of up to 500, the "
    "paced load in small batches, whose fixed cost per batch (the HSM thread hop, the inbox "
    "pre-check, BEGIN…COMMIT with its WAL flush, the delete of the published rows, the "
    "Kafka requests) is paid by few keys — keygen's CPU per key at the paced load is about "
    "twice the burst's (last column) —; on this shared 2-core machine the paced rate is "
    "then close to what the CPU left to keygen allows, and requests queue (*in→made*). Not "
    "met, and why, "
    "measured: the whole machine's CPU per generated key (second table: keygen's own cost, "
    "SoftHSM included, and how busy the machine was) — Kafka, PostgreSQL, the reader and "
    "keygen share 2 cores, and the HSM's gen+wrap alone is a third to a half of keygen's "
    "cost.",
    "",
    "Since 2026-11-28 19:00 UTC (py-spy of keygen under the EC burst, then A/B runs under "
    "the bench lock): committed facts are published from memory after the keystore "
    "transaction commits (`OutboxRelay.claim`/`publish_committed`; the rows are still "
    "written in the transaction and deleted in one statement once Kafka acknowledged "
    "them; the relay publishes anything left behind with the same event ids) instead of "
    "waking the relay to read them back in its own transaction; new keys and their "
    "versions are inserted in one statement (was a look-up and two `executemany`); the "
    "public key PEM is base64-encoded from the SPKI rather than parsed back through "
    "`cryptography` per key; pool connections go back without asyncpg's reset query (a "
    "round trip per acquire). What remains per key is mostly SoftHSM (generate, wrap, "
    "reading the public point) and per-record Python spread thin (envelope parsing, the "
    "fact's pydantic model, uuid5 ids, per-record metrics, the Kafka produce).",
    "",
    "Since 2026-11-28 21:35 UTC: a chunk of new keys is saved in ONE statement "
    "(`adapters/keystore.py` `_SAVE_NEW`: inbox claim, keys, versions and outbox rows as "
    "data-modifying CTEs; BEGIN and COMMIT stay, because the outbox rows must not be "
    "visible to the relay before this process claimed them); the outbox deletes published "
    "rows at most every 20 ms; a new key's first version no longer sends a "
    "`klm_key_changed` notification (migration 004: no usage cache can hold the key yet; "
    "each one cost Postgres a notification and keygen an HSM-thread call to evict "
    "handles); keygen wraps with a session copy of the master KEK (SoftHSM re-reads a "
    "token object's file at every use: a wrap 165 → 128 µs in process). Counted with "
    "strace at 50 keys/s: Postgres round trips per key 7.2 → 5.0, notifications per key "
    "1 → 0, HSM-thread calls per batch 2 → 1. A/B at 100 keys/s paced (three alternating "
    "pairs, the earlier code from its commit's sources, 21:53-21:56 UTC): keygen CPU per "
    "key 6.24 / 6.24 / 7.08 ms → 6.02 / 5.79 / 5.98; Postgres 1.43 / 1.41 / 1.09 → "
    "1.33 / 1.32 / 1.37; Kafka 2.5-2.7 either way; p50 11-17 → 10-11 ms. The gain is "
    "small beside the machine's noise (the same code measured 549-803 keys/s in bursts "
    "within ten minutes).",
    "",
    "Where the paced latency goes (an instrumented run at 300 keys/s, 2026-11-28 21:50 "
    "UTC): keygen's event-loop thread used ~40 % of a core and its HSM thread ~40 %, so "
    "neither was saturated, yet the median request waited ~100 ms before its key was made. "
    "Per batch of 1-10 requests, the oldest record was 25-50 ms old when the batch started, "
    "the generation of its first chunk took 8-33 ms (a few keys are ~1 ms of HSM work), "
    "and its transaction took 3-9 ms (three round trips of ~0.3 ms each). Every step took "
    "several times its own work. The event loop turns ~35 times per request (strace: "
    "epoll_wait calls, most with a zero timeout, i.e. callbacks chained through futures, "
    "tasks and the thread hand-off), and the loop and the HSM thread take turns on the "
    "GIL. A shorter GIL switch interval (`sys.setswitchinterval` 0.5 ms instead of 5 ms) "
    "gave no clear difference in three alternating pairs, so it was not kept. The whole "
    "machine's CPU per key at 100 keys/s was about 10 ms: keygen ~6, the Kafka broker ~2.6 "
    "(four to five requests per key), PostgreSQL ~1.3.",
]


def verdict(rows: list[Any]) -> list[str]:
    """Issue 3's targets, checked against this run's EC P-256 figures."""
    ec = next((r for r in rows if r[0] == "EC P-256"), None)
    if ec is None:
        return []
    _, gen, wrap, _, e2e, _load, lat, _ = ec
    p99 = percentile(lat, 99)
    return [f"Targets (issue 3), EC P-256: e2e ≥ 50 % of raw — **{e2e / gen:.0%}** "
            f"({'met' if e2e >= gen / 2 else 'missed'}; {e2e / wrap:.0%} of gen+wrap); "
            f"p99 ≤ 25 ms at half load — **{p99:.0f} ms** "
            f"({'met' if p99 <= 25 else 'missed'})."]


def write_section(table: list[str], facts: list[str], command: str,
                  rows: list[Any]) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = "\n".join([
        "## Keygen", "", *NOTES, "", *table, "", *verdict(rows), "", *ANALYSIS, "",
        f"Command: `{command}`", "", *[f"- {f}" for f in facts], ""])
    pattern = re.compile(r"^## Keygen\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) \
        else text.rstrip() + "\n\n" + section
    doc.write_text(text)


@dataclass
class Options:
    quick: bool = False
    profile: str | None = None
    #: profile only the paced (latency) phase, where batches are small
    profile_paced: bool = False
    only: str | None = None
    write: bool = True
    rate: float | None = None
    keygen_env: dict[str, str] | None = None


async def run(opts: Options) -> None:
    ns = await KlmNamespace().create()
    logs = Path(tempfile.gettempdir()) / "klm-bench-logs"
    logs.mkdir(exist_ok=True)
    keygen = ServiceProcess("keygen", REPO, {**ns.env, **(opts.keygen_env or {})}, logs)
    keygen.log_path.write_text("")
    print(f"keygen log: {keygen.log_path}")
    profiler: subprocess.Popen[bytes] | None = None
    try:
        raw = raw_rates(ns, 0.5 if opts.quick else 1.5)
        keygen.start()
        if opts.profile and not opts.profile_paced:
            profiler = _profile(keygen, opts.profile)
        rows, bursts = await measure_pipeline(ns, keygen, raw, opts)
    finally:
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(timeout=60)
        keygen.terminate()
        await ns.drop()
    table = report(rows, bursts)
    print("\n".join(table))
    command = "eval \"$(infra/stack.sh env)\" && .venv/bin/python bench/keygen.py" + \
        (" --quick" if opts.quick else "")
    if opts.write:
        write_section(table, machine_facts(), command, rows)


async def measure_pipeline(ns: KlmNamespace, keygen: ServiceProcess,
                           raw: dict[str, tuple[float, float]], opts: Options
                           ) -> tuple[list[Any], list[Any]]:
    """Per algorithm: the burst maximum (with CPU use) and the paced latencies."""
    settings = ns.settings()
    topics = Topics(settings.topic_prefix)
    answers = Answers(settings.kafka_bootstrap, topics.lifecycle)
    await answers.start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_idempotence=True, acks="all", linger_ms=1,
                                **stack_login())
    await producer.start()
    rows: list[Any] = []
    bursts: list[Any] = []
    assert keygen.proc is not None
    try:
        await max_rate(producer, answers, topics.requests, ALGORITHMS["AES-256"], 200)
        for name, fields in ALGORITHMS.items():
            if opts.only and name != opts.only:
                continue
            gen, wrap = raw[name]
            n = max(20, int(gen * (2 if opts.quick else 5))) if name != "RSA-2048" \
                else (15 if opts.quick else 40)
            with CpuMeter(keygen.proc.pid) as cpu:
                e2e = await max_rate(producer, answers, topics.requests, fields, n)
            cores = os.cpu_count() or 1
            bursts.append((name, cpu.process / n * 1000, cpu.process / cpu.wall,
                           cpu.busy / (cpu.wall * cores)))
            load = opts.rate or e2e / 2
            profiler = _profile(keygen, f"{opts.profile}.{name.replace(' ', '_')}") \
                if opts.profile and opts.profile_paced else None
            try:
                with CpuMeter(keygen.proc.pid) as paced_cpu:
                    lat, stages = await paced_latencies(producer, answers, topics.requests,
                                                        fields, load,
                                                        4.0 if opts.quick else 10.0)
            finally:
                if profiler is not None:
                    profiler.send_signal(2)
                    profiler.wait(timeout=60)
            bursts[-1] += (paced_cpu.process / len(lat) * 1000,)
            rows.append((name, gen, wrap, n, e2e, load, lat, stages))
            print(f"{name}: raw {gen:.0f}/s (gen+wrap {wrap:.0f}/s), e2e {e2e:.0f}/s "
                  f"over {n} keys, ratio {e2e / gen:.0%}; at {load:.0f}/s: "
                  f"p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms; "
                  "stages {:.1f} / {:.1f} / {:.1f} ms; ".format(*stages)
                  + "burst: keygen {:.2f} CPU-ms/key, {:.0%} of a core, machine {:.0%} "
                  "busy; paced: keygen {:.2f} CPU-ms/key".format(*bursts[-1][1:]), flush=True)
    finally:
        await producer.stop()
        await answers.stop()
    return rows, bursts


def report(rows: list[Any], bursts: list[Any]) -> list[str]:
    table = ["| algorithm | raw gen/s | raw gen+wrap/s | e2e max keys/s (n) | e2e/raw | "
             "latency at | p50 ms | p99 ms | median stages ms: in→made / →relayed / →consumed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, gen, wrap, n, e2e, load, lat, stages in rows:
        table.append(f"| {name} | {gen:,.1f} | {wrap:,.1f} | {e2e:,.1f} ({n}) | "
                     f"{e2e / gen:.0%} | {load:,.1f}/s | {percentile(lat, 50):.1f} | "
                     f"{percentile(lat, 99):.1f} | "
                     "{:.1f} / {:.1f} / {:.1f} |".format(*stages))
    table += ["", "During each burst (from /proc): keygen's CPU time per key (HSM work "
              "included: SoftHSM runs in keygen's process), the share of one core keygen got, "
              "how busy the whole machine was, and the rate keygen's own CPU cost allows on "
              "one core (1000 / CPU-ms per key) next to the raw rate; last, keygen's CPU time "
              "per key at the paced load (small batches: the fixed cost per batch is shared "
              "by few keys):", "",
              "| algorithm | keygen CPU-ms/key | keygen got | machine busy | "
              "one-core ceiling keys/s | ceiling/raw | CPU-ms/key paced |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    raw = {r[0]: r[1] for r in rows}
    table += [f"| {name} | {per_key:.2f} | {share:.0%} of a core | {busy:.0%} | "
              f"{1000 / per_key:,.1f} | {1000 / per_key / raw[name]:.0%} | {paced:.2f} |"
              for name, per_key, share, busy, paced in bursts]
    return table


def _profile(keygen: ServiceProcess, path: str) -> subprocess.Popen[bytes]:
    """py-spy samples keygen for the whole run (collapsed stacks, for finding hot spots)."""
    assert keygen.proc is not None
    return subprocess.Popen([str(REPO / ".venv" / "bin" / "py-spy"), "record", "--format",
                             "raw", "-o", path, "-p", str(keygen.proc.pid), "-r", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    parser.add_argument("--profile", metavar="FILE", help="py-spy keygen into FILE (raw)")
    parser.add_argument("--profile-paced", action="store_true",
                        help="with --profile: only the paced phase, into FILE.<algorithm>")
    parser.add_argument("--only", help="run only this algorithm (e.g. 'EC P-256')")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument("--rate", type=float, help="latency load (default: half the max)")
    parser.add_argument("--keygen-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra keygen setting, e.g. KLM_REQUESTS_PIPELINE_DEPTH=0 "
                             "(one batch at a time, for comparison)")
    args = parser.parse_args()
    asyncio.run(run(Options(args.quick, args.profile, args.profile_paced, args.only,
                            not args.no_write, args.rate,
                            dict(e.split("=", 1) for e in args.keygen_env))))


if __name__ == "__main__":
    main()
