"""Usage benchmark (issue 7): ECDSA P-256 sign and AES-256-GCM encrypt of 1 KiB, end to end
through Kafka (KlmClient → klm.crypto.requests → keygen → HSM → reply topic), next to the
raw in-process HSM rate of the same operation (the same ``hsm_usage`` functions keygen
calls, one thread, one session, no Kafka).

Per operation: the raw rate; the maximum end-to-end rate (closed loop, many requests in
flight) with its p50/p99; then an open loop at half that rate with its p50/p99 — the target
is ≥ 50 % of raw at the maximum and p99 ≤ 20 ms at half load.

``eval "$(infra/stack.sh env)" && .venv/bin/python bench/usage.py [--seconds 10]`` prints a
Markdown section and writes it under "## Usage operations" in docs/benchmarks.md. Not a
timed test: no assertion on the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    CpuMeter,
    KlmNamespace,
    Summary,
    kafka_pid,
    provenance,
    start_service,
    summary,
    write_section,
)

from klm_common.algorithms import Algorithm, Usage
from klm_common.client import KlmClient
from klm_common.errors import KlmError

PAYLOAD = os.urandom(1024)
OWNER = "bench"


@dataclass
class Figures:
    operation: str
    raw_rate: float
    max_load: Summary
    half_load: Summary
    half_target: float
    #: CPU µs per request of keygen, this process (the client) and the Kafka broker, at the
    #: maximum and at half load
    cpu_max: dict[str, float]
    cpu_half: dict[str, float]


# ---- raw, in process --------------------------------------------------------------------------
def raw_rates(env: dict[str, str], seconds: float) -> dict[str, float]:
    """Ops/s of the same HSM functions on session keys in this process (one thread)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    from klm_keygen.adapters import hsm_usage

    os.environ.setdefault("SOFTHSM2_CONF", env["SOFTHSM2_CONF"])
    token = pkcs11.lib(env["KLM_HSM_MODULE"]).get_token(token_label=env["KLM_HSM_TOKEN_LABEL"])
    pin = Path(env["KLM_HSM_PIN_FILE"]).read_text().strip()
    with token.open(rw=True, user_pin=pin) as session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(
                "1.2.840.10045.3.1.7")}, local=True)
        _, private = params.generate_keypair(mechanism=Mechanism.EC_KEY_PAIR_GEN,
                                             private_template={Attribute.SIGN: True})
        aes = session.generate_key(KeyType.AES, 256, template=hsm_usage.secret_template(
            frozenset({Usage.ENCRYPT, Usage.DECRYPT})))
        nonce = bytes(session.generate_random(96))
        return {
            "ECDSA P-256 sign": _rate(lambda: hsm_usage.ecdsa_sign(private, PAYLOAD, "SHA-256",
                                                                   256), seconds),
            "AES-256-GCM encrypt 1 KiB": _rate(
                lambda: hsm_usage.gcm_encrypt(aes, nonce, PAYLOAD, None), seconds),
        }


def _rate(fn: Callable[[], Any], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            fn()
        count += 100
    return count / (time.perf_counter() - start)


def codec_costs(n: int = 2000) -> dict[str, float]:
    """µs per request of the Python work around the HSM call, measured in this run: what
    a client does to send a sign request and read its reply, and what keygen does to parse
    the request and build the reply (envelope, pydantic, JSON, base64)."""
    import base64

    from klm_common.envelope import make_event, parse_envelope
    from klm_common.events import CryptoReply, CryptoSign, parse_data

    key_id = "klm:key:00000000-0000-4000-8000-000000000001"
    signature = base64.b64encode(os.urandom(72)).decode()

    def client() -> None:
        data = CryptoSign(key_id=key_id, owner=OWNER, reply_to="b.klm.crypto.replies.x",
                          data_b64=base64.b64encode(PAYLOAD).decode())
        make_event(data.event_type, data, source="bench", subject=key_id).to_bytes()

    request = make_event(CryptoSign.event_type, CryptoSign(
        key_id=key_id, owner=OWNER, reply_to="b.klm.crypto.replies.x",
        data_b64=base64.b64encode(PAYLOAD).decode()), source="bench").to_bytes()

    def keygen() -> bytes:
        event = parse_envelope(request)
        parse_data(event)
        reply = CryptoReply(operation="sign", ok=True, key_id=key_id, version=1,
                            algorithm="ECDSA-SHA256", signature_b64=signature)
        return make_event(reply.event_type, reply, source="klm/keygen", cause=event).to_bytes()

    reply_bytes = keygen()

    def client_reply() -> None:
        CryptoReply.model_validate(parse_envelope(reply_bytes).data)

    out = {}
    for name, fn in (("client", client), ("keygen", keygen), ("client reply", client_reply)):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - start) / n * 1e6
    return out


# ---- end to end -------------------------------------------------------------------------------
FAILURES: dict[str, int] = {}


