"""HSM unavailable — wrong PIN, module missing, token absent, session lost — keygen reports
not ready, serves nothing, loses nothing, and serves every waiting request once the HSM is
back, without a restart (same process id throughout).

This module gives keygen its OWN SoftHSM configuration and token directory, so that moving
the token away does not disturb the session's token or anyone else's.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import EventLog, ServiceProcess
from tests.integration.test_keygen_skeleton import generate_request, send

pytestmark = pytest.mark.asyncio(loop_scope="session")


class OwnHsm:
    """A private SoftHSM: config file, token directory, tokens, PIN file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tokens = folder / "tokens"
        self.tokens.mkdir()
        self.conf = folder / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokens}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n"
                             "slots.removable = false\n")
        self.pin = secrets.token_hex(8)
        self.pin_file = folder / "pin"
        self.pin_file.write_text(self.pin)
        self.module_link = folder / "module" / "libsofthsm2.so"

    def init_token(self, label: str) -> None:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", self.pin, "--so-pin", secrets.token_hex(8)],
                       env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
                       check=True, capture_output=True)

    def env(self, label: str, module: str) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf), "KLM_HSM_TOKEN_LABEL": label,
                "KLM_HSM_PIN_FILE": str(self.pin_file), "KLM_HSM_MODULE": module}


@pytest.fixture(scope="module")
def own_hsm(tmp_path_factory: pytest.TempPathFactory) -> OwnHsm:
    return OwnHsm(tmp_path_factory.mktemp("own-hsm"))


@pytest.fixture
def keygens() -> Iterator[list[ServiceProcess]]:
    """Keygens started by a test, terminated at its end (one consumer group at a time)."""
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.terminate()


def launch(klm_env: dict[str, str], keygens: list[ServiceProcess], env: dict[str, str],
           logs: Path) -> ServiceProcess:
    """Start keygen without waiting for readiness (it cannot be ready yet)."""
    proc = ServiceProcess("keygen", Path(__file__).resolve().parents[2], {**klm_env, **env},
                          logs)
    proc.start(wait=False)
    keygens.append(proc)
    return proc


async def readiness(proc: ServiceProcess) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                response = await client.get(f"{proc.url}/readyz", timeout=5)
                return {"ready": response.status_code == 200, **response.json()}
            except httpx.HTTPError:
                await asyncio.sleep(0.3)
    raise AssertionError("keygen never answered /readyz")


async def wait_readiness(proc: ServiceProcess, ready: bool, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await readiness(proc))["ready"] is not ready:
        assert asyncio.get_running_loop().time() < deadline, f"readiness never became {ready}"
        await asyncio.sleep(0.3)


async def unserved_while_down(proc: ServiceProcess, settings: KlmSettings, topics: Topics,
                              lifecycle: EventLog, n: int = 20) -> set[str]:
    """Publish ``n`` requests while the HSM is down: none may be answered meanwhile."""
    requests = [generate_request(name=f"outage-{uuid.uuid4().hex[:6]}", algorithm="EC-P-256")
                for _ in range(n)]
    ids = {r.id for r in requests}
    await send(settings, topics, *requests)
    await asyncio.sleep(4.0)
    assert lifecycle.matching(lambda e: e.correlationid in ids) == []
    report = await readiness(proc)
    assert report["ready"] is False and report["checks"]["hsm"] is False
    return ids


async def served_once(ids: set[str], lifecycle: EventLog) -> None:
    await lifecycle.wait_for(lambda e: e.correlationid in ids, count=len(ids), timeout=120)
    await asyncio.sleep(1.5)
    answers = lifecycle.matching(lambda e: e.correlationid in ids)
    assert len(answers) == len(ids)
    assert {a.type for a in answers} == {"klm.key.generated"}


async def test_wrong_pin_then_corrected_then_session_lost_and_back(
        klm_env: dict[str, str], keygens: list[ServiceProcess],
        own_hsm: OwnHsm, settings: KlmSettings, topics: Topics, lifecycle: EventLog,
        tmp_path: Path) -> None:
    label = f"pin-{uuid.uuid4().hex[:8]}"
    own_hsm.init_token(label)
    own_hsm.pin_file.write_text("wrong-pin")
    proc = launch(klm_env, keygens, own_hsm.env(label, klm_env["KLM_HSM_MODULE"]), tmp_path)
    ids = await unserved_while_down(proc, settings, topics, lifecycle)
    own_hsm.pin_file.write_text(own_hsm.pin)  # the operator fixes the PIN file
    await served_once(ids, lifecycle)
    await wait_readiness(proc, True)
    pid = proc.proc.pid if proc.proc else None

    # the token disappears under a running keygen (session lost), then comes back
    away = own_hsm.folder / "tokens.away"
    own_hsm.tokens.rename(away)
    try:
        await wait_readiness(proc, False)
        ids = await unserved_while_down(proc, settings, topics, lifecycle)
    finally:
        if own_hsm.tokens.exists():
            shutil.rmtree(own_hsm.tokens)  # SoftHSM may recreate an empty directory
        away.rename(own_hsm.tokens)
    await served_once(ids, lifecycle)
    await wait_readiness(proc, True)
    assert proc.proc is not None and proc.proc.pid == pid and proc.proc.poll() is None
    # the batch WAS consumed while the token was away, failed, and was delivered again
    log = proc.log_path.read_text(errors="replace")
    assert "hsm_unavailable" in log and "will be redelivered" in log


async def test_module_missing_then_installed(
        klm_env: dict[str, str], keygens: list[ServiceProcess], own_hsm: OwnHsm,
        settings: KlmSettings, topics: Topics, lifecycle: EventLog, tmp_path: Path) -> None:
    label = f"mod-{uuid.uuid4().hex[:8]}"
    own_hsm.init_token(label)
    proc = launch(klm_env, keygens, own_hsm.env(label, str(own_hsm.module_link)), tmp_path)
    ids = await unserved_while_down(proc, settings, topics, lifecycle)
    own_hsm.module_link.parent.mkdir(exist_ok=True)
    own_hsm.module_link.symlink_to(klm_env["KLM_HSM_MODULE"])
    await served_once(ids, lifecycle)
    await wait_readiness(proc, True)


async def test_token_absent_then_initialised(
        klm_env: dict[str, str], keygens: list[ServiceProcess], own_hsm: OwnHsm,
        settings: KlmSettings, topics: Topics, lifecycle: EventLog, tmp_path: Path) -> None:
    label = f"late-{uuid.uuid4().hex[:8]}"
    proc = launch(klm_env, keygens, own_hsm.env(label, klm_env["KLM_HSM_MODULE"]), tmp_path)
    ids = await unserved_while_down(proc, settings, topics, lifecycle)
    own_hsm.init_token(label)
    await served_once(ids, lifecycle)
    await wait_readiness(proc, True)
