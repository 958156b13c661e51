"""The outbox relay's direct path (committed rows published from memory), through fakes of
the pool and the producer: what is claimed, in what order it goes out, what is deleted, and
what is left to the relay when Kafka or Postgres fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from klm_common.outbox import OutboxRelay, OutboxRow

HEADERS = json.dumps({"content-type": "application/cloudevents+json"})


class FakeConn:
    def __init__(self, table: dict[int, OutboxRow]) -> None:
        self.table = table
        self.excluded: list[list[int]] = []
        #: run while the relay's read is on its way (after its exclusion list was sent)
        self.during_read: Any = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        assert "relay_lock" in query
        _, limit, claimed = args
        self.excluded.append(sorted(claimed))
        if self.during_read is not None:
            during, self.during_read = self.during_read, None
            await during()
        rows = [r for seq, r in sorted(self.table.items()) if seq not in claimed][:limit]
        if not rows:
            return [{"held": True, "seq": None}]
        return [{"held": True, "seq": r.seq, "topic": r.topic, "key": r.key, "value": r.value,
                 "headers": r.headers} for r in rows]

    async def execute(self, query: str, seqs: list[int]) -> None:
        assert query.strip().startswith("DELETE FROM outbox")
        for seq in seqs:
            self.table.pop(seq, None)

    async def fetchval(self, query: str) -> int:
        return len(self.table)


class FakePool:
    def __init__(self) -> None:
        self.table: dict[int, OutboxRow] = {}
        self.conn = FakeConn(self.table)
        self.deletes: list[list[int]] = []
        self.fail_deletes = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConn]:
        yield self.conn

    async def execute(self, query: str, seqs: list[int]) -> None:
        assert "DELETE FROM outbox WHERE seq = ANY" in query
        if self.fail_deletes:
            raise OSError("postgres gone")
        self.deletes.append(list(seqs))
        for seq in seqs:
            self.table.pop(seq, None)


class FakeProducer:
    """Records what was sent; acknowledges at once unless told to fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
        self.fail: Exception | None = None

    async def send(self, topic: str, value: bytes, *, key: bytes | None,
                   headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail is not None:
            ack.set_exception(self.fail)
        else:
            self.sent.append((topic, value, key, headers))
            ack.set_result(None)
        return ack


def rows(pool: FakePool, *seqs: int) -> list[OutboxRow]:
    """Rows as a committed transaction wrote them (they are in the table)."""
    out = [OutboxRow(s, "t.lifecycle", f"k{s}".encode(), f"v{s}".encode(), HEADERS)
           for s in seqs]
    for row in out:
        pool.table[row.seq] = row
    return out


async def settle(relay: OutboxRelay) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await relay.drain(timeout=2.0)


@pytest.fixture
async def relay() -> AsyncIterator[tuple[OutboxRelay, FakePool, FakeProducer]]:
    pool, producer = FakePool(), FakeProducer()
    relay = OutboxRelay(pool, producer, idle_poll=0.01)  # type: ignore[arg-type]
    relay.start()
    await asyncio.sleep(0.05)  # its first round: nothing left behind
    yield relay, pool, producer
    await relay.stop()


async def test_left_to_the_relay_until_a_round_found_nothing_left() -> None:
    pool, producer = FakePool(), FakeProducer()
    relay = OutboxRelay(pool, producer, idle_poll=0.01)  # type: ignore[arg-type]
    left = rows(pool, 1, 2)
    assert not relay.claim(left), "not running: the relay publishes"
    relay.start()
    try:
        assert not relay.claim(left), "a crash may have left rows: the relay goes first"
        await asyncio.sleep(0.05)
        assert [v for _, v, _, _ in producer.sent] == [b"v1", b"v2"]
        assert pool.table == {}
        claimed = rows(pool, 3)
        assert relay.claim(claimed), "nothing left behind: published from memory"
        relay.publish_committed(claimed)
    finally:
        await relay.stop()


async def test_committed_rows_go_out_in_commit_order_then_are_deleted(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    relay_, pool, producer = relay
    first, second = rows(pool, 10, 11), rows(pool, 12)
    assert relay_.claim(first) and relay_.claim(second)
    relay_.publish_committed(first)
    relay_.publish_committed(second)
    await settle(relay_)
    assert [(t, v, k) for t, v, k, _ in producer.sent] == [
        ("t.lifecycle", b"v10", b"k10"), ("t.lifecycle", b"v11", b"k11"),
        ("t.lifecycle", b"v12", b"k12")]
    assert ("content-type", b"application/cloudevents+json") in producer.sent[0][3]
    assert sorted(s for d in pool.deletes for s in d) == [10, 11, 12]
    assert len(pool.deletes) <= 2  # acknowledged rows are deleted together
    assert pool.table == {}
    assert relay_.published == 3


async def test_claimed_rows_are_not_read_back_by_the_relay(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    relay_, pool, producer = relay
    mine = rows(pool, 20)
    assert relay_.claim(mine)
    assert await relay_.relay_once() == 0  # committed, handed over: not the relay's
    assert pool.conn.excluded[-1] == [20]
    assert producer.sent == []
    relay_.publish_committed(mine)
    await settle(relay_)
    assert [v for _, v, _, _ in producer.sent] == [b"v20"]


async def test_rolled_back_rows_are_forgotten(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    relay_, pool, producer = relay
    doomed = [OutboxRow(30, "t", None, b"v30", HEADERS)]  # never committed: not in the table
    assert relay_.claim(doomed)
    relay_.unclaim(doomed)
    await relay_.drain(timeout=1.0)
    assert producer.sent == [] and pool.deletes == []


async def test_kafka_failure_leaves_rows_to_the_relay_which_keeps_the_order(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    relay_, pool, producer = relay
    producer.fail = ConnectionError("kafka gone")
    failed = rows(pool, 40)
    assert relay_.claim(failed)
    relay_.publish_committed(failed)
    await settle(relay_)
    assert 40 in pool.table, "not deleted: the relay publishes it"
    assert not relay_.claim(rows(pool, 41)), "rows left behind: later ones wait their turn"
    producer.fail = None
    await asyncio.sleep(1.2)  # the relay retries after 1 s: 40 then 41 (same rows, same ids)
    assert [v for _, v, _, _ in producer.sent] == [b"v40", b"v41"]
    assert pool.table == {}
    again = rows(pool, 42)
    assert relay_.claim(again), "nothing left: from memory again"
    relay_.publish_committed(again)
    await settle(relay_)
    assert [v for _, v, _, _ in producer.sent][-1] == b"v42"


async def test_rows_acknowledged_within_the_delete_interval_are_deleted_together() -> None:
    pool, producer = FakePool(), FakeProducer()
    relay = OutboxRelay(pool, producer, idle_poll=0.01,  # type: ignore[arg-type]
                        delete_interval=0.2)
    relay.start()
    await asyncio.sleep(0.05)  # its first round: nothing left behind
    try:
        for seq in range(1, 6):  # five one-row commits, one every 10 ms
            committed = rows(pool, seq)
            assert relay.claim(committed)
            relay.publish_committed(committed)
            await asyncio.sleep(0.01)
        await settle(relay)
        assert len(producer.sent) == 5
        assert pool.deletes == [[1], [2, 3, 4, 5]]  # the first at once, then one per interval
        assert pool.table == {} and relay.published == 5
    finally:
        await relay.stop()


@pytest.mark.parametrize("settled_meanwhile", [False, True])
async def test_rows_claimed_after_the_relay_sent_its_read_are_not_published_twice(
        settled_meanwhile: bool) -> None:
    """A unit claims and commits rows while a relay round's read is on its way (the read's
    snapshot sees them, its exclusion list does not): the relay leaves them to the direct
    path, whether they are still claimed or already published and deleted by then."""
    pool, producer = FakePool(), FakeProducer()
    relay = OutboxRelay(pool, producer, idle_poll=10.0)  # type: ignore[arg-type]
    relay.start()
    try:
        await asyncio.sleep(0.05)  # its first round: nothing left behind
        assert await relay.relay_once() == 0

        async def a_unit_commits() -> None:
            committed = rows(pool, 7)
            assert relay.claim(committed)
            relay.publish_committed(committed)
            if settled_meanwhile:
                await relay.drain(timeout=2.0)
                pool.table[7] = committed[0]  # the read's snapshot still holds the row

        pool.conn.during_read = a_unit_commits
        assert await relay.relay_once() == 0
        await settle(relay)
        assert [v for _, v, _, _ in producer.sent] == [b"v7"]
    finally:
        await relay.stop()


async def test_failed_delete_leaves_rows_for_a_republish_with_the_same_ids(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    relay_, pool, producer = relay
    pool.fail_deletes = True
    published = rows(pool, 50)
    assert relay_.claim(published)
    relay_.publish_committed(published)
    await settle(relay_)
    pool.fail_deletes = False
    await asyncio.sleep(0.1)
    # sent once from memory, once more by the relay: the same record, consumers dedupe
    assert [v for _, v, _, _ in producer.sent] == [b"v50", b"v50"]
    assert pool.table == {}


async def test_stop_publishes_what_was_handed_over(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    relay_, pool, producer = relay
    last = rows(pool, 60, 61)
    assert relay_.claim(last)
    relay_.publish_committed(last)
    await relay_.stop()
    assert [v for _, v, _, _ in producer.sent] == [b"v60", b"v61"]
    assert pool.table == {}


async def test_stop_publishes_rows_written_for_the_relay_just_before(
        relay: tuple[OutboxRelay, FakePool, FakeProducer]) -> None:
    """Last words (a usage summary written at stop, the relay woken for it) go out at
    stop even when the relay's loop had no turn in between."""
    relay_, pool, producer = relay
    relay_._idle_poll = 10.0
    await asyncio.sleep(0.02)  # the loop now waits for a wake-up
    rows(pool, 80)
    relay_.wake()
    await relay_.stop()
    assert [v for _, v, _, _ in producer.sent] == [b"v80"]
    assert pool.table == {}


async def test_rows_left_while_behind_keep_the_relay_first_until_it_found_none() -> None:
    pool, producer = FakePool(), FakeProducer()
    relay = OutboxRelay(pool, producer, idle_poll=10.0)  # type: ignore[arg-type]
    relay.start()
    try:
        await asyncio.sleep(0.01)  # the first round: the table is empty
        left = rows(pool, 70)
        relay._behind = True  # e.g. a direct publish just failed
        assert not relay.claim(left)
        relay.left_committed()  # committed: the relay goes first, and is woken for it
        assert not relay.claim(rows(pool, 71))
        relay.left_committed()
        await asyncio.sleep(0.05)
        assert [v for _, v, _, _ in producer.sent] == [b"v70", b"v71"]
        later = rows(pool, 72)
        assert relay.claim(later), "a round found nothing left"
        relay.publish_committed(later)
    finally:
        await relay.stop()
    assert [v for _, v, _, _ in producer.sent] == [b"v70", b"v71", b"v72"]
