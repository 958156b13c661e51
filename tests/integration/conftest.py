"""Integration fixtures: the REAL Kafka, PostgreSQL and SoftHSM, never mocks.

Endpoints, in order: environment variables (``KLM_KAFKA_BOOTSTRAP``, ``KLM_PG_ADMIN_DSN``)
→ testcontainers when a Docker engine answers → the local stack that ``make test`` starts
(``infra/stack.sh``). With ``CI=true`` or ``KLM_REQUIRE_SERVICES=1`` an unreachable
component FAILS the test; elsewhere it skips with the reason.

Each test session gets its own namespace so it never disturbs a running ``make up``:
a topic prefix, a fresh database (all migrations applied) and a fresh SoftHSM token.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from klm_common.db import provision
from klm_common.kafka import kafka_security
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import (
    EventLog,
    ServiceProcess,
    close_topics,
    kafka_reachable,
    local_stack_env,
    open_topics,
    pg_reachable,
)

REPO = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("CI", "").lower() == "true" or \
    os.environ.get("KLM_REQUIRE_SERVICES") == "1"

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


def unavailable(reason: str) -> None:
    """Fail in CI (a green run that skipped the real stack is a lie), skip elsewhere."""
    if REQUIRED:
        pytest.fail(f"required infrastructure unavailable: {reason}", pytrace=False)
    pytest.skip(f"infrastructure unavailable: {reason}")


@pytest.fixture(scope="session")
def endpoints() -> dict[str, str]:
    env = dict(local_stack_env(REPO))
    for name in ("KLM_KAFKA_BOOTSTRAP", "KLM_PG_ADMIN_DSN", "KLM_HSM_MODULE", "SOFTHSM2_CONF",
                 "KLM_HOME"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if not os.environ.get("KLM_KAFKA_BOOTSTRAP") and _docker_answers():
        env.update(_testcontainers())  # pragma: no cover - needs a Docker engine
    missing = [n for n in ("KLM_KAFKA_BOOTSTRAP", "KLM_PG_ADMIN_DSN", "KLM_HSM_MODULE")
               if not env.get(n)]
    if missing:
        unavailable(f"no endpoint for {', '.join(missing)} (run `make test` or `make up`)")
    if not kafka_reachable(env["KLM_KAFKA_BOOTSTRAP"]):
        unavailable(f"Kafka not reachable at {env['KLM_KAFKA_BOOTSTRAP']}")
    if not pg_reachable(env["KLM_PG_ADMIN_DSN"]):
        unavailable("PostgreSQL not reachable with KLM_PG_ADMIN_DSN")
    if not Path(env["KLM_HSM_MODULE"]).exists() or shutil.which("softhsm2-util") is None:
        unavailable(f"SoftHSM module missing at {env['KLM_HSM_MODULE']}")
    if env.get("KLM_KAFKA_SECURITY"):  # this process's own clients log in as the stack says
        os.environ.setdefault("KLM_KAFKA_SECURITY", env["KLM_KAFKA_SECURITY"])
        os.environ.setdefault("KLM_HOME", env["KLM_HOME"])
    return env


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


def _testcontainers() -> dict[str, str]:  # pragma: no cover - needs a Docker engine
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    kafka = KafkaContainer().with_kraft()
    kafka.start()
    pg = PostgresContainer("postgres:15", username="postgres", dbname="klm")
    pg.start()
    dsn = pg.get_connection_url().replace("postgresql+psycopg2://", "postgresql://")
    return {"KLM_KAFKA_BOOTSTRAP": kafka.get_bootstrap_server(), "KLM_PG_ADMIN_DSN": dsn}


@pytest.fixture(scope="session")
def namespace() -> str:
    return f"it{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def hsm_token(endpoints: dict[str, str], namespace: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[dict[str, str]]:
    """A fresh SoftHSM token for this session, its PIN in a private file."""
    folder = tmp_path_factory.mktemp("hsm")
    pin_file = folder / "pin"
    pin_file.write_text(secrets.token_hex(8))
    pin_file.chmod(0o600)
    env = {**os.environ, "SOFTHSM2_CONF": endpoints["SOFTHSM2_CONF"]}
    init = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", namespace,
         "--pin", pin_file.read_text(), "--so-pin", secrets.token_hex(8)],
        capture_output=True, text=True, env=env, check=False)
    if init.returncode != 0:
        unavailable(f"cannot initialise a SoftHSM token: {init.stderr.strip()[:200]}")
    yield {"KLM_HSM_TOKEN_LABEL": namespace, "KLM_HSM_PIN_FILE": str(pin_file)}
    subprocess.run(["softhsm2-util", "--delete-token", "--token", namespace],
                   capture_output=True, env=env, check=False)


@pytest.fixture(scope="session")
def klm_env(endpoints: dict[str, str], namespace: str, hsm_token: dict[str, str]
            ) -> Iterator[dict[str, str]]:
    """The environment of this session's isolated KLM: topics, database, token."""
    admin_dsn = endpoints["KLM_PG_ADMIN_DSN"]
    base = admin_dsn.rsplit("/", 1)[0].split("@", 1)[1]
    env = {
        "KLM_HOME": endpoints.get("KLM_HOME", str(REPO / ".klm")),
        "KLM_KAFKA_BOOTSTRAP": endpoints["KLM_KAFKA_BOOTSTRAP"],
        "KLM_PG_ADMIN_DSN": admin_dsn.rsplit("/", 1)[0] + f"/{namespace}",
        "KLM_PG_DSN": f"postgresql://{base}/{namespace}",
        "KLM_TOPIC_PREFIX": f"{namespace}.",
        "KLM_HSM_MODULE": endpoints["KLM_HSM_MODULE"],
        "SOFTHSM2_CONF": endpoints["SOFTHSM2_CONF"],
        **hsm_token,
    }
    asyncio.run(_create_namespace(admin_dsn, namespace, env))
    yield env
    asyncio.run(_drop_namespace(admin_dsn, namespace, env))


