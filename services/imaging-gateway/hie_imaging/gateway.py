"""The gateway's moving parts in one place: the Storage SCP, the relay worker, the exchange
consumer, the purge loop and the progress reporter, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError

from hie_imaging import repository, service
from hie_imaging.callers import CallerDirectory
from hie_imaging.config import ImagingSettings
from hie_imaging.dicom import ReceivedInstance, Spool, SpoolFullError, StorageServer, sop
from hie_imaging.events import ProgressReporter, follow_exchanges
from hie_imaging.metrics import GatewayMetrics
from hie_imaging.models import State
from hie_imaging.relay import RelayWorker
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime

log = get_logger(__name__)

_PURGE_BATCH = 500


class ImagingGateway:
    """Receives studies over DICOM, keeps them durably, and relays those that belong to an exchange."""

    def __init__(self, settings: ImagingSettings, runtime: Runtime, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.spool = Spool(settings.spool_dir, settings.spool_min_free_bytes)
        self.callers = CallerDirectory(runtime, settings.hub, settings.allowlist_refresh_seconds)
        self.reporter = ProgressReporter(runtime, settings.hub)
        self.worker = RelayWorker(settings, runtime, self.spool, self.reporter, metrics)
        self.server = StorageServer(settings.ae_title, self.callers.is_allowed, self.on_instance)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._purge_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.spool.remove_stale_temp_files)
        async with self.runtime.db.transaction() as session:
            pending = await service.requeue_pending(session, self.runtime.outbox, self.settings.hub)
        if pending:
            log.info("queued instances resume", instances=pending)
            self.runtime.relay.kick()
        await self.callers.start()
        self.reporter.start()
        follow_exchanges(self.runtime, self.settings.hub, self.settings.exchange_consumer, self.reporter)
        self.worker.start()
        self._purge_task = asyncio.create_task(self._purge_loop())
        self.server.start(self.settings.dicom_bind_host, self.settings.dicom_port)

    async def stop(self) -> None:
        # The SCP first: associations in flight finish (their commits need the loop, hence a thread).
        await asyncio.to_thread(self.server.stop, 5.0)
        if self._purge_task is not None:
            self._purge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge_task
        await self.worker.stop()
        await self.callers.stop()
        await self.reporter.stop()
        # Let the outbox relay take the last kick before the runtime cancels it: on CPython 3.11 a
        # cancel that lands while its asyncio.wait_for() is completing is swallowed (gh-86296), and
        # the relay task would then never stop. (Its stop() flushes the rest after cancelling.)
        await asyncio.sleep(0.05)

    # --- receiving: runs on pynetdicom's association threads ------------------------------------

    def on_instance(self, instance: ReceivedInstance) -> int:
        """Spool, then record in one transaction; Success only once both are durable."""
        caller = self.callers.lookup(instance.calling_ae)
        if caller is None or self._loop is None:
            # Allowed when the association began, struck off the registry since.
            self.metrics.received.labels("unknown", "refused").inc()
            return sop.STATUS_PROCESSING_FAILURE
        try:
            self.spool.store(instance.sop_instance_uid, instance.data)
        except (SpoolFullError, OSError) as exc:
            log.error("C-STORE refused: spool write failed", error=str(exc))
            self.metrics.received.labels(caller.role.value, "refused").inc()
            return sop.STATUS_OUT_OF_RESOURCES
        future = None
        try:
            future = asyncio.run_coroutine_threadsafe(self._record(instance, caller), self._loop)
            state = future.result(timeout=self.settings.receive_timeout_seconds)
        except Exception as exc:  # the database failed, timed out, or the service is stopping
            if future is not None:
                future.cancel()
            # A7xx: the sender keeps the instance and tries again; the spooled file is overwritten.
            log.error("C-STORE refused: not recorded", error=f"{type(exc).__name__}: {exc}")
            self.metrics.received.labels(caller.role.value, "refused").inc()
            return sop.STATUS_OUT_OF_RESOURCES
        self.metrics.received.labels(caller.role.value, "duplicate" if state is None else "new").inc()
        return sop.STATUS_SUCCESS

    async def _record(self, instance: ReceivedInstance, caller: service.Caller) -> State | None:
        now = datetime.now(UTC)
        for attempt in range(3):
            try:
                async with self.runtime.db.transaction() as session:
                    state = await service.record_instance(
                        session, self.runtime.outbox, self.settings.hub, instance, caller, now
                    )
                break
            except IntegrityError:
                # The same instance on two associations at once (PostgreSQL): the next try sees it.
                if attempt == 2:
                    raise
        if state is State.QUEUED:
            self.runtime.relay.kick()
        if state is not None:
            self.reporter.touch(instance.study_instance_uid)
        return state

    # --- purging held studies --------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        while True:
            try:
                await self.purge_held()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("purge pass failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.settings.purge_interval_seconds)

    async def purge_held(self, now: datetime | None = None) -> int:
        """Drop instances no exchange claimed within hold_seconds: the row says purged, the file goes.

        The rows change first; a crash before the files are deleted leaves only unreferenced files.
        """
        cutoff = (now or datetime.now(UTC)) - timedelta(seconds=self.settings.hold_seconds)
        purged = 0
        while True:
            async with self.runtime.db.transaction() as session:
                stale = await repository.stale_held(session, cutoff, _PURGE_BATCH)
                await repository.mark_purged(session, [sop_uid for sop_uid, _ in stale], datetime.now(UTC))
            for sop_uid, _ in stale:
                await asyncio.to_thread(self.spool.delete, sop_uid)
            purged += len(stale)
            self.reporter.touch(*{study for _, study in stale})
            if len(stale) < _PURGE_BATCH:
                break
        if purged:
            log.info("purged held instances", instances=purged)
        return purged
