"""A separate instance of the local stack for tests that must not disturb the shared one:
the secured Kafka of the security tests, and the Kafka + PostgreSQL that the chaos tests
restart. It is ``infra/stack.sh`` with its own ``KLM_HOME`` and free ports; the shared
stack (``.klm``, 9092/5432) is never touched.

Also a *namespace* on an instance: a fresh database (every migration applied), a fresh
SoftHSM token and a topic prefix — what ``tests/integration/conftest.py`` makes for the
shared stack, made here for an instance of our own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from klm_common.db import provision
from klm_common.kafka import ensure_topics
from klm_common.settings import KlmSettings

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infra" / "stack.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StackInstance:
    """``infra/stack.sh`` under its own home and ports (nothing shared with ``.klm``)."""

    home: Path
    security: str = "none"
    kafka_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    pg_port: int = field(default_factory=free_port)
    log: list[str] = field(default_factory=list)

    @property
    def stack_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KLM_")}
        return {**env, "KLM_HOME": str(self.home), "KLM_KAFKA_SECURITY": self.security,
                "KLM_KAFKA_PORT": str(self.kafka_port),
                "KLM_KAFKA_CONTROLLER_PORT": str(self.controller_port),
                "KLM_PG_PORT": str(self.pg_port), "KLM_KAFKA_START_TIMEOUT": "180",
                "KAFKA_HEAP_OPTS": "-Xms128m -Xmx384m"}

    def stack(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([str(STACK), *args], env=self.stack_env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        self.log.append(f"$ stack.sh {' '.join(args)}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise RuntimeError(f"infra/stack.sh {' '.join(args)} failed:\n"
                               f"{done.stdout}{done.stderr}")
        return done.stdout

    def seed_classpath(self) -> None:
        """Reuse the shared stack's resolved Kafka classpath (a cache, not data)."""
        src, dst = REPO / ".klm" / "kafka", self.home / "kafka"
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("classpath.txt", "classpath.pom.sha256"):
            if (src / name).exists() and not (dst / name).exists():
                shutil.copy(src / name, dst / name)

    def up(self, *components: str) -> None:
        self.seed_classpath()
        self.stack("up", *components)

    def down(self) -> None:
        """Stop this instance's Kafka and PostgreSQL (``stack.sh down`` of its home)."""
        self.stack("down")

    def stop_kafka_hard(self) -> None:
        """SIGKILL the broker (no clean shutdown)."""
        pid_file = self.home / "run" / "kafka.pid"
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 9)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        out = self.stack("env")
        env = {}
        for line in out.splitlines():
            if line.startswith("export ") and "=" in line:
                name, value = line[len("export "):].split("=", 1)
                env[name] = value.strip("'\"")
        return env

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.kafka_port}"

    def password(self, user: str) -> str:
        return (self.home / "secrets" / f"kafka-{user}-password").read_text().strip()

    def login(self, user: str, password: str | None = None) -> dict[str, Any]:
        """aiokafka keyword arguments to log in as ``user`` (SASL/SCRAM-SHA-512)."""
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": user,
                "sasl_plain_password": password if password is not None else
                self.password(user)}


@dataclass
class Namespace:
    """A database, a SoftHSM token and a topic prefix of our own, and the env of services
    that use them."""

    name: str
    env: dict[str, str]
    token_env: dict[str, str]

    def settings(self, **overrides: Any) -> KlmSettings:
        env = self.env
        values: dict[str, Any] = {
            "home": Path(env["KLM_HOME"]), "kafka_bootstrap": env["KLM_KAFKA_BOOTSTRAP"],
            "pg_dsn": env["KLM_PG_DSN"], "pg_admin_dsn": env["KLM_PG_ADMIN_DSN"],
            "topic_prefix": env["KLM_TOPIC_PREFIX"], "hsm_module": env["KLM_HSM_MODULE"],
            "hsm_token_label": env["KLM_HSM_TOKEN_LABEL"],
            "hsm_pin_file": Path(env["KLM_HSM_PIN_FILE"]),
            "kafka_security": env.get("KLM_KAFKA_SECURITY", "none")}
        if env.get("KLM_KAFKA_PASSWORD_FILE"):
            values["kafka_password_file"] = Path(env["KLM_KAFKA_PASSWORD_FILE"])
        values.update(overrides)
        return KlmSettings(**values)


def make_token(label: str, folder: Path, softhsm_conf: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    pin_file = folder / f"{label}.pin"
    pin_file.write_text(secrets.token_hex(8))
    pin_file.chmod(0o600)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--pin", pin_file.read_text(), "--so-pin", secrets.token_hex(8)],
                   capture_output=True, text=True, check=True,
                   env={**os.environ, "SOFTHSM2_CONF": softhsm_conf})
    return {"KLM_HSM_TOKEN_LABEL": label, "KLM_HSM_PIN_FILE": str(pin_file)}


def delete_token(label: str, softhsm_conf: str) -> None:
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label],
                   capture_output=True, check=False,
                   env={**os.environ, "SOFTHSM2_CONF": softhsm_conf})


async def create_namespace(name: str, *, admin_dsn: str, kafka_bootstrap: str,
                           klm_home: str, hsm_module: str, softhsm_conf: str,
                           token_dir: Path, kafka_env: dict[str, str] | None = None,
                           admin_login: dict[str, Any] | None = None) -> Namespace:
    """A fresh database ``name`` on the server of ``admin_dsn`` (all migrations applied),
    a fresh token ``name`` and the topic prefix ``<name>.`` (topics created as admin:
    ``admin_login`` = KlmSettings fields of the Kafka admin login, when it is secured)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    server = admin_dsn.rsplit("/", 1)[0]
    token = make_token(name, token_dir, softhsm_conf)
    env = {"KLM_HOME": klm_home, "KLM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "KLM_PG_ADMIN_DSN": f"{server}/{name}",
           "KLM_PG_DSN": f"postgresql://{server.split('@', 1)[1]}/{name}",
           "KLM_TOPIC_PREFIX": f"{name}.", "KLM_HSM_MODULE": hsm_module,
           "SOFTHSM2_CONF": softhsm_conf, **token, **(kafka_env or {})}
    ns = Namespace(name, env, token)
    admin_settings = ns.settings(**(admin_login or {"kafka_username": "admin"}))
    await provision(admin_settings)
    await ensure_topics(admin_settings)
    return ns


async def drop_namespace(ns: Namespace) -> None:
    if os.environ.get("KLM_KEEP_TEST_DB") == "1":
        return
    server = ns.env["KLM_PG_ADMIN_DSN"].rsplit("/", 1)[0]
    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{ns.name}" WITH (FORCE)')
    finally:
        await conn.close()
    delete_token(ns.name, ns.env["SOFTHSM2_CONF"])

