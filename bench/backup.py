"""Backup benchmark (issue 6): backup throughput end to end, and full disaster recovery.

In a throw-away KLM namespace (own topics, database and SoftHSM token): the custody
ceremony (``klm ceremony init``, 3 of 5), keygen, then ``--keys`` AES-256 keys generated
while the backup service is DOWN. Then:

1. **backup throughput** — the backup service starts and catches up: every
   ``klm.key.generated`` → wrap command → keygen unwraps (master KEK) and re-wraps (backup
   KEK) in the HSM → reply → blob + tag stored with its ``klm.key.backed_up`` in one
   transaction → relayed to Kafka. Timed from the service being ready to the last fact seen.
2. **disaster recovery** — keygen stopped, its token deleted and its keystore schema
   dropped; a new token; ``klm ceremony recover`` with 3 shares; keygen started (new master
   KEK); ``klm.backup.recover_all``; timed until every key's ``klm.key.restored`` is seen,
   then the keystore is counted and a sample of restored keys is used (AES-GCM round trip
   through keygen).

``eval "$(infra/stack.sh env)" && .venv/bin/python bench/backup.py [--keys 10000]`` prints a
Markdown section and writes it under "## Backup" in docs/benchmarks.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    REPO,
    KlmNamespace,
    kafka_login,
    provenance,
    start_service,
    write_section,
)

from klm_common.client import KlmClient
from klm_common.db import provision
from klm_common.envelope import CloudEvent, EnvelopeInvalid, make_event, parse_envelope
from klm_common.kafka import make_producer
from klm_common.topics import Topics


class Watch:
    """Reads a topic from the beginning; counts events by type and notes when each came."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.counts: Counter[str] = Counter()
        self.last_seen: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self.matched: list[CloudEvent] = []
        self.keep: Callable[[CloudEvent], bool] = lambda _e: False
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap,
                                          enable_auto_commit=False, max_poll_records=5000,
                                          **kafka_login())
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        if not parts:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for record in self._consumer:
            with contextlib.suppress(EnvelopeInvalid):
                event = parse_envelope(record.value)
                now = time.perf_counter()
                self.counts[event.type] += 1
                self.first_seen.setdefault(event.type, now)
                self.last_seen[event.type] = now
                if self.keep(event):
                    self.matched.append(event)

    async def until(self, type_: str, count: int, timeout: float) -> float:
        deadline = time.perf_counter() + timeout
        while self.counts[type_] < count:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.counts[type_]} of {count} {type_} after {timeout}s")
            await asyncio.sleep(0.05)
        return self.last_seen[type_]

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


def klm_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(REPO / ".venv" / "bin" / "klm"), *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"klm {' '.join(args)}: {done.stdout}{done.stderr}")
    return done


