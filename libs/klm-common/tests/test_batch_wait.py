"""klm_common.kafka replaces FastStream's batch poll-and-sleep: a subscriber waits in
``getmany`` (which returns as soon as records arrive) and never sleeps after an empty one."""

from __future__ import annotations

import time
from typing import Any

from faststream.kafka.subscriber.usecase import BatchSubscriber

import klm_common.kafka  # noqa: F401 - importing it installs the wait


class FakeConsumer:
    def __init__(self, answers: list[dict[Any, list[str]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[str]]:
        self.calls.append((timeout_ms, max_records))
        return self.answers.pop(0)


class Subscriber:
    batch_timeout_ms = 60_000  # an idle wait this long must never be slept on top
    max_records = 500


async def test_an_empty_fetch_returns_at_once_and_records_come_in_order() -> None:
    consumer = FakeConsumer([{}, {"p0": ["a", "b"], "p1": ["c"]}])
    started = time.monotonic()
    assert await BatchSubscriber.get_msg(Subscriber(), consumer) == ()  # type: ignore[arg-type]
    assert await BatchSubscriber.get_msg(Subscriber(), consumer) == ("a", "b", "c")  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    assert consumer.calls == [(60_000, 500), (60_000, 500)]
