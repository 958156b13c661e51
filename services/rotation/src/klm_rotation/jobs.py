"""Rotation's background jobs: the due-work scheduler, the continuous compliance scan, the
policy watcher and the inventory gauges. Each is a loop that survives errors (logged, retried);
none holds state that a restart would lose — everything lives in Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from klm_common.background import Wakeup
from klm_rotation.adapters.policy_source import PolicySource
from klm_rotation.domain.schedule import days
from klm_rotation.handlers import Deps, apply_policies, dispatch_due, scan_page

log = logging.getLogger(__name__)


async def _guarded(name: str, step: Callable[[], Awaitable[float]]) -> None:
    """Run ``step`` forever; it returns how long to wait before the next run."""
    while True:
        try:
            pause = await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying", name)
            pause = 1.0
        await asyncio.sleep(pause)


async def run_scheduler(deps: Deps, wakeup: Wakeup, poll: float) -> None:
    async def step() -> float:
        handled = await dispatch_due(deps)
        if handled:
            log.info("dispatched %d due item(s)", handled)
        await wakeup.wait(poll)
        return 0.0

    await _guarded("scheduler", step)


async def run_scan(deps: Deps, page_size: int, pass_pause: float) -> None:
    async def step() -> float:
        scanned = await scan_page(deps, page_size)
        if scanned is None:  # another instance scans
            return pass_pause
        return 0.01 if scanned == page_size else pass_pause

    await _guarded("compliance scan", step)


async def run_policy_watch(deps: Deps, source: PolicySource, poll: float) -> None:
    hup = Wakeup()
    loop = asyncio.get_running_loop()
    # no SIGHUP outside the main thread's loop (or off Unix): the mtime poll still reloads
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, hup.set)

    async def step() -> float:
        hangup = await hup.wait(poll)  # SIGHUP reloads even if the mtime looks the same
        if not source.watched or not (hangup or source.changed()):
            return 0.0
        policies = source.reload()
        if policies is not None:
            await apply_policies(deps, policies)
        return 0.0

    await _guarded("policy watch", step)


async def refresh_gauges(deps: Deps, notice_days: float) -> None:
    """Re-read the gauges' figures: open findings, and the inventory's keys, oldest active
    key and rotations due within ``notice_days`` policy days."""
    deps.metrics.open_findings = await deps.inventory.finding_counts()
    moment = deps.clock()
    figures = await deps.inventory.figures(moment + days(notice_days, deps.day_seconds))
    deps.metrics.inventory(figures, moment)


async def run_gauge(deps: Deps, every: float, notice_days: float = 1.0) -> None:
    async def step() -> float:
        await refresh_gauges(deps, notice_days)
        return every

    await _guarded("inventory gauges", step)