async def _create_namespace(admin_dsn: str, database: str, env: dict[str, str]) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    settings = settings_for(env)
    await provision(settings)
    await open_topics(settings)


async def _drop_namespace(admin_dsn: str, database: str, env: dict[str, str]) -> None:
    """Undo :func:`_create_namespace`: the database, and the topics and ACLs under the
    namespace's prefix (``KLM_KEEP_TEST_DB=1`` keeps them all, to look at afterwards)."""
    if os.environ.get("KLM_KEEP_TEST_DB") == "1":
        return
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()
    await close_topics(settings_for(env))


def settings_for(env: dict[str, str]) -> KlmSettings:
    return KlmSettings(
        home=Path(env["KLM_HOME"]), kafka_bootstrap=env["KLM_KAFKA_BOOTSTRAP"],
        pg_dsn=env["KLM_PG_DSN"], pg_admin_dsn=env["KLM_PG_ADMIN_DSN"],
        topic_prefix=env["KLM_TOPIC_PREFIX"], hsm_module=env["KLM_HSM_MODULE"],
        hsm_token_label=env["KLM_HSM_TOKEN_LABEL"],
        hsm_pin_file=Path(env["KLM_HSM_PIN_FILE"]))


@pytest.fixture(scope="session")
def settings(klm_env: dict[str, str]) -> KlmSettings:
    return settings_for(klm_env)


@pytest.fixture(scope="session")
def topics(settings: KlmSettings) -> Topics:
    return Topics(settings.topic_prefix)


#: every service process started in this session, in order
_STARTED: list[ServiceProcess] = []


@pytest.fixture(autouse=True, scope="module")
def _stop_services_of_the_module() -> Iterator[None]:
    """Services a module started stop when the module ends: a keygen left running would
    join the next module's consumer group and serve its requests with other settings."""
    mark = len(_STARTED)
    yield
    for proc in _STARTED[mark:]:
        proc.terminate()
    del _STARTED[mark:]


@pytest.fixture(scope="session")
def start_service(klm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Any]:
    """``start_service("keygen")`` → a running :class:`ServiceProcess`, stopped at the end
    of the module that started it."""
    started = _STARTED
    logs = tmp_path_factory.mktemp("service-logs")

    def start(name: str, **extra_env: str) -> ServiceProcess:
        proc = ServiceProcess(name, REPO, {**klm_env, **extra_env}, logs)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def lifecycle(settings: KlmSettings, topics: Topics) -> AsyncIterator[EventLog]:
    """Every event on this session's ``klm.lifecycle`` topic, from the beginning."""
    log = EventLog(settings.kafka_bootstrap, topics.lifecycle, kafka_security(settings))
    await log.start()
    yield log
    await log.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def dlq(settings: KlmSettings, topics: Topics) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, topics.dlq, kafka_security(settings))
    await log.start()
    yield log
    await log.stop()
