"""The relay worker: takes jobs off this hub's imaging work queue and sends the instances on.

A fetch of jobs is grouped by (study, destination) and each group goes over one association, so a
series travels as a series, not one association per instance. Every hop is idempotent by SOP
Instance UID: a job whose instance is no longer queued is acknowledged without sending.

Consent (의료법 §21-2) is decided per batch over the gateway's own consent replica (the hubs' code, in
``hie_imaging.consent``), at both gateways; between two C-STOREs the replica's watch says whether
the patient's consent changed since, and if so the rest is decided again before it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_imaging import consent, repository
from hie_imaging.config import ImagingSettings
from hie_imaging.dicom import (
    AssociationFailedError,
    DicomEndpoint,
    Spool,
    UnreadableFileError,
    is_stored,
    send_files,
)
from hie_imaging.dicom.scu import SendResult
from hie_imaging.events import ProgressReporter
from hie_imaging.metrics import GatewayMetrics
from hie_imaging.models import Instance, Role, State, StudyLink
from hie_imaging.relay_batch import Batch, Outcome, deliveries, finish, outcome_of
from hie_platform.consent_replica import ConsentWatch
from hie_platform.errors import ServiceUnavailable
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.workers import Backoff, Worker
from hie_schemas import streams, subjects
from hie_schemas.consent import Rule
from hie_schemas.envelope import Envelope
from hie_schemas.events import RelayJob

log = get_logger(__name__)

_MAX_LINGER_SECONDS = 1.0  # a steady stream of jobs still goes out at least this often
_IN_FLIGHT_RETRY_SECONDS = 1.0
_MIN_PER_ASSOCIATION = 16  # below this, another association costs more than it saves
_CONSENT_ROUNDS = 3  # a batch whose consent changes mid-transfer is decided again at most this often

Item = tuple[Instance, StudyLink]
Route = tuple[str, DicomEndpoint, State]  # study, next hop, the state reached when it stores
_AUDIT_OUTCOME = {State.BLOCKED.value: "denied", State.FAILED.value: "failure"}


class RouteError(Exception):
    """The registry does not (yet) say where this instance goes."""


class RelayWorker:
    def __init__(
        self,
        settings: ImagingSettings,
        runtime: Runtime,
        spool: Spool,
        reporter: ProgressReporter,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.spool = spool
        self.reporter = reporter
        self.metrics = metrics
        self.replica = consent.consent_replica(settings, runtime)
        self.gate = consent.consent_gate(settings, runtime, self.replica)
        self._slots = asyncio.Semaphore(settings.relay_concurrency)
        # The replica starts in the background, tried again each second until it can (NATS or the
        # database not ready yet); until it is current the central point decides (consent_source).
        self._replica_start = Worker(
            "imaging-consent-replica-start", self.replica.start, backoff=Backoff(base=1.0, most=1.0)
        )
        self._pull_loop = Worker("imaging-relay", self._run)
        self._in_flight: set[str] = set()
        self._unreachable: set[str] = set()  # destinations whose last attempt could not reach them

    def start(self) -> None:
        self._replica_start.start()
        self._pull_loop.start()

    async def stop(self) -> None:
        # The pull loop first: its batches in flight are handed back (nak) before the replica they
        # decide with stops.
        await self._pull_loop.stop()
        await self._replica_start.stop()
        await self.replica.stop()

    # --- the pull loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        """Bind the work queue's durable and pull from it (the `imaging-relay` worker: a crash is
        logged and the loop bound again after a backoff; the jobs of the batches it was sending are
        handed back first, and come again)."""
        s = self.settings
        config = ConsumerConfig(
            durable_name=s.relay_consumer, ack_wait=s.relay_ack_wait_seconds, max_ack_pending=10_000
        )
        jobs = subjects.hub_imaging_jobs(s.hub)
        sub = await self.runtime.bus.pull_subscription(
            streams.IMAGING_JOBS.name, s.relay_consumer, jobs, config
        )
        try:
            await self._pull(sub)
        finally:
            # The durable consumer stays on the server; only this binding's interest ends. Shielded:
            # Worker.stop cancels this task again every second, which would cut the unbinding short.
            with contextlib.suppress(Exception):
                await asyncio.shield(sub.unsubscribe())

    async def _pull(self, sub: JetStreamContext.PullSubscription) -> None:
        """Fetch the next batch while earlier ones are still being sent (up to relay_concurrency)."""
        batches = asyncio.Semaphore(self.settings.relay_concurrency)
        # The batches in flight: tasks of this loop, not workers (each ends with its batch).
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await batches.acquire()
                msgs = await self._fetch(sub)
                if not msgs:
                    batches.release()
                    continue
                task = asyncio.create_task(self._process_batch(msgs))
                running.add(task)

                def done(finished: asyncio.Task[None]) -> None:
                    running.discard(finished)
                    batches.release()

                task.add_done_callback(done)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _process_batch(self, msgs: list[Msg]) -> None:
        try:
            await self.process(msgs)
        except asyncio.CancelledError:
            # Shutting down mid-batch: hand the jobs back at once rather than after ack_wait.
            await asyncio.shield(finish(msgs, nak_delay=0.0))
            raise
        except Exception as exc:
            log.warning("relay batch failed; will retry", error=f"{type(exc).__name__}: {exc}")
            await finish(msgs, nak_delay=self.backoff(1))

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """The next job, then whatever follows it without a pause of `relay_linger_seconds`.

        A series arriving instance by instance is then sent as a series. (A single fetch of many
        messages would wait out its whole timeout unless the batch fills: nats-py keeps pulling.)
        """
        bus, batch, durable = self.runtime.bus, self.settings.relay_batch, self.settings.relay_consumer
        msgs = await bus.fetch(sub, 1, 5.0, durable)
        deadline = time.monotonic() + _MAX_LINGER_SECONDS
        while msgs and len(msgs) < batch and time.monotonic() < deadline:
            more = await bus.fetch(sub, batch - len(msgs), self.settings.relay_linger_seconds, durable)
            if not more:
                break
            msgs += more
        return msgs

    def backoff(self, attempts: int) -> float:
        s = self.settings
        return float(min(s.relay_backoff_max_seconds, s.relay_backoff_seconds * 2 ** max(0, attempts - 1)))

    # --- one batch -------------------------------------------------------------------------------

    async def process(self, msgs: Sequence[Msg]) -> None:
        batch = Batch()
        for msg in msgs:
            try:
                job = Envelope.from_bytes(msg.data).payload(RelayJob)
            except (ValidationError, ValueError):
                log.error("malformed relay job terminated", subject=msg.subject)
                await msg.term()
                continue
            batch.jobs.setdefault(job.sop_instance_uid, []).append(msg)
        # Batches run concurrently: an instance another batch is sending right now (a job published
        # twice, e.g. again at start-up) waits for that one to finish instead of going out twice.
        for sop_uid in [uid for uid in batch.jobs if uid in self._in_flight]:
            await finish(batch.jobs.pop(sop_uid), nak_delay=_IN_FLIGHT_RETRY_SECONDS)
        if not batch.jobs:
            return
        mine = set(batch.jobs)
        self._in_flight |= mine
        try:
            async with self.runtime.db.read_sessions() as session:
                items = await repository.queued_with_links(session, list(batch.jobs))
            for _ in range(_CONSENT_ROUNDS):
                items = await self._relay(items, batch)
                if not items:
                    break
            for row, link in items:  # consent kept changing under this batch: the jobs come back
                batch.outcomes.append(
                    Outcome(row, link, State.QUEUED, "consent changed during the transfer", attempted=False)
                )
            await self._record(batch)
        finally:
            self._in_flight -= mine
        await self._settle(batch)

    async def _relay(self, items: list[Item], batch: Batch) -> list[Item]:
        """Decide, route and send; return the items held back because consent changed meanwhile."""
        watch = self.replica.watch()  # before the decision reads the replica
        decisions = await consent.decide_links(self.gate, [link for _, link in items])
        unanswered = [d for d in (decisions or {}).values() if d.rule is Rule.DENY_CONSENT_FEED_STALE]
        self.metrics.consent_unavailable.inc(1 if decisions is None else len(unanswered))
        groups = await self._route(items, batch, decisions)
        withheld: list[Item] = []
        await asyncio.gather(
            *(
                self._send(endpoint, state, chunk, batch, watch, withheld)
                for (_, endpoint, state), group in groups.items()
                for chunk in self._chunks(group)
            )
        )
        return withheld

    def _chunks(self, group: list[Item]) -> list[list[Item]]:
        """Split a large group over several associations to the same peer (at most relay_concurrency).

        One association carries one C-STORE per round trip; a few in parallel keep the peer busy.
        """
        by_sop: dict[str, list[Item]] = {}
        for item in group:  # the rows of one instance (one per exchange) stay on one association
            by_sop.setdefault(item[0].sop_instance_uid, []).append(item)
        rows = list(by_sop.values())
        parts = max(1, min(self.settings.relay_concurrency, len(rows) // _MIN_PER_ASSOCIATION))
        size = -(-len(rows) // parts)
        return [[item for same in rows[i : i + size] for item in same] for i in range(0, len(rows), size)]

    async def _route(
        self, items: list[Item], batch: Batch, decisions: consent.Decisions | None
    ) -> dict[Route, list[Item]]:
        """Consent and destination of each queued row, grouped by study and next hop.

        Both gateways decide: the destination's withdrawal check stops what already left the origin.
        """
        groups: dict[Route, list[Item]] = {}
        for row, link in sorted(
            items, key=lambda item: (item[0].study_instance_uid, item[0].sop_instance_uid)
        ):
            decision = None if decisions is None else decisions.get(consent.decision_key(link))
            if decision is None or decision.rule is Rule.DENY_CONSENT_FEED_STALE:
                # Not a refusal of this flow: no answer yet. The instance waits, no attempt used.
                why = "consent unavailable" if decision is None else "consent: the replica is stale"
                batch.outcomes.append(Outcome(row, link, State.QUEUED, why, attempted=False))
                continue
            if not decision.permit:
                blocked = Outcome(row, link, State.BLOCKED, f"consent: {decision.rule.value}")
                blocked.rule, blocked.consent_version = decision.rule.value, decision.consent_version
                batch.outcomes.append(blocked)
                continue
            try:
                endpoint, final = await self._destination(row, link)
            except RouteError as exc:
                batch.outcomes.append(Outcome(row, link, State.QUEUED, str(exc)))
                continue
            groups.setdefault((row.study_instance_uid, endpoint, final), []).append((row, link))
        return groups

    async def _destination(self, row: Instance, link: StudyLink) -> tuple[DicomEndpoint, State]:
        """The next hop: the recipient hub's gateway, or the recipient's PACS when it is ours."""
        registry = self.runtime.registry
        try:
            if row.role == Role.ORIGIN and link.to_hub != self.settings.hub:
                hub = await registry.hub(link.to_hub)
                if hub is None or hub.gateway is None:
                    raise RouteError(f"hub {link.to_hub} has no imaging gateway in the registry")
                gw = hub.gateway
                return DicomEndpoint(gw.ae_title, gw.host, gw.port), State.RELAYED
            inst = await registry.institution(link.to_institution)
        except ServiceUnavailable as exc:
            raise RouteError(exc.diagnostics) from exc
        if inst is None or inst.dicom is None:
            raise RouteError(f"institution {link.to_institution} has no DICOM endpoint in the registry")
        return DicomEndpoint(inst.dicom.ae_title, inst.dicom.host, inst.dicom.port), State.DELIVERED

    async def _send(
        self,
        endpoint: DicomEndpoint,
        final: State,
        group: list[Item],
        batch: Batch,
        watch: ConsentWatch,
        withheld: list[Item],
    ) -> None:
        """Send one group's distinct instances over one association (several, past 128 contexts).

        Before each C-STORE the watch is asked whether the consent of that instance's patient changed
        since the batch was decided; from the first that did, the rest is held back (`withheld`) and
        decided again. At most the C-STORE already on the wire completes after a withdrawal applies.
        """
        files, missing = [], set()
        for sop_uid in dict.fromkeys(row.sop_instance_uid for row, _ in group):
            path = self.spool.path(sop_uid)
            if path.is_file():
                files.append(path)
            else:
                missing.add(sop_uid)
        statuses = SendResult()
        error: str | None = None
        started = time.perf_counter()
        proceed = consent.unchanged(watch, ((row.sop_instance_uid, link.patient_key) for row, link in group))
        if files:
            async with self._slots:
                started = time.perf_counter()
                try:
                    statuses = await asyncio.to_thread(
                        send_files,
                        endpoint,
                        self.settings.ae_title,
                        files,
                        proceed=proceed,
                    )
                    self.metrics.associations.labels("ok").inc()
                    self._reached(endpoint, None)
                except AssociationFailedError as exc:
                    statuses, error = exc.completed, exc.reason
                    self.metrics.associations.labels("failed").inc()
                    self._reached(endpoint, exc.reason)
                except UnreadableFileError as exc:
                    error = str(exc)
        for row, link in group:
            if row.sop_instance_uid in statuses.withheld:
                withheld.append((row, link))
            else:
                batch.outcomes.append(outcome_of(row, link, endpoint, final, statuses, missing, error))
        self._count(endpoint, len(files), statuses, error, time.perf_counter() - started)

    def _count(
        self, endpoint: DicomEndpoint, files: int, statuses: SendResult, error: str | None, seconds: float
    ) -> None:
        stored = sum(1 for sop_uid in statuses if is_stored(statuses[sop_uid]))
        held_back = len(statuses.withheld)
        self.metrics.sent.labels("stored").inc(stored)
        self.metrics.sent.labels("failed").inc(files - stored - held_back)
        self.metrics.withheld.inc(held_back)
        # Each association that transcoded has logged a line of its own (hie_imaging.dicom.scu).
        self.metrics.transcoded.labels("sent").inc(len(statuses.transcoded))
        self.metrics.transcoded.labels("failed").inc(len(statuses.untranscodable))
        if error:
            log.info("relay attempt failed", endpoint=str(endpoint), error=error, instances=files)
        elif files:
            log.info(
                "sent",
                endpoint=str(endpoint),
                instances=files,
                stored=stored,
                transcoded=len(statuses.transcoded),
                withheld=held_back,
                ms=round(seconds * 1000, 1),
            )

    def _reached(self, endpoint: DicomEndpoint, error: str | None) -> None:
        """One WARNING when a destination stops answering and one when it answers again; the attempts
        in between are counted (hie_imaging_relay_retries_total), not logged as errors each time."""
        key = str(endpoint)
        if error is not None:
            self.metrics.retries.labels(key).inc()
            if key not in self._unreachable:
                self._unreachable.add(key)
                log.warning("destination unreachable; relaying again with backoff", endpoint=key, error=error)
        elif key in self._unreachable:
            self._unreachable.discard(key)
            log.warning("destination reachable again", endpoint=key)
        self.metrics.unreachable.set(len(self._unreachable))

    async def _record(self, batch: Batch) -> None:
        """Write every outcome, and one audit record per exchange and result, in one transaction."""
        if not batch.outcomes:
            return
        now = datetime.now(UTC)
        max_attempts = self.settings.relay_max_attempts
        audits: dict[tuple[str, str], list[Outcome]] = {}
        # Rows with the same outcome move in one UPDATE (a delivered series is one statement).
        same: dict[tuple[str, State, int, str | None], list[str]] = {}
        for o in batch.outcomes:
            attempts = o.row.attempts + (1 if o.attempted and o.state is State.QUEUED else 0)
            if o.state is State.QUEUED and attempts >= max_attempts:
                o.state = State.FAILED
            o.row.attempts = attempts
            same.setdefault((o.row.exchange_id, o.state, attempts, o.error), []).append(
                o.row.sop_instance_uid
            )
            if o.state is not State.QUEUED:
                audits.setdefault((o.link.exchange_id, o.state.value), []).append(o)
        async with self.runtime.db.transaction() as session:
            for (exchange_id, state, attempts, error), sop_uids in same.items():
                await repository.set_outcomes(
                    session, sop_uids, exchange_id, state, now, attempts=attempts, error=error
                )
            for (_exchange, result), outcomes in audits.items():
                await self._audit(session, result, outcomes)
        self.reporter.touch(*{o.row.study_instance_uid for o in batch.outcomes})
        blocked = [o for o in batch.outcomes if o.state is State.BLOCKED]
        self.metrics.blocked.inc(len(blocked))
        # The sending PACS was answered Success (store-and-forward): per sender, what it cannot see.
        for sender, count in Counter(o.row.sender_institution or o.row.calling_ae for o in blocked).items():
            self.metrics.blocked_by_sender.labels(sender).inc(count)

    async def _audit(self, session: AsyncSession, state: str, outcomes: list[Outcome]) -> None:
        link = outcomes[0].link
        await self.runtime.audit.record(
            session,
            action=f"imaging.{state}",
            actor=None,
            outcome=_AUDIT_OUTCOME.get(state, "success"),
            patient_key=link.patient_key,
            purpose=link.purpose,
            rule=outcomes[0].rule,
            consent_version=outcomes[0].consent_version,
            detail={
                "exchange_id": link.exchange_id,
                "from_institution": link.from_institution,
                "to_institution": link.to_institution,
                "studies": sorted({o.row.study_instance_uid for o in outcomes}),
                "instances": len(outcomes),
            }
            | consent.emergency_detail(link),
        )

    async def _settle(self, batch: Batch) -> None:
        """Ack what is done; nak (with backoff) the jobs of instances that must be tried again."""
        retry: dict[str, float] = {}
        for o in batch.outcomes:
            if o.state is State.QUEUED:
                delay = self.backoff(o.row.attempts) if o.attempted else self.backoff(deliveries(batch, o))
                retry[o.row.sop_instance_uid] = max(retry.get(o.row.sop_instance_uid, 0.0), delay)
        for sop_uid, msgs in batch.jobs.items():
            first, *duplicates = msgs
            await finish(duplicates, nak_delay=None)
            await finish([first], nak_delay=retry.get(sop_uid))
