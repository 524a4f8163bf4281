"""`make test` runs the suite on pytest-xdist workers, each in a process of its own with its own string
hashing; xdist refuses to run when they collect different tests or the same in another order. So a
parametrization must not follow the order of a set (of strings or enum members): this collects the
suite under two hash seeds and compares. Seeds 0 and 6 ordered a set of two roles differently, which
made a `make test` stop before its first test (tests/deploy/test_nats_permissions.py, 2026-12-07)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected(seed: int) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_suite_collects_the_same_tests_in_the_same_order_whatever_the_hash_seed() -> None:
    first, second = collected(0), collected(6)
    assert len(first) > 1000
    assert first == second
