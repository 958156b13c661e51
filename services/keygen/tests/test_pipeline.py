"""BatchPipeline (handlers/pipeline.py): offsets committed only up to the durable prefix,
failed batches and those after them rewound, batches fetched before a rewind dropped."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from klm_common.errors import HsmUnavailable
from klm_keygen.handlers.pipeline import BatchPipeline, Turn

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int


def records(partition: int, first: int, last: int) -> list[Any]:
    return [Record("t", partition, o) for o in range(first, last + 1)]


@dataclass
class FakeConsumer:
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    seeks: list[tuple[TopicPartition, int]] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return {TP0, TP1}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


async def test_offsets_follow_the_durable_prefix_and_transactions_take_turns() -> None:
    consumer, pipeline = FakeConsumer(), BatchPipeline("t", depth=4, retry_delay=0)
    first_done = asyncio.Event()
    order: list[str] = []

    async def slow(turn: Turn) -> None:
        await first_done.wait()
        await turn.wait()
        order.append("first")

    async def fast(turn: Turn) -> None:
        await turn.wait()  # waits for the first batch, which is not done yet
        order.append("second")

    await pipeline.submit(consumer, records(0, 0, 9), slow)
    await pipeline.submit(consumer, records(0, 10, 14) + records(1, 0, 2), fast)
    await asyncio.sleep(0.01)
    assert consumer.commits == [] and order == []  # nothing durable yet
    first_done.set()
    await pipeline.drain(timeout=2)
    assert order == ["first", "second"]
    committed: dict[TopicPartition, int] = {}
    for offsets in consumer.commits:
        committed.update(offsets)
    assert committed == {TP0: 15, TP1: 3}
    assert consumer.seeks == []


async def test_a_failed_batch_and_the_ones_after_it_are_rewound_not_committed() -> None:
    consumer, pipeline = FakeConsumer(), BatchPipeline("t", depth=4, retry_delay=0)
    release = asyncio.Event()

    async def ok(turn: Turn) -> None:
        await turn.wait()

    async def failing(turn: Turn) -> None:
        await release.wait()
        raise HsmUnavailable("token away")

    async def after(turn: Turn) -> None:
        await turn.wait()

    await pipeline.submit(consumer, records(0, 0, 4), ok)
    await pipeline.submit(consumer, records(0, 5, 9), failing)
    await pipeline.submit(consumer, records(0, 10, 12) + records(1, 7, 8), after)
    release.set()
    await pipeline.drain(timeout=2)
    committed: dict[TopicPartition, int] = {}
    for offsets in consumer.commits:
        committed.update(offsets)
    assert committed == {TP0: 5}  # only the batch before the failure
    assert set(consumer.seeks) == {(TP0, 5), (TP1, 7)}
    assert pipeline.rewinds == 1

    # a batch fetched before the rewind (offsets past it) is dropped and rewound again;
    # the redelivered one (starting where the partition was rewound to) is served
    served: list[str] = []

    async def mark(turn: Turn) -> None:
        served.append("x")

    consumer.seeks.clear()
    await pipeline.submit(consumer, records(0, 13, 15), mark)
    assert served == [] and consumer.seeks == [(TP0, 5)]
    await pipeline.submit(consumer, records(0, 5, 15) + records(1, 7, 8), mark)
    await pipeline.drain(timeout=2)
    assert served == ["x"]
    assert consumer.commits[-1] == {TP0: 16, TP1: 9}


async def test_closing_serves_nothing_new() -> None:
    consumer, pipeline = FakeConsumer(), BatchPipeline("t", depth=2, retry_delay=0)
    served: list[int] = []

    async def mark(turn: Turn) -> None:
        served.append(1)

    await pipeline.submit(consumer, records(0, 0, 1), mark)
    await pipeline.close()
    await pipeline.submit(consumer, records(0, 2, 3), mark)
    assert served == [1] and consumer.commits == [{TP0: 2}]


async def test_offset_commits_are_coalesced_without_holding_the_pipeline_back() -> None:
    consumer = FakeConsumer()
    pipeline = BatchPipeline("t", depth=2, retry_delay=0, commit_interval=60)

    async def done(turn: Turn) -> None:
        await turn.wait()

    for first in range(0, 100, 2):  # 50 batches through a pipeline of 2: none waits a minute
        await asyncio.wait_for(pipeline.submit(consumer, records(0, first, first + 1), done), 1)
    await asyncio.sleep(0.01)
    assert len(consumer.commits) <= 1  # the first right away, the rest wait for the interval
    await pipeline.drain(timeout=2)  # a rebalance or shutdown commits what is durable at once
    assert consumer.commits[-1] == {TP0: 100} and len(consumer.commits) <= 2
