"""Shared helpers for the benchmark scripts in bench/ (each script is run on its own by
``make bench``; import this as ``from benchlib import ...`` — bench/ is the script's folder).

* :func:`percentile`, :func:`summary` — latency figures;
* :func:`machine` — cores, memory, CPU model, OS, Python (every figure says where it ran);
* :func:`write_section` — replaces only its own ``## <title>`` section of
  ``docs/benchmarks.md``, so each benchmark owns its section and leaves the others alone;
* :class:`KlmNamespace` — an isolated KLM for one run (own topic prefix, fresh database with
  all migrations, own SoftHSM token), like the integration tests' session namespace, and
  :func:`start_service` to run ``klm-<service>`` processes in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.integration.harness: the stack's login and ACLs
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
HEADER = """# KLM benchmarks

Written by `make bench` (every `bench/*.py` against the real local stack: Kafka, PostgreSQL,
SoftHSM). Each section is owned and rewritten by one script; each figure says the command
that produced it, the machine, and the date. Ratios are always between figures measured in
the **same run** on the same machine. These are measurements, not guarantees: the machine has
2 cores and is often shared with other work (test suites, other benchmarks), which inflates
latencies and lowers rates well beyond the usual ±15 % run-to-run noise — sections that can
show the load average do.
"""


# ---- figures ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else math.nan


def summary(latencies: Sequence[float], seconds: float) -> Summary:
    """``latencies`` in seconds, ``seconds`` the wall time of the whole run."""
    return Summary(len(latencies), seconds, percentile(latencies, 50) * 1000,
                   percentile(latencies, 99) * 1000)


def machine() -> dict[str, str]:
    """Where a figure was measured."""
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": str(os.cpu_count()), "memory": memory, "cpu": cpu,
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def machine_line() -> str:
    m = machine()
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory']} memory, {m['os']}, "
            f"Python {m['python']}")


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """How this script was invoked, as a person would type it."""
    script = os.path.relpath(sys.argv[0], REPO)
    return " ".join([".venv/bin/python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def provenance() -> str:
    """The standard first lines of a section: command, machine, date."""
    return (f"- command: `{command_line()}`\n- machine: {machine_line()}\n"
            f"- date: {today()}\n")


# ---- docs/benchmarks.md ----------------------------------------------------------------------
def write_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the ``## title`` section of ``path`` (or append it), leaving the rest as is."""
    text = path.read_text() if path.exists() else HEADER
    if not text.startswith("# "):
        text = HEADER + "\n" + text
    heading = f"## {title}"
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:])
                                                   if end < len(lines) else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def ensure_header(path: Path = BENCHMARKS_MD) -> None:
    """Refresh the file's header (everything before the first ``## ``)."""
    text = path.read_text() if path.exists() else ""
    first = text.find("\n## ")
    rest = text[first + 1:] if first >= 0 else ""
    path.write_text(HEADER + ("\n" + rest if rest else ""))


