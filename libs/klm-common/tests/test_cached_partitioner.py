"""CachedPartitioner picks exactly the partitions aiokafka's default partitioner picks."""

from __future__ import annotations

import os

from aiokafka.partitioner import DefaultPartitioner

from klm_common.crypto_channel import CachedPartitioner


def test_same_partition_as_the_default_for_every_key_and_topic_size() -> None:
    cached = CachedPartitioner(size=8)  # small: the cache is emptied and refilled
    for _ in range(200):
        key = os.urandom(24)
        for count in (1, 6, 12):
            partitions = list(range(count))
            expected = DefaultPartitioner()(key, partitions, partitions)
            assert cached(key, partitions, partitions) == expected
            assert cached(key, partitions, []) == expected  # remembered, availability aside


def test_no_key_picks_an_available_partition() -> None:
    assert CachedPartitioner()(None, [0, 1, 2], [2]) == 2