async def publish(settings: object, topic: str, events: list[CloudEvent]) -> None:
    producer = make_producer(settings, "bench-backup")  # type: ignore[arg-type]
    await producer.start()
    try:
        futures = [await producer.send(topic, e.to_bytes(), key=e.partition_key)
                   for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def hsm_rates(env: dict[str, str], count: int) -> tuple[float, float]:
    """In-process rates of the same HSM functions keygen runs (wrap for backup, restore),
    on session objects of the namespace's token — before keygen opens it."""
    import base64
    from datetime import UTC, datetime

    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism

    from klm_common.events import BackupMaterial
    from klm_keygen.adapters.hsm_backup import VersionRow, restore_versions, wrap_for_backup

    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
    lib = pkcs11.lib(env["KLM_HSM_MODULE"])
    pin = Path(env["KLM_HSM_PIN_FILE"]).read_text().strip()
    session = lib.get_token(token_label=env["KLM_HSM_TOKEN_LABEL"]).open(rw=True, user_pin=pin)
    try:
        master = session.generate_key(KeyType.AES, 256, template={
            Attribute.TOKEN: False, Attribute.WRAP: True, Attribute.UNWRAP: True})
        rows, at = [], datetime.now(UTC)
        for i in range(count):
            key = session.generate_key(KeyType.AES, 256, template={
                Attribute.TOKEN: False, Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True})
            material = BackupMaterial(
                key_id=f"klm:key:00000000-0000-4000-8000-{i:012d}", version=1, owner="bench",
                name="k", algorithm="AES", size=256, usages=["encrypt"],
                protection="hsm-wrapped", key_created_at=at, version_state="active",
                version_created_at=at, kcv=bytes(key[Attribute.CHECK_VALUE]).hex())
            rows.append(VersionRow(material, bytes(master.wrap_key(
                key, mechanism=Mechanism.AES_KEY_WRAP_PAD))))
            key.destroy()
        t0 = time.perf_counter()
        blobs = wrap_for_backup(session, master, rows)
        wrap_rate = count / (time.perf_counter() - t0)
        materials = [r.material.model_copy(update={"blob_b64": base64.b64encode(b).decode()})
                     for r, b in zip(rows, blobs, strict=True) if isinstance(b, bytes)]
        t0 = time.perf_counter()
        restore_versions(session, master, materials)
        return wrap_rate, count / (time.perf_counter() - t0)
    finally:
        session.close()


@dataclass
class Figures:
    hsm_wrap_rate: float
    hsm_restore_rate: float
    keys: int
    generate_s: float
    backup_s: float
    backup_after_first_s: float
    wipe_s: float
    ceremony_s: float
    keygen_start_s: float
    restore_s: float
    restored_rows: int
    sample_ok: int
    sample: int

    @property
    def dr_s(self) -> float:
        return self.ceremony_s + self.keygen_start_s + self.restore_s


async def measure(keys: int, logs: Path) -> Figures:  # noqa: PLR0915 - one scenario, in order
    ns = await KlmNamespace().create()
    env = {**os.environ, **ns.env}
    settings = ns.settings()
    topics = Topics(settings.topic_prefix)
    shares_dir = Path(tempfile.mkdtemp(prefix="bench-shares-")) / "shares"
    klm_cli(env, "ceremony", "init", "--out", str(shares_dir))
    shares = sorted(shares_dir.glob("custodian-*.share"))
    hsm_wrap, hsm_restore = await asyncio.to_thread(hsm_rates, ns.env, min(keys, 2000))
    print(f"in-process HSM: wrap for backup {hsm_wrap:,.0f}/s, restore {hsm_restore:,.0f}/s",
          flush=True)
    watch = Watch(settings.kafka_bootstrap, topics.lifecycle)
    keygen = await start_service("keygen", ns.env, logs)
    backup = None
    try:
        await watch.start()
        requests = [make_event("klm.request.generate_key",
                               {"owner": "bench", "name": f"k{i}", "algorithm": "AES-256"},
                               source="bench/backup") for i in range(keys)]
        t0 = time.perf_counter()
        await publish(settings, topics.requests, requests)
        generate_s = await watch.until("klm.key.generated", keys, 600) - t0
        print(f"generated {keys:,} keys in {generate_s:.1f} s", flush=True)

        backup = await start_service("backup", ns.env, logs, KLM_BACKUP_DRILL_INTERVAL="0")
        t0 = time.perf_counter()
        last = await watch.until("klm.key.backed_up", keys, 900)
        backup_s = last - t0
        after_first = last - watch.first_seen["klm.key.backed_up"]
        print(f"backed up {keys:,} in {backup_s:.1f} s ({after_first:.1f} s after the first)",
              flush=True)

        # ---- the disaster ----
        t0 = time.perf_counter()
        keygen.stop()
        await asyncio.to_thread(subprocess.run, ["softhsm2-util", "--delete-token", "--token",
                                                 ns.name], env=env, capture_output=True,
                                check=True)
        conn = await asyncpg.connect(settings.admin_dsn())
        try:
            await conn.execute("DROP SCHEMA keygen CASCADE")
        finally:
            await conn.close()
        await provision(settings, ("keygen",))
        pin = await asyncio.to_thread(Path(ns.env["KLM_HSM_PIN_FILE"]).read_text)
        await asyncio.to_thread(subprocess.run, [
            "softhsm2-util", "--init-token", "--free", "--label", ns.name, "--pin", pin.strip(),
            "--so-pin", "12345678"], env=env, capture_output=True, check=True)
        wipe_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        await asyncio.to_thread(klm_cli, env, "ceremony", "recover",
                                *[a for s in shares[:3] for a in ("--share", str(s))])
        ceremony_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        keygen = await start_service("keygen", ns.env, logs)
        keygen_start_s = time.perf_counter() - t0

        recover = make_event("klm.backup.recover_all", {"reason": "bench"},
                             source="bench/backup")
        t0 = time.perf_counter()
        await publish(settings, topics.backup, [recover])
        restore_s = await watch.until("klm.key.restored", keys, 1800) - t0
        print(f"restored {keys:,} in {restore_s:.1f} s", flush=True)
        rows = await _count(settings.admin_dsn())
        sample_ok, sample = await _use_sample(settings, requests[:: max(1, keys // 20)])
        return Figures(hsm_wrap, hsm_restore, keys, generate_s, backup_s, after_first, wipe_s,
                       ceremony_s, keygen_start_s, restore_s, rows, sample_ok, sample)
    finally:
        await watch.stop()
        if backup is not None:
            backup.stop()
        keygen.stop()
        await ns.drop()


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM keygen.key_versions "
                                       "WHERE wrapped IS NOT NULL"))
    finally:
        await conn.close()


async def _use_sample(settings: object, requests: list[CloudEvent]) -> tuple[int, int]:
    """AES-GCM round trips with restored keys, through keygen (proof they are usable)."""
    from klm_keygen.domain.generation import key_id_for

    ok = 0
    async with KlmClient(settings, source="bench/backup", timeout=60) as klm:  # type: ignore[arg-type]
        for req in requests:
            key_id = key_id_for(req.id)
            sealed = await klm.encrypt(key_id, b"after DR", owner="bench")
            ok += (await klm.decrypt(sealed, owner="bench")).data == b"after DR"
    return ok, len(requests)


def report(f: Figures) -> str:
    return "\n".join([
        provenance(),
        "",
        f"{f.keys:,} AES-256 key versions (hsm-wrapped), generated with the backup service "
        "down, then backed up as it catches up; then the token and the keystore are wiped and "
        "everything is recovered from 3 of 5 custodian shares.",
        "",
        "| figure | time | rate |",
        "|---|---:|---:|",
        f"| backup, end to end (service ready → last `klm.key.backed_up`) | {f.backup_s:.1f} s "
        f"| {f.keys / f.backup_s:,.0f} versions/s |",
        f"| backup, first → last fact (catch-up rate) | {f.backup_after_first_s:.1f} s | "
        f"{f.keys / f.backup_after_first_s:,.0f} versions/s |",
        f"| DR: `klm ceremony recover` (3 shares → backup KEK in the new token) | "
        f"{f.ceremony_s:.1f} s | |",
        f"| DR: keygen start on the new token (new master KEK) | {f.keygen_start_s:.1f} s | |",
        f"| DR: `recover_all` → last `klm.key.restored` | {f.restore_s:.1f} s | "
        f"{f.keys / f.restore_s:,.0f} keys/s |",
        f"| **DR total** (ceremony + keygen start + restore) | **{f.dr_s:.1f} s** | |",
        "",
        f"For comparison, in the same run: generating the {f.keys:,} keys took "
        f"{f.generate_s:.1f} s ({f.keys / f.generate_s:,.0f}/s); backup / generation time = "
        f"{f.backup_s / f.generate_s:.2f}. Wiping (token delete, keystore schema drop, new "
        f"token) took {f.wipe_s:.1f} s and is not part of the DR figure.",
        "",
        f"In-process HSM rates of the same functions (`wrap_for_backup`, `restore_versions`, "
        f"no Kafka/Postgres), same run: wrap {f.hsm_wrap_rate:,.0f}/s, restore "
        f"{f.hsm_restore_rate:,.0f}/s — end to end reaches "
        f"{f.keys / f.backup_after_first_s / f.hsm_wrap_rate:.2f}× (backup) and "
        f"{f.keys / f.restore_s / f.hsm_restore_rate:.2f}× (restore) of them.",
        "",
        f"Machine load during the run (1-min load average at the end): {os.getloadavg()[0]:.1f} "
        "on 2 cores — the machine is shared, so every figure here is a floor, not a ceiling.",
        "",
        f"After recovery the keystore holds {f.restored_rows:,} wrapped versions; "
        f"{f.sample_ok}/{f.sample} sampled keys did an AES-GCM round trip through keygen.",
    ])


async def main(keys: int, write: bool, logs: Path | None) -> None:
    if logs is not None:
        await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
        figures = await measure(keys, logs)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-backup-logs-") as folder:
            figures = await measure(keys, Path(folder))
    body = report(figures)
    print(body)
    if write:
        write_section("Backup", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--logs", type=Path, help="keep the services' logs in this folder")
    args = parser.parse_args()
    asyncio.run(main(args.keys, not args.no_write, args.logs))