# ---- an isolated KLM -------------------------------------------------------------------------
def stack_env() -> dict[str, str]:
    """What ``infra/stack.sh env`` exports, overridden by this process's environment."""
    out = subprocess.run([str(REPO / "infra" / "stack.sh"), "env"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export "):].split("=", 1)
            env[name] = value.strip("'\"")
    env.update({k: v for k, v in os.environ.items() if k.startswith(("KLM_", "SOFTHSM2"))})
    return env


def kafka_login() -> dict[str, Any]:
    """aiokafka keyword arguments to log in to the stack's Kafka: admin on the secured stack
    (``KLM_KAFKA_SECURITY=sasl``), nothing on a PLAINTEXT one (as the tests log in)."""
    from tests.integration.harness import stack_login

    return stack_login()


@dataclass
class KlmNamespace:
    """Own topic prefix, fresh database (migrations applied) and SoftHSM token."""

    name: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:8]}")
    env: dict[str, str] = field(default_factory=dict)
    _folder: tempfile.TemporaryDirectory[str] | None = None

    async def create(self) -> KlmNamespace:
        from tests.integration.harness import open_topics

        from klm_common.db import provision

        base = stack_env()
        self._folder = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        pin_file = Path(self._folder.name) / "pin"
        pin_file.write_text(secrets.token_hex(8))
        pin_file.chmod(0o600)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", self.name,  # noqa: ASYNC221
                        "--pin", pin_file.read_text(), "--so-pin", secrets.token_hex(8)],
                       capture_output=True, check=True, env={**os.environ, **base})
        admin = base["KLM_PG_ADMIN_DSN"]
        host = admin.rsplit("/", 1)[0].split("@", 1)[1]
        self.env = {**base, "KLM_PG_ADMIN_DSN": admin.rsplit("/", 1)[0] + f"/{self.name}",
                    "KLM_PG_DSN": f"postgresql://{host}/{self.name}",
                    "KLM_TOPIC_PREFIX": f"{self.name}.", "KLM_HSM_TOKEN_LABEL": self.name,
                    "KLM_HSM_PIN_FILE": str(pin_file)}
        await self._admin(f'CREATE DATABASE "{self.name}"', admin)
        settings = self.settings()
        await provision(settings)
        await open_topics(settings)
        return self

    def settings(self) -> Any:
        from klm_common.settings import KlmSettings

        e = self.env
        return KlmSettings(
            home=Path(e.get("KLM_HOME", REPO / ".klm")), kafka_bootstrap=e["KLM_KAFKA_BOOTSTRAP"],
            pg_dsn=e["KLM_PG_DSN"], pg_admin_dsn=e["KLM_PG_ADMIN_DSN"],
            topic_prefix=e["KLM_TOPIC_PREFIX"], hsm_module=e["KLM_HSM_MODULE"],
            hsm_token_label=e["KLM_HSM_TOKEN_LABEL"], hsm_pin_file=Path(e["KLM_HSM_PIN_FILE"]))

    async def drop(self) -> None:
        from tests.integration.harness import close_topics

        base = stack_env()
        if self.env:  # the topics and ACLs under its prefix
            await close_topics(self.settings())
        await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)',
                          base["KLM_PG_ADMIN_DSN"])
        subprocess.run(["softhsm2-util", "--delete-token", "--token", self.name],  # noqa: ASYNC221
                       capture_output=True, check=False, env={**os.environ, **base})
        if self._folder is not None:
            self._folder.cleanup()

    @staticmethod
    async def _admin(sql: str, dsn: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT_ENV = {"keygen": "KLM_KEYGEN_PORT", "rotation": "KLM_ROTATION_PORT",
            "backup": "KLM_BACKUP_PORT", "audit": "KLM_AUDIT_PORT"}


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def start_service(name: str, env: dict[str, str], log_dir: Path,
                        timeout: float = 90.0, **extra: str) -> Service:
    """Start ``klm-<name>`` and wait until its /readyz answers 200."""
    import httpx

    port = free_port()
    log = log_dir / f"{name}.log"
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / f"klm-{name}")],  # noqa: ASYNC220
                            env={**os.environ, **env, **extra, PORT_ENV[name]: str(port)},
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    service = Service(name, proc, port, log)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"klm-{name} exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{service.url}/readyz", timeout=2)).status_code == 200:
                    return service
            await asyncio.sleep(0.3)
    service.stop()
    raise TimeoutError(f"klm-{name} not ready after {timeout}s:\n{log.read_text()[-2000:]}")


class CpuMeter:
    """CPU seconds used by one process and by the whole machine between start and stop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> tuple[float, float, float]:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        proc = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = (cpu[3] + cpu[4]) / self.tick
        return proc, sum(cpu) / self.tick - idle, time.perf_counter()

    def __enter__(self) -> CpuMeter:
        self._start = self._sample()
        return self

    def __exit__(self, *_: object) -> None:
        end = self._sample()
        self.process, self.busy, self.wall = (e - s for e, s in
                                              zip(end, self._start, strict=True))


def kafka_pid() -> int | None:
    """The local Kafka broker's process (for its CPU time), if one runs."""
    found = subprocess.run(["pgrep", "-f", "kafka.Kafka"], capture_output=True, text=True,
                           check=False).stdout.split()
    return int(found[0]) if found else None
