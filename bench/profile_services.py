"""Profile keygen and audit under load with py-spy; write the top costs to docs/benchmarks.md.

The load is the peer benchmark's KLM side (generate_key requests through Kafka, closed loop),
while ``py-spy record`` samples both service processes (all threads, wall-clock presence,
idle threads excluded). The "## Profile" section lists, per service, where the samples fall:
the top frames by own time, and KLM's own code by inclusive time, with file:line.

Run: ``make bench``, or after ``eval "$(infra/stack.sh env)"``:
``.venv/bin/python bench/profile_services.py``
(py-spy needs ptrace rights: root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, KlmNamespace, ensure_header, provenance, start_service, write_section
from peer_openbao import SPECS, KlmRequester, closed_loop, generate_request, summary

SECTION = "Profile"
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
OWN_CODE = ("klm_common/", "klm_keygen/", "klm_audit/")
#: process entry frames (on every stack of the main thread: they say nothing)
ENTRY = ("main (", "run (", "serve (")


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: ``frame;frame;...;leaf count`` per line."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` → ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def top_costs(stacks: list[tuple[list[str], int]], limit: int) -> tuple[int, list[str],
                                                                          list[str]]:
    total = sum(n for _, n in stacks)
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        own[short(frames[-1])] += n
        for frame in {short(f) for f in frames}:
            if frame.split(" (")[-1].startswith(OWN_CODE) and not frame.startswith(ENTRY):
                ours[frame] += n

    def rows(counter: collections.Counter[str]) -> list[str]:
        return [f"| {100 * n / total:.1f} % | `{frame}` |"
                for frame, n in counter.most_common(limit)]

    return total, rows(own), rows(ours)


async def profile(keys: int, concurrency: int, seconds: int, out: Path) -> tuple[str, float]:
    namespace = await KlmNamespace().create()
    services = []
    requester = KlmRequester(namespace.settings())
    try:
        services = [await start_service("keygen", namespace.env, out),
                    await start_service("audit", namespace.env, out)]
        await requester.start()
        await closed_loop([generate_request("AES-256", -i) for i in range(50)], concurrency,
                          requester.ask)
        spies = [subprocess.Popen(  # noqa: ASYNC220 - started once, reaped below
            [str(PY_SPY), "record", "--pid", str(s.proc.pid), "--duration", str(seconds),
             "--rate", "100", "--format", "raw", "--nonblocking", "--threads",
             "--output", str(out / f"{s.name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for s in services]
        await asyncio.sleep(1.0)  # py-spy attaches
        jobs = [generate_request(label, i) for i in range(keys) for label in SPECS]
        latencies, _, wall = await closed_loop(jobs, concurrency, requester.ask)
        for spy in spies:
            await asyncio.to_thread(spy.wait)
            if spy.returncode != 0:
                error = spy.stderr.read().decode() if spy.stderr else ""
                raise RuntimeError(f"py-spy failed: {error[-500:]}")
        figures = summary(latencies, wall)
        load = (f"{figures.count} generate_key requests (EC P-256 and AES-256) at concurrency "
                f"{concurrency}: {figures.rate:,.0f}/s, p50 {figures.p50_ms:.1f} ms, "
                f"p99 {figures.p99_ms:.1f} ms while sampled")
        return load, wall
    finally:
        await requester.stop()
        for service in services:
            service.stop()
        await namespace.drop()


def render(load: str, out: Path, seconds: int, limit: int) -> str:
    parts = [provenance(), f"- load: {load}\n- sampler: py-spy {py_spy_version()}, 100 Hz, "
             f"{seconds} s per process, all threads (an HSM-thread sample is a sample too)\n"]
    for name in ("keygen", "audit"):
        total, own, ours = top_costs(parse_raw(out / f"{name}.txt"), limit)
        parts.append(f"### {name} ({total} samples)\n\nTop frames by own time:\n\n"
                     "| share | frame |\n|---|---|\n" + "\n".join(own) +
                     "\n\nKLM code by inclusive time:\n\n| share | frame |\n|---|---|\n"
                     + "\n".join(ours) + "\n")
    return "\n".join(parts)


def py_spy_version() -> str:
    out = subprocess.run([str(PY_SPY), "--version"], capture_output=True, text=True,
                         check=False).stdout.split()
    return out[-1] if out else "?"


async def main(keys: int, concurrency: int, seconds: int, limit: int, write: bool) -> None:
    out = Path(tempfile.mkdtemp(prefix="klm-profile-"))
    try:
        started = time.perf_counter()
        load, _ = await profile(keys, concurrency, seconds, out)
        text = render(load, out, seconds, limit)
        print(text)
        print(f"(profiled in {time.perf_counter() - started:.0f} s)")
        if write:
            ensure_header()
            write_section(SECTION, text + "\n" + FINDINGS)
    finally:
        shutil.rmtree(out, ignore_errors=True)


#: what the numbers above meant when read on 2026-11-28 (kept with the figures; re-read them
#: after each run — the tables are regenerated, these notes are not)
FINDINGS = """### Reading (2026-11-28) and what was done

