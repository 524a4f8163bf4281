"""Fixtures of the attack suite: one federation of real services for the whole session (on a
nats-server of its own, so that no other test directory's consent service answers its hubs), and a
tap on the services' logs for every test (attacks_support.py has the classes and helpers)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from attacks_support import AttackFederation, LogTap


@pytest.fixture(scope="session")
def attack_federation(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AttackFederation]:
    federation = AttackFederation(tmp_path_factory.mktemp("attacks"), pytestconfig).start()
    yield federation
    federation.stop()


@pytest.fixture
def log_tap(attack_federation: AttackFederation) -> Iterator[LogTap]:
    """Every log record written during the test (attached after the services have started: each
    service's start-up resets the root handlers)."""
    tap = LogTap()
    root = logging.getLogger()
    root.addHandler(tap)
    yield tap
    root.removeHandler(tap)
