"""Fixtures shared by rotation's unit tests: a settable clock and the handlers' dependencies
over the in-memory inventory (tests/fakes.py), under the shipped default policy."""

from __future__ import annotations

import pytest
from services.rotation.tests.factories import T0
from services.rotation.tests.fakes import Clock, FakeDeadLetters, FakeInventory

from klm_common.policy import load_policy
from klm_common.topics import Topics
from klm_rotation.handlers import Deps, PolicyInForce

TOPICS = Topics("t.")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def deps(clock: Clock) -> Deps:
    return Deps(inventory=FakeInventory(), policy=PolicyInForce(load_policy(), "default"),
                topics=TOPICS, day_seconds=1.0, dead_letters=FakeDeadLetters(),  # type: ignore[arg-type]
                clock=clock)