`EpollSelector.select` is the event loop waiting (idle, or for PostgreSQL/Kafka answers).

- Removed in klm-common:
  - KLM's per-record consume spans and per-publish relay spans cost ~7 % of audit's ingest
    samples (`Tracer.start_span` in `klm_common/inbound_telemetry.py` `_open`); they are now
    created only when the process exports spans (OTLP or console) — otherwise the record's
    own `traceparent` is passed on, so downstream traces stay whole at no cost.
  - The outbox relay took its advisory lock and read its batch in two round trips, and
    waited for a WAL flush to commit a transaction that only deletes published rows: now
    one statement (`klm_common/outbox.py` `_LOCKED_BATCH`), committed with
    `synchronous_commit` off for that transaction only (losing it republishes rows, which
    consumers drop by event id).
  - FastStream's batch subscribers polled (`getmany` 5 ms, then a 5 ms sleep when empty):
    ~30 % of a core for the four idle services; they now wait in `getmany`
    (`klm_common/kafka.py` `_wait_for_records`), ~8 %.
- Removed in keygen: its hot topics are read by plain aiokafka consumers
  (`handlers/pipeline.py` `PipelinedConsumer`, no FastStream middleware stack per batch;
  it was ~27 % of keygen's samples serving small batches), and offsets are committed at most
  every 50 ms rather than once per batch.
- Socket writes (`asyncio/selector_events.py` `_SelectorSocketTransport.write`) are a large
  own-time frame in both services: every Kafka request (fetch, produce, offset commit) and
  every PostgreSQL statement is a syscall, and syscalls are slow on this VM; at this
  concurrency batches are small, so per-batch round trips dominate.
- For the owners (not changed here):
  - keygen, the HSM thread, ~37 % of keygen's samples: `klm_keygen/adapters/hsm.py`
    `_keypair` (EC key pair generation) and `_finish` (KWP wrap under the master KEK), then
    `_secret` — SoftHSM's own work; only more HSM sessions (one per keygen instance) spread
    it. `_ec_spki` (`cryptography` point decoding) is ~1 %.
  - audit `klm_audit/domain/hash_chain.py` `canonical_json` (:64) and
    `canonicalise_received` (:82) — JSON decode + re-encode of each envelope, ~11 % of audit's
    samples; `klm_audit/projection.py` `Projector._run` → `postgres_store.project` ~12 %
    (read models rebuilt next to ingest).
  - aiokafka's `GroupCoordinator._commit_refresh_routine` fetching committed offsets, and
    audit's one offset commit per batch (our delivery rule: commit after the effects are
    durable).
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keys", type=int, default=1000, help="keys of each algorithm")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=20, help="py-spy duration")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.keys, args.concurrency, args.seconds, args.top, not args.no_write))
