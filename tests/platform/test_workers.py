"""The background-worker abstraction on a real event loop: passes, kicks, failures, crashes, stopping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from hie_platform.workers import Backoff, PeriodicWorker, Worker, cancel_and_wait

HOUR = 3600.0  # an interval that never elapses during a test: only kicks and run_now drive passes


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_periodic_worker_runs_now_and_again_when_kicked() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))

    worker = PeriodicWorker("test-kick", step, HOUR)
    worker.start()
    await until(lambda: worker.passes == 1)
    worker.kick()
    await until(lambda: worker.passes == 2)
    await worker.stop()
    assert calls == [0, 1]
    assert not worker.running


async def test_a_worker_started_without_run_now_waits_for_a_kick() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)

    worker = PeriodicWorker("test-wait", step, HOUR, run_now=False)
    worker.start()
    for _ in range(20):
        await asyncio.sleep(0)
    assert calls == []
    worker.kick()
    await until(lambda: calls == [1])
    await worker.stop()


async def test_a_step_that_reports_more_waiting_runs_again_in_the_same_pass() -> None:
    batches: list[int] = []

    async def step() -> bool:
        batches.append(1)
        return len(batches) < 3  # two full batches, then a short one

    worker = PeriodicWorker("test-drain", step, HOUR)
    worker.start()
    await until(lambda: worker.passes == 1)
    await worker.stop()
    assert len(batches) == 3


async def test_a_failing_step_is_retried_and_recovers_without_ending_the_worker() -> None:
    outcomes = [RuntimeError("database down"), RuntimeError("still down"), None]

    async def step() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    worker = PeriodicWorker("test-fail", step, HOUR)
    worker.start()
    await until(lambda: worker.passes == 1)
    assert worker.failing
    worker.kick()
    await until(lambda: worker.passes == 2)
    assert worker.failing
    assert worker.running
    worker.kick()
    await until(lambda: worker.passes == 3)
    assert not worker.failing
    assert worker.crashes == 0
    await worker.stop()


async def test_the_periodic_interval_runs_passes_without_kicks() -> None:
    async def step() -> None:
        return None

    worker = PeriodicWorker("test-interval", step, 0.01)
    worker.start()
    await until(lambda: worker.passes >= 3)
    await worker.stop()


async def test_stop_runs_the_final_pass_and_a_failing_one_is_not_raised() -> None:
    flushed: list[str] = []

    async def flush() -> None:
        flushed.append("flush")

    worker = PeriodicWorker("test-final", flush, HOUR, run_now=False, final_pass=True)
    worker.start()
    await worker.stop()
    assert flushed == ["flush"]

    async def broken() -> None:
        raise OSError("disk gone")

    failing = PeriodicWorker("test-final-fail", broken, HOUR, run_now=False, final_pass=True)
    failing.start()
    await failing.stop()  # logged, not raised
    assert not failing.running


async def test_a_crashed_worker_is_restarted_after_its_backoff() -> None:
    started: list[int] = []
    serving = asyncio.Event()

    async def run() -> None:
        started.append(1)
        if len(started) < 3:
            raise ConnectionError("lost the subscription")
        serving.set()
        await asyncio.Event().wait()

    worker = Worker("test-crash", run, backoff=Backoff(base=0.01, most=0.05))
    worker.start()
    async with asyncio.timeout(10):
        await serving.wait()
    assert worker.crashes == 2
    assert worker.running
    await worker.stop()
    assert not worker.running
    await worker.stop()  # a second stop is harmless


async def test_a_worker_that_returns_is_not_restarted() -> None:
    runs: list[int] = []

    async def run() -> None:
        runs.append(1)

    worker = Worker("test-return", run)
    worker.start()
    await until(lambda: not worker.running)
    assert runs == [1]
    await worker.stop()


async def test_wait_lets_a_worker_told_to_finish_end_by_itself() -> None:
    """The imaging recorder's stop: told to finish, it records what is left and returns; wait()
    gives it that time without cancelling it, and a worker that does not finish is left running."""
    finish = asyncio.Event()
    finished: list[bool] = []

    async def drain() -> None:
        await finish.wait()
        await asyncio.sleep(0.01)  # the last batch
        finished.append(True)

    never_started = Worker("test-wait-unstarted", drain)
    assert await never_started.wait(0.0)

    worker = Worker("test-wait", drain)
    worker.start()
    assert not await worker.wait(0.05)  # not told yet: still running, not cancelled
    assert worker.running
    finish.set()
    assert await worker.wait(10.0)
    assert finished == [True]
    assert not worker.running
    await worker.stop()


async def test_starting_a_running_worker_twice_is_refused() -> None:
    worker = Worker("test-twice", asyncio.Event().wait)
    worker.start()
    with pytest.raises(RuntimeError, match="already running"):
        worker.start()
    await worker.stop()


async def test_a_cancelled_caller_of_stop_is_cancelled_too() -> None:
    release = asyncio.Event()
    cleaning = asyncio.Event()

    async def run() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # a slow clean-up: stop() is still waiting when its caller is cancelled
            raise

    worker = Worker("test-caller", run)
    worker.start()
    task = worker._task
    assert task is not None
    stopper = asyncio.create_task(worker.stop())
    async with asyncio.timeout(10):
        await cleaning.wait()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    release.set()
    await asyncio.wait({task})
    assert task.cancelled()


async def test_cancel_and_wait_ends_a_task_that_drops_a_cancellation() -> None:
    """On Python 3.11 asyncio.wait_for can drop a cancellation (cpython gh-86296) and the task goes on,
    as a JetStream consumer's did in CI: cancel_and_wait cancels again until the task has ended."""
    dropped = 0

    async def stubborn() -> None:
        nonlocal dropped
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if dropped == 0:
                    dropped += 1
                    continue  # dropped, as wait_for does when its inner future completed meanwhile
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, every=0.05) is None
    assert task.cancelled()
    assert dropped == 1
