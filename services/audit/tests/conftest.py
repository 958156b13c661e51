"""Unit-test fixtures of the audit service."""

from __future__ import annotations

import pytest

from .factories import Events


@pytest.fixture
def events() -> Events:
    return Events()