async def attempt(call: Callable[[], Awaitable[Any]]) -> bool:
    """One call; a timeout or refusal is counted (and reported), not fatal."""
    try:
        await call()
    except KlmError as exc:
        FAILURES[exc.code] = FAILURES.get(exc.code, 0) + 1
        return False
    return True


async def closed_loop(call: Callable[[], Awaitable[Any]], seconds: float,
                      in_flight: int) -> Summary:
    """``in_flight`` workers, each sending its next request when the last one is answered."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if await attempt(call):
                latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return summary(latencies, time.perf_counter() - start)


async def open_loop(call: Callable[[], Awaitable[Any]], rate: float, seconds: float) -> Summary:
    """Requests at a fixed ``rate`` whatever the answers do (what a steady load looks like)."""
    latencies: list[float] = []
    interval = 1.0 / rate
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        t0 = time.perf_counter()
        if await attempt(call):
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return summary(latencies, time.perf_counter() - start)


async def measure(klm: KlmClient, name: str, call: Callable[[], Awaitable[Any]], raw: float,
                  seconds: float, in_flight: int, pids: dict[str, int]) -> Figures:
    for _ in range(200):  # warm up: handle cache, producer metadata, consumer fetches
        await call()
    with Meters(pids) as at_max:
        max_load = await closed_loop(call, seconds, in_flight)
    half = max_load.rate / 2
    with Meters(pids) as at_half:
        half_load = await open_loop(call, half, seconds)
    return Figures(name, raw, max_load, half_load, half,
                   at_max.per_request(max_load), at_half.per_request(half_load))


class Meters:
    """CPU time of each process named in ``pids`` over a ``with`` block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.meters = {name: CpuMeter(pid) for name, pid in pids.items()}

    def __enter__(self) -> Meters:
        for meter in self.meters.values():
            meter.__enter__()
        return self

    def __exit__(self, *_: object) -> None:
        for meter in self.meters.values():
            meter.__exit__()

    def per_request(self, load: Summary) -> dict[str, float]:
        done = max(1, load.count)
        return {name: 1e6 * m.process / done for name, m in self.meters.items()}


def section(figures: list[Figures], seconds: float, in_flight: int,
            codec: dict[str, float], extra: dict[str, str] | None = None) -> str:
    rows = ["| operation | raw HSM in process (ops/s) | end to end, max (ops/s) | "
            "% of raw | p50 / p99 at max (ms) | half load (ops/s) | p50 / p99 at half (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        rows.append(
            f"| {f.operation} | {f.raw_rate:,.0f} | {f.max_load.rate:,.0f} | "
            f"{100 * f.max_load.rate / f.raw_rate:.0f} % | "
            f"{f.max_load.p50_ms:.1f} / {f.max_load.p99_ms:.1f} | {f.half_load.rate:,.0f} | "
            f"{f.half_load.p50_ms:.1f} / {f.half_load.p99_ms:.1f} |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (provenance() + f"- load average at the end (1/5/15 min): {load} — the machine "
            "is shared, so every figure, raw included, runs on what others leave\n"
            f"- per figure: {seconds:.0f} s; max = closed loop with "
            f"{in_flight} requests in flight from one KlmClient; half = open loop at half "
            "that rate\n- payload: 1 KiB; keys: hsm-wrapped (unwrapped once into keygen's "
            "handle cache); one keygen process, batches of up to 500 requests, up to 4 "
            "batches in flight (the next one is served while earlier replies wait for "
            "their acks; offsets committed once they are acknowledged)"
            + (f"; keygen settings: {extra}" if extra else "") + "\n\n"
            + "\n".join(rows) + "\n\n" + cpu_table(figures)
            + f"\n\nFailed calls (timeouts, refusals): {FAILURES or 'none'}."
            f"\n\nPython work per request around the HSM call, same run: client builds the "
            f"request {codec['client']:.0f} µs, keygen parses it and builds the reply "
            f"{codec['keygen']:.0f} µs, client reads the reply {codec['client reply']:.0f} µs "
            "(the raw ECDSA sign is "
            f"{1e6 / figures[0].raw_rate:.0f} µs, AES-GCM {1e6 / figures[1].raw_rate:.0f} µs)."
            "\n\nTargets (issue 7): end to end ≥ 50 % of raw at the "
            "maximum, p99 ≤ 20 ms at half load. Raw is one thread calling the HSM with no "
            "I/O at all; the end-to-end figure pays Kafka (acks=all, both ways, and the "
            "offset commit), JSON and base64, the telemetry middleware, and the client, all "
            "on the same 2 cores as the HSM (key records come from keygen's cache, not "
            "Postgres).\n\n" + ANALYSIS)


