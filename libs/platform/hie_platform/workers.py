"""Background workers: one way to start a task, keep it running, and stop it cleanly on shutdown.

`Worker` supervises a long-running coroutine: a crash is logged and the coroutine is started again
after a backoff; `wait()` gives it a while to finish by itself, `stop()` cancels it and waits.
`PeriodicWorker` runs a step now (or after the first interval), then every interval or as soon as
`kick()` is called; a failing step is logged once while it keeps failing and once when it recovers,
and never ends the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hie_platform.logging import get_logger

log = get_logger(__name__)

Step = Callable[[], Awaitable[bool | None]]


def describe(exc: BaseException) -> str:
    """The log form of an exception: its type and message, never a traceback of request data."""
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a crashed worker: base, doubled per crash in a row, capped at most."""

    base: float = 0.5
    most: float = 30.0

    def delay(self, crashes_in_a_row: int) -> float:
        return float(min(self.most, self.base * 2 ** max(0, crashes_in_a_row - 1)))


async def cancel_and_wait(task: asyncio.Task[Any], *, every: float = 1.0) -> BaseException | None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``every`` seconds;
    returns the error it ended with (None if it was cancelled or returned). Once is not always
    enough on Python 3.11: an ``asyncio.wait_for`` whose inner future completes as the cancellation
    arrives returns the result and drops the cancellation (cpython gh-86296), and nats-py's
    ``Subscription.next_msg`` waits with it. Seen in CI through the watchdog's task dump
    (tests/conftest.py): a JetStream consumer's task, cancelled once, went on pulling, and the
    service's shutdown waited for it for good. A cancellation of the caller still propagates."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    return None if task.cancelled() else task.exception()


class Worker:
    """One supervised background task of a service."""

    def __init__(
        self, name: str, run: Callable[[], Awaitable[None]], *, backoff: Backoff | None = None
    ) -> None:
        self.name = name
        self.backoff = backoff or Backoff()
        self.crashes = 0
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"worker {self.name} is already running")
        self._task = asyncio.create_task(self._supervise(), name=self.name)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, without cancelling, for the coroutine to return by itself
        (its owner has told it to finish its work); True once it has (or if it never started). A
        crash meanwhile is restarted as always, so a coroutine that drains must check on each start
        whether it was told to finish. Then `stop()`, which cancels whatever is still running."""
        task = self._task
        if task is None:
            return True
        await asyncio.wait({task}, timeout=timeout)
        return task.done()

    async def stop(self) -> None:
        """Cancel the task and wait for it; a cancellation of the caller itself still propagates."""
        task, self._task = self._task, None
        if task is None:
            return
        # asyncio.wait (in cancel_and_wait), not `suppress(CancelledError): await task`: that would
        # also swallow a cancellation aimed at the caller while it waits here.
        error = await cancel_and_wait(task)
        if error is not None:
            log.error("worker ended with an error", worker=self.name, error=describe(error))

    async def _supervise(self) -> None:
        in_a_row = 0
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await self._run()
            except Exception as exc:
                self.crashes += 1
                # A run that lasted longer than the longest backoff was healthy: start counting again.
                in_a_row = 1 if loop.time() - began > self.backoff.most else in_a_row + 1
                delay = self.backoff.delay(in_a_row)
                log.error("worker crashed; restarting", worker=self.name, error=describe(exc), delay=delay)
                await asyncio.sleep(delay)
            else:
                return


class PeriodicWorker(Worker):
    """Runs `step` every `interval` seconds, or at once when kicked; `step` returns True to go again now
    (a batch came back full). `final_pass` runs the step once more after stopping (flush what is left)."""

    def __init__(
        self,
        name: str,
        step: Step,
        interval: float,
        *,
        run_now: bool = True,
        final_pass: bool = False,
    ) -> None:
        super().__init__(name, self._loop)
        self.step = step
        self.interval = interval
        self.run_now = run_now
        self.final_pass = final_pass
        self.passes = 0
        self.failing = False
        self._wake = asyncio.Event()

    def kick(self) -> None:
        """Run the step as soon as the current pass (if any) ends, not at the next interval."""
        self._wake.set()

    async def stop(self) -> None:
        await super().stop()
        if self.final_pass:
            try:
                await self.step()
            except Exception as exc:
                log.warning("final pass failed", worker=self.name, error=describe(exc))

    async def run_once(self) -> None:
        """One pass, repeated while the step says more is waiting; a failure is logged, not raised."""
        self._wake.clear()  # a kick during the pass sets it again and the next wait returns at once
        try:
            while await self.step() is True:
                pass
        except Exception as exc:
            if not self.failing:
                log.warning("worker pass failed; will retry", worker=self.name, error=describe(exc))
            self.failing = True
        else:
            if self.failing:
                log.info("worker pass succeeded again", worker=self.name)
            self.failing = False
        self.passes += 1

    async def _loop(self) -> None:
        if not self.run_now:
            await self._wait()
        while True:
            await self.run_once()
            await self._wait()

    async def _wait(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires (cpython gh-86296), and the worker would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval):
                await self._wake.wait()
