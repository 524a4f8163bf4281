"""A serving process freezes its start-up heap once the lifespan has started (hie_platform/heap.py);
a test process, which builds many apps, does not."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI

from hie_platform import heap
from hie_platform.http import create_service_app


def _app(started: list[int]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append(gc.get_freeze_count())
        yield

    return create_service_app(
        service="t", title="t", version="0", lifespan=lifespan, routers=[], max_body_bytes=1024
    )


async def _run_lifespan(app: FastAPI) -> int:
    async with app.router.lifespan_context(app):
        return gc.get_freeze_count()


async def test_a_serving_process_freezes_what_start_up_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIE_SERVING_PROCESS", "0")  # restored (unset) after the test
    assert not heap.serving()
    heap.mark_serving()
    started: list[int] = []
    keep = [object() for _ in range(1000)]  # alive across the freeze
    try:
        frozen = await _run_lifespan(_app(started))
        assert started == [started[0]]  # the service's own lifespan ran first
        assert frozen >= started[0] + len(keep)
    finally:
        gc.unfreeze()


async def test_a_process_that_does_not_serve_freezes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIE_SERVING_PROCESS", raising=False)
    gc.unfreeze()
    assert await _run_lifespan(_app([])) == 0