def cpu_table(figures: list[Figures]) -> str:
    """Where each request's CPU goes, same run, and the rate the 2 cores could carry at that
    cost if every process ran in parallel and nothing else used the machine."""
    names = list(figures[0].cpu_max)
    rows = ["CPU per request (µs, from /proc; keygen includes the HSM work, SoftHSM runs in "
            "its process) and the rate 2 cores allow at that cost:", "",
            "| operation | load | " + " | ".join(names) + " | total | 2 cores allow (ops/s) "
            "| 50 % of raw |", "|---|---|" + "---:|" * (len(names) + 3)]
    for f in figures:
        for load, cpu in (("max", f.cpu_max), ("half", f.cpu_half)):
            total = sum(cpu.values())
            rows.append(f"| {f.operation} | {load} | "
                        + " | ".join(f"{cpu[n]:,.0f}" for n in names)
                        + f" | {total:,.0f} | {2e6 / total:,.0f} | {f.raw_rate / 2:,.0f} |")
    return "\n".join(rows)


ANALYSIS = """\
What limits these figures (the CPU table above is the measurement): every request costs
CPU in three processes — keygen (parse, authorise, the HSM call, the reply), the client
(build, send, read the reply) and the Kafka broker (two produce requests, two fetches, and
the offset commits) — and all of them share the 2 cores with the HSM. At the maximum
(closed loop, big batches) the total is ~0.5-0.65 ms per request, so even with every
process running in parallel on a quiet machine the 2 cores carry fewer requests than 50 %
of the raw rate ("2 cores allow" vs "50 % of raw"): the target is out of reach on this
machine for ECDSA, and far out of reach for AES-GCM, whose raw HSM call is ~30 µs. At half
load the batches are small and the cost per request doubles (fixed costs per fetch, produce
and wake-up); the half load is then a large share of what the cores allow, and requests
queue: that, not a stall, is the p99.

Done, in order (2026-11-28):
- 14:20 UTC: batches pipelined (`handlers/pipeline.py`, `KLM_USAGE_PIPELINE_DEPTH`, 4):
  the next batch is served while earlier replies wait for their acks; offsets committed up to
  the batches whose replies are acknowledged; a failed batch and those after it rewound.
- 17:00 UTC: keygen reads the crypto topics with a plain aiokafka consumer
  (`PipelinedConsumer`, no FastStream middleware stack per batch, no poll-and-sleep);
  producers without linger (aiokafka's 1-2 ms linger added 2-5 ms per hop); offsets
  committed at most every 50 ms (at 500 requests/s the broker's CPU per request fell from
  ~0.87 to ~0.54 ms); the client reads replies in batches; the other services' FastStream
  subscribers wait in `getmany` instead of polling every 5 ms. One sequential sign at 50/s:
  p50 15.6 → 7.3 ms.
- 17:15 UTC: a batch is served in chunks of 64: a timeline of the closed loop had shown
  lock-step turns of ~165 ms (one batch of 256 parsed 27 ms, signed 55 ms, answered 16 ms,
  sent 10 ms, then nothing in flight); now the HSM signs one chunk while the event loop
  parses the next and answers the previous.
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--keygen-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra keygen setting, e.g. KLM_USAGE_PIPELINE_DEPTH=0 "
                             "(one batch at a time, for comparison)")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.keygen_env)
    ns = await KlmNamespace().create()
    try:
        raw = raw_rates(ns.env, min(args.seconds, 5.0))
        codec = codec_costs()
        logs = Path(tempfile.mkdtemp(prefix="klm-bench-usage-"))
        print(f"keygen log: {logs / 'keygen.log'}", file=sys.stderr)
        keygen = await start_service("keygen", ns.env, logs, **extra)
        try:
            pids = {"keygen": keygen.proc.pid, "client": os.getpid()}
            if (broker := kafka_pid()) is not None:
                pids["Kafka"] = broker
            async with KlmClient(ns.settings(), source="bench/usage", timeout=60) as klm:
                figures = await run(klm, raw, args.seconds, args.in_flight, pids)
        finally:
            keygen.stop()
    finally:
        await ns.drop()
    text = section(figures, args.seconds, args.in_flight, codec, extra)
    print(text)
    if not args.no_write:
        write_section("Usage operations", text)


async def run(klm: KlmClient, raw: dict[str, float], seconds: float,
              in_flight: int, pids: dict[str, int]) -> list[Figures]:
    ec = await klm.generate_key(owner=OWNER, name="bench-ec", algorithm="EC", curve="P-256")
    aes = await klm.generate_key(owner=OWNER, name="bench-aes", algorithm="AES-256")
    assert Algorithm.AES.value == aes.data["algorithm"]
    ec_id, aes_id = ec.data["key_id"], aes.data["key_id"]
    return [
        await measure(klm, "ECDSA P-256 sign",
                      lambda: klm.sign(ec_id, PAYLOAD, owner=OWNER, timeout=30),
                      raw["ECDSA P-256 sign"], seconds, in_flight, pids),
        await measure(klm, "AES-256-GCM encrypt 1 KiB",
                      lambda: klm.encrypt(aes_id, PAYLOAD, owner=OWNER, timeout=30),
                      raw["AES-256-GCM encrypt 1 KiB"], seconds, in_flight, pids),
    ]


if __name__ == "__main__":
    asyncio.run(main())
