"""The gateway's moving parts in one place: the Storage SCP, the relay worker, the exchange
consumer, the purge loop and the progress reporter, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta

from pydicom import dcmread

from hie_imaging import repository, service
from hie_imaging.callers import CallerDirectory
from hie_imaging.config import ImagingSettings
from hie_imaging.dicom import ReceivedInstance, Spool, SpoolFullError, StorageServer, sop
from hie_imaging.events import ProgressReporter, follow_exchanges
from hie_imaging.metrics import GatewayMetrics
from hie_imaging.models import Role, State
from hie_imaging.relay import RelayWorker
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.workers import Backoff, PeriodicWorker, Worker

log = get_logger(__name__)

_PURGE_BATCH = 500
_RECORD_BATCH = 256
# The recorder waits for the instances right behind the first one for as long as they keep coming
# at most _RECORD_GAP_SECONDS apart, and at most _RECORD_MAX_AGE_SECONDS in all, so that a series
# is recorded in a few transactions (each one also a flush of the outbox to JetStream) instead of
# one per C-STORE or two; the senders already have their answers (the journal).
_RECORD_GAP_SECONDS = 0.05
_RECORD_MAX_AGE_SECONDS = 0.25
_IDENTIFYING = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")


def _journal_tag(caller: service.Caller) -> str:
    """The caller, in a file name: what the recorder needs after a crash besides the file itself."""
    return "~".join(
        (caller.role.value, caller.institution or "", caller.hub or "", caller.ae_title.encode().hex())
    )


def _caller_of(tag: str) -> service.Caller:
    role, institution, hub, ae_hex = tag.split("~")
    return service.Caller(bytes.fromhex(ae_hex).decode(), Role(role), institution or None, hub or None)


class ImagingGateway:
    """Receives studies over DICOM, keeps them durably, and relays those that belong to an exchange."""

    def __init__(self, settings: ImagingSettings, runtime: Runtime, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.spool = Spool(settings.spool_dir, settings.spool_min_free_bytes)
        self.callers = CallerDirectory(
            runtime,
            settings.hub,
            settings.allowlist_refresh_seconds,
            bind_to_host=settings.bind_callers_to_host,
            on_refused=self._count_refusal,
        )
        self.reporter = ProgressReporter(runtime, settings.hub)
        self.worker = RelayWorker(settings, runtime, self.spool, self.reporter, metrics)
        self.server = StorageServer(
            settings.ae_title,
            self.callers.is_allowed,
            self.on_instance,
            maximum_associations=settings.dicom_max_associations,
            max_connections_per_peer=settings.dicom_max_connections_per_peer,
            reserved_per_caller=settings.dicom_reserved_per_caller,
            reserved_for=self.callers.registered_at,
            on_refused=self._count_refusal,
            acse_timeout=settings.dicom_request_timeout_seconds,
            network_timeout=settings.dicom_idle_timeout_seconds,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        # Arrivals answered and journalled, not yet recorded: appended by association threads, taken
        # by the recorder. Only the first arrival of a batch wakes the event loop.
        self._arrivals: list[service.Arrival] = []
        self._arrivals_lock = threading.Lock()
        self._arrived = asyncio.Event()
        self._stopping = False
        # A short backoff cap: a restart must fall within stop()'s 10 s drain (the default caps at 30 s).
        self.recorder = Worker("imaging-recorder", self._record_loop, backoff=Backoff(base=0.5, most=2.0))
        self.purger = PeriodicWorker("imaging-purge", self._purge_pass, settings.purge_interval_seconds)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.spool.remove_stale_temp_files)
        await self._recover_journal()
        async with self.runtime.db.transaction() as session:
            pending = await service.requeue_pending(session, self.runtime.outbox, self.settings.hub)
        if pending:
            log.info("queued instances resume", instances=pending)
        try:
            await self.callers.start()
            self.reporter.start()
            follow_exchanges(self.runtime, self.settings.hub, self.settings.exchange_consumer, self.reporter)
            self.worker.start()
            self.purger.start()
            self.recorder.start()
            self.server.start(self.settings.dicom_bind_host, self.settings.dicom_port)
        except BaseException:
            # Stop what started, or its loops outlive the failed start: seen with the DICOM port in
            # use, the process logged "Application startup failed" and then kept polling NATS for
            # 90 s instead of exiting (its relay and consent feed were never stopped).
            await self.stop()
            raise

    async def stop(self) -> None:
        # The SCP first (in a thread: it joins pynetdicom's), so that no C-STORE comes in after the
        # recorder has taken its last batch.
        await asyncio.to_thread(self.server.stop, 5.0)
        # Record what was answered; if the database is gone, the spool journal keeps the rest.
        self._stopping = True
        self._arrived.set()
        if not await self.recorder.wait(10.0):
            log.warning("stopped before recording every received instance; the journal keeps them")
        await self.recorder.stop()
        await self.purger.stop()
        await self.worker.stop()
        await self.callers.stop()
        await self.reporter.stop()

    def _count_refusal(self, reason: str) -> None:
        self.metrics.dicom_refused.labels(reason).inc()

    # --- receiving: runs on pynetdicom's association threads ------------------------------------

    def on_instance(self, instance: ReceivedInstance) -> int:
        """Spool with a journal entry, answer Success, and leave the recording to the recorder.

        The C-STORE handler runs in the sender's association thread, so it does only what makes the
        instance durable (one file write, two fsyncs); the database row and the relay job follow in
        batches. A crash in between loses nothing: start() records what the journal still holds.
        """
        caller = self.callers.lookup(instance.calling_ae)
        loop = self._loop
        if caller is None or loop is None:
            # Allowed when the association began, struck off the registry since.
            self.metrics.received.labels("unknown", "refused").inc()
            return sop.STATUS_PROCESSING_FAILURE
        tag = _journal_tag(caller)
        try:
            self.spool.store(instance.sop_instance_uid, instance.data, pending=tag)
        except (SpoolFullError, OSError) as exc:
            # A7xx: the sender keeps the instance and tries again later; nothing was half-written.
            log.error("C-STORE refused: spool write failed", error=str(exc))
            self.metrics.received.labels(caller.role.value, "refused").inc()
            return sop.STATUS_OUT_OF_RESOURCES
        arrival = service.Arrival(
            sop_instance_uid=instance.sop_instance_uid,
            study_instance_uid=instance.study_instance_uid,
            series_instance_uid=instance.series_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            size=len(instance.data),
            calling_ae=instance.calling_ae,
            caller=caller,
            received_at=datetime.now(UTC),
            tag=tag,
        )
        with self._arrivals_lock:
            self._arrivals.append(arrival)
            first = len(self._arrivals) == 1
        if first:  # the recorder is idle or lingering; later arrivals of its batch need no wake-up
            with contextlib.suppress(RuntimeError):  # the loop is closing: the journal keeps it
                loop.call_soon_threadsafe(self._arrived.set)
        return sop.STATUS_SUCCESS

    # --- recording: on the event loop, in batches ------------------------------------------------

    async def _record_loop(self) -> None:
        """Record arrivals in batches until stopping and none is left (the `imaging-recorder` worker:
        a crash is logged and the loop restarted). record() retries its commit, so a crash comes after
        it; the batch's journal entries, not yet removed then, are recorded again (as duplicates) at
        the next start."""
        while True:
            if not self._stopping:  # stopping: what is left goes now, also in a loop restarted then
                await self._arrived.wait()
            self._arrived.clear()
            # Linger for the instances right behind the first: a series arrives one C-STORE every
            # few milliseconds, and one transaction for many of them costs little more than one.
            started, seen = time.monotonic(), 0
            while not self._stopping:
                with self._arrivals_lock:
                    waiting = len(self._arrivals)
                if (
                    waiting >= _RECORD_BATCH
                    or waiting == seen
                    or time.monotonic() - started >= _RECORD_MAX_AGE_SECONDS
                ):
                    break
                seen = waiting
                await asyncio.sleep(_RECORD_GAP_SECONDS)
            with self._arrivals_lock:
                batch = self._arrivals[:_RECORD_BATCH]
                del self._arrivals[:_RECORD_BATCH]
                if self._arrivals:
                    self._arrived.set()
            if batch:
                await self.record(batch)
            if self._stopping and not self._arrived.is_set():
                return

    async def record(self, batch: list[service.Arrival]) -> None:
        """Record spooled instances in one transaction (retried until the database takes it)."""
        delay = 0.2
        while True:
            try:
                states = await self._commit(batch)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down or busy; the journal keeps the instances
                log.error(
                    "recording received instances failed; will retry", error=f"{type(exc).__name__}: {exc}"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await asyncio.to_thread(self.spool.settle, [(a.sop_instance_uid, a.tag) for a in batch])
        for arrival, state in zip(batch, states, strict=True):
            result = "duplicate" if state is None else "new"
            self.metrics.received.labels(arrival.caller.role.value, result).inc()
        self.reporter.touch(
            *{a.study_instance_uid for a, s in zip(batch, states, strict=True) if s is not None}
        )

    async def _commit(self, batch: list[service.Arrival]) -> list[State | None]:
        now = datetime.now(UTC)
        async with self.runtime.db.transaction() as session:
            return await service.record_instances(session, self.runtime.outbox, self.settings.hub, batch, now)

    async def _recover_journal(self) -> int:
        """Record what was answered but not recorded before a crash (the spool's incoming journal)."""
        entries = await asyncio.to_thread(self.spool.pending_entries)
        recovered = 0
        for start in range(0, len(entries), _RECORD_BATCH):
            arrivals = []
            for uid, tag in entries[start : start + _RECORD_BATCH]:
                arrival = await asyncio.to_thread(self._arrival_from_journal, uid, tag)
                if arrival is not None:
                    arrivals.append(arrival)
            if arrivals:
                await self.record(arrivals)
                recovered += len(arrivals)
        if recovered:
            log.warning("recorded instances left in the spool journal", instances=recovered)
        return recovered

    def _arrival_from_journal(self, uid: str, tag: str) -> service.Arrival | None:
        try:
            path = self.spool.restore(uid, tag)
            caller = _caller_of(tag)
            ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_IDENTIFYING))
            return service.Arrival(
                sop_instance_uid=uid,
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                size=path.stat().st_size,
                calling_ae=caller.ae_title,
                caller=caller,
                received_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
                tag=tag,
            )
        except Exception as exc:  # cannot happen for what on_instance wrote; keep the entry for a person
            log.error("spool journal entry unreadable; left in place", error=f"{type(exc).__name__}: {exc}")
            return None

    # --- purging held studies --------------------------------------------------------------------

    async def _purge_pass(self) -> None:
        await self.purge_held()

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
