"""Outbound DICOM: C-ECHO and C-STORE of spooled Part 10 files to a peer, bytes sent as stored.

An instance goes out decoded into an uncompressed syntax only when the peer refuses its own
(`send_files`); otherwise its bytes are streamed exactly as they were received.

Every function blocks; callers run them in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from hie_imaging.dicom import command, sop
from hie_imaging.dicom.filemeta import FileMetaError, read_file_meta
from hie_imaging.dicom.transcode import TranscodeError, transcode
from hie_platform.dicom_reactor import request_association

LOGGER = logging.getLogger(__name__)


class _UnreachablePeerLines(logging.Filter):
    """pynetdicom logs two ERROR lines each time a peer cannot be reached. During a PACS outage that is
    two errors per retry (458 in four one-minute outages); the relay reports the destination's state
    change once instead (hie_imaging.relay) and counts the retries (hie_imaging_relay_retries_total)."""

    QUIET = ("Association request failed: unable to connect", "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.QUIET)


logging.getLogger("pynetdicom.transport").addFilter(_UnreachablePeerLines())

# pynetdicom binds four "standard" logging handlers to every association (EVT_PDU_SENT/RECV,
# EVT_DIMSE_SENT/RECV) unless told otherwise: each PDU and each DIMSE message then builds an Event
# and a multi-line dump of the message (pydicom attribute reads, UID name lookups) whatever the log
# level, 3-4 % of a gateway's CPU, and at INFO four pynetdicom lines per C-STORE per hop. The
# gateway logs its own lines (per association, per relay batch); pynetdicom's warnings and errors
# (association refused, aborted, DIMSE timeouts) do not come from these handlers and stay.
_config.LOG_HANDLER_LEVEL = "none"
# C-STORE command sets without pydicom datasets (dicom/command.py), on both legs.
command.install()

MAX_PDU_BYTES = 128 * 1024
# PS3.8 §9.3.2.2: context IDs are odd numbers 1-255, so one association carries at most 128.
MAX_PRESENTATION_CONTEXTS = 128

# What an instance is sent in when the peer refuses its own syntax, in this order (explicit VR keeps
# the VRs of private elements). Only ever these: the fallback decompresses, it never re-compresses.
FALLBACK_SYNTAXES: Final[tuple[UID, ...]] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True, slots=True)
class DicomEndpoint:
    """A peer Application Entity: who it says it is and where it listens."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class SendResult(dict[str, int]):
    """SOP Instance UID -> DIMSE status, and which instances had to be transcoded for the peer.

    `transcoded`: instances sent (and answered) in an uncompressed syntax because the peer refused
    their own, as (original syntax, syntax sent). `untranscodable`: instances whose own syntax was
    refused and that could not be decoded (their status is 0x0122), with the reason. `withheld`:
    instances not sent because the caller's `proceed` said stop (they have no status).
    """

    def __init__(self, statuses: Mapping[str, int] | None = None) -> None:
        super().__init__(statuses or {})
        self.transcoded: dict[str, tuple[UID, UID]] = {}
        self.untranscodable: dict[str, str] = {}
        self.withheld: list[str] = []
        if isinstance(statuses, SendResult):
            self.transcoded.update(statuses.transcoded)
            self.untranscodable.update(statuses.untranscodable)
            self.withheld.extend(statuses.withheld)


class AssociationFailedError(Exception):
    """No association, or it ended early. `completed` holds statuses of instances already answered."""

    def __init__(
        self, endpoint: DicomEndpoint, reason: str, completed: Mapping[str, int] | None = None
    ) -> None:
        super().__init__(f"association with {endpoint} failed: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.completed = SendResult(completed)


class UnreadableFileError(Exception):
    """A file to send has no usable Part 10 file meta, so we cannot tell how to send it unchanged."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot send {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Outgoing:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID
    dataset_offset: int  # the dataset's bytes start here, after the file meta

    @property
    def context_key(self) -> tuple[str, str]:
        return (str(self.sop_class_uid), str(self.transfer_syntax_uid))

    @property
    def fallback_keys(self) -> tuple[tuple[str, str], ...]:
        """The contexts to propose too, in case the peer refuses `context_key`."""
        sop_class = str(self.sop_class_uid)
        return tuple((sop_class, str(ts)) for ts in FALLBACK_SYNTAXES if ts != self.transfer_syntax_uid)


def enable_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle, or each small PDU tail waits on a delayed ACK (~40 ms)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(
    endpoint: DicomEndpoint,
    calling_ae: str,
    contexts: Sequence[PresentationContext],
    timeout: float = 30,
) -> Association:
    """Open an association (128 KiB PDUs, TCP_NODELAY) or raise AssociationFailedError.

    The caller must `release()` the returned association.
    """
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    # Moderate on purpose: a stalled C-STORE (see send_files) costs at most this long before a retry.
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    connected = threading.Event()
    assoc = request_association(
        ae,
        endpoint.host,
        endpoint.port,
        endpoint.ae_title,
        contexts,
        MAX_PDU_BYTES,
        [
            (evt.EVT_CONN_OPEN, enable_tcp_nodelay),
            (evt.EVT_CONN_OPEN, lambda _event: connected.set()),
        ],
    )
    if assoc.is_established:
        return assoc
    raise AssociationFailedError(endpoint, _failure_reason(assoc, connected.is_set()))


def echo(endpoint: DicomEndpoint, calling_ae: str, timeout: float = 10) -> bool:
    """C-ECHO the peer; True only if it answered Success. Failures are logged, not raised."""
    context = build_context(sop.VERIFICATION_SOP_CLASS)
    try:
        assoc = associate(endpoint, calling_ae, [context], timeout)
    except AssociationFailedError as exc:
        LOGGER.warning("C-ECHO to %s: %s", endpoint, exc.reason)
        return False
    try:
        rsp = assoc.send_c_echo()
    except RuntimeError:  # the peer ended the association before the request went out
        return False
    else:
        return bool(rsp.get("Status") == sop.STATUS_SUCCESS)
    finally:
        _close(assoc)


def send_files(
    endpoint: DicomEndpoint,
    calling_ae: str,
    files: Sequence[Path],
    timeout: float = 30,
    proceed: Callable[[str], bool] | None = None,
) -> SendResult:
    """C-STORE each Part 10 file; return SOP Instance UID -> DIMSE status (a `SendResult`).

    Only the file meta is read (SOP class, instance, transfer syntax). Each file's own (SOP class,
    transfer syntax) pair is proposed and, for its SOP class, explicit and implicit VR little endian
    as a fallback, in the same association. Whenever the peer accepts the file's own syntax, the
    dataset goes out exactly as stored, with no decode. Only an instance whose own syntax the peer
    refuses is read with pydicom, decompressed if it is compressed, and sent in the first fallback
    syntax the peer accepted (`SendResult.transcoded`); if the peer accepted none, or the instance
    cannot be decoded (`SendResult.untranscodable`, logged), it gets 0x0122 without being sent.
    Use `sop.is_stored(status)` to judge the result. Raises UnreadableFileError before connecting if
    any file lacks file meta, and AssociationFailedError if an association is refused, rejected or
    aborted (its `completed` says which instances were already answered; resending is safe because
    stores are idempotent by SOP Instance UID). `proceed(sop_instance_uid)`, when given, is asked
    before each C-STORE (in this thread: it must be quick and thread-safe); once it says no, that
    instance and every later one are left unsent (`SendResult.withheld`) and the association is
    released, so that a consent withdrawal stops a transfer between two instances.
    """
    outgoing = [_read_meta(path) for path in files]
    # Only with this switch does pynetdicom's send_c_store(path) stream the file's dataset bytes as
    # they are; otherwise it dcmread()s the file and re-encodes it. The switch is process-wide in
    # pynetdicom 3 and the gateway never wants the re-encoding path, so we set it and leave it set.
    _config.STORE_SEND_CHUNKED_DATASET = True

    statuses = SendResult()
    batches = list(_batches(outgoing))
    for index, batch in enumerate(batches):
        if proceed is not None and not proceed(batch[0].sop_instance_uid):
            statuses.withheld.extend(item.sop_instance_uid for rest in batches[index:] for item in rest)
            break
        # The files' own contexts first, then the fallbacks; pynetdicom numbers them in this order.
        keys = dict.fromkeys(item.context_key for item in batch)
        keys.update(dict.fromkeys(key for item in batch for key in item.fallback_keys))
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in keys]
        try:
            assoc = associate(endpoint, calling_ae, contexts, timeout)
        except AssociationFailedError as exc:
            raise AssociationFailedError(endpoint, exc.reason, statuses) from None
        try:
            _send_batch(assoc, endpoint, batch, statuses, proceed)
        finally:
            _close(assoc)
        if statuses.withheld:
            statuses.withheld.extend(item.sop_instance_uid for rest in batches[index + 1 :] for item in rest)
            break
    return statuses


def _send_batch(
    assoc: Association,
    endpoint: DicomEndpoint,
    batch: list[_Outgoing],
    statuses: SendResult,
    proceed: Callable[[str], bool] | None = None,
) -> None:
    accepted = _accepted_contexts(assoc)
    transcoded: Counter[tuple[UID, UID]] = Counter()
    try:
        for position, item in enumerate(batch):
            if proceed is not None and not proceed(item.sop_instance_uid):
                statuses.withheld.extend(rest.sop_instance_uid for rest in batch[position:])
                return
            if item.context_key in accepted:
                _store(assoc, endpoint, item, accepted[item.context_key], statuses)
                continue
            target = _send_decoded(assoc, endpoint, item, accepted, statuses)
            if target is not None:
                transcoded[(item.transfer_syntax_uid, target)] += 1
    finally:
        if transcoded:
            LOGGER.info(
                "%s: transcoded %d of %d instances on this association (%s)",
                endpoint,
                transcoded.total(),
                len(batch),
                ", ".join(
                    f"{n} {source.name} -> {target.name}" for (source, target), n in transcoded.items()
                ),
            )


def _send_decoded(
    assoc: Association,
    endpoint: DicomEndpoint,
    item: _Outgoing,
    accepted: Mapping[tuple[str, str], int],
    statuses: SendResult,
) -> UID | None:
    """The peer refused the item's own syntax: send it in the first fallback syntax it accepted.

    Returns the syntax it went out in, or None when it was not sent (status 0x0122).
    """
    target = next(
        (
            ts
            for ts in FALLBACK_SYNTAXES
            if (str(item.sop_class_uid), str(ts)) in accepted and ts != item.transfer_syntax_uid
        ),
        None,
    )
    source_name, class_name = item.transfer_syntax_uid.name, item.sop_class_uid.name
    if target is None:
        LOGGER.warning("%s refused %s in %s; not sent", endpoint, class_name, source_name)
        statuses[item.sop_instance_uid] = sop.STATUS_SOP_CLASS_NOT_SUPPORTED
        return None
    if not assoc.is_established:
        raise AssociationFailedError(endpoint, "association ended by the peer", statuses)
    try:
        path = transcode(item.path, item.transfer_syntax_uid, target)
    except TranscodeError as exc:
        LOGGER.warning(
            "%s refused %s in %s and it cannot be decoded for %s; not sent: %s",
            *(endpoint, class_name, source_name, target.name, exc),
        )
        statuses[item.sop_instance_uid] = sop.STATUS_SOP_CLASS_NOT_SUPPORTED
        statuses.untranscodable[item.sop_instance_uid] = str(exc)
        return None
    try:
        decoded = _read_meta(path)
        _store(assoc, endpoint, decoded, accepted[decoded.context_key], statuses)
    finally:
        path.unlink(missing_ok=True)
    statuses.transcoded[item.sop_instance_uid] = (item.transfer_syntax_uid, target)
    return target


def _store(
    assoc: Association, endpoint: DicomEndpoint, item: _Outgoing, context_id: int, statuses: SendResult
) -> None:
    """C-STORE `item` (its dataset bytes streamed from its file as they are) on the accepted context."""
    if not assoc.is_established:
        raise AssociationFailedError(endpoint, "association ended by the peer", statuses)
    status = _c_store(assoc, context_id, item)
    if status is None:
        # No response: the peer aborted, or the DIMSE timeout passed (and we aborted); or the
        # response was invalid (pynetdicom logged it and aborted).
        reason = f"no C-STORE response (peer abort or {assoc.dimse_timeout} s DIMSE timeout)"
        raise AssociationFailedError(endpoint, reason, statuses)
    statuses[item.sop_instance_uid] = status
    if not sop.is_stored(status):
        LOGGER.warning("%s answered C-STORE with status 0x%04X", endpoint, status)


def _c_store(assoc: Association, context_id: int, item: _Outgoing) -> int | None:
    """Send one C-STORE-RQ and wait for its response: the status, or None when there was none.

    What pynetdicom 3.0.4's `send_c_store(path)` does with STORE_SEND_CHUNKED_DATASET, step for step
    (request primitive, dataset streamed from the file at its offset, the reactor paused while we
    wait, the same handling of a missing or invalid response), but with the file meta and the
    presentation context that the relay has already read and matched: pynetdicom decoded the file
    meta into a pydicom dataset again (`split_dataset`) and searched the accepted contexts for every
    instance. With another pynetdicom version, its own `send_c_store`.
    """
    # pynetdicom 3.0.4 race: send_c_store pauses the association reactor by clearing a checkpoint
    # and polling `_is_paused`, but the reactor sets `_is_paused = False` only *after* its wait()
    # returns. If the sender checks in that gap (~1 in 5,000 sends under CPU load) both threads
    # run, the reactor takes our C-STORE-RSP off the DIMSE queue, send_c_store waits out the
    # dimse_timeout and aborts, and the retry stores a duplicate at the peer. Parking the
    # reactor first closes the gap; the moderate timeout and the callers' retry remain as backup.
    _park_reactor(assoc)
    if not command.ENABLED:
        try:
            status = assoc.send_c_store(item.path).get("Status")
        except RuntimeError:  # the peer released or aborted between our check and the send
            return None
        return None if status is None else int(status)
    request = C_STORE()
    request.MessageID = 1  # send_c_store's default: one request outstanding at a time
    request.Priority = 2  # low, send_c_store's default
    request.AffectedSOPClassUID = item.sop_class_uid
    request.AffectedSOPInstanceUID = item.sop_instance_uid
    request._dataset_path = (item.path, item.dataset_offset)
    while not assoc._is_paused:  # as send_c_store; already true once the reactor is parked
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, context_id)
    _, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return None
    if not response.is_valid_response:
        assoc._check_received_status(response)  # logs it and aborts, as send_c_store does
        return None
    return int(cast(int, response.Status))


def _accepted_contexts(assoc: Association) -> dict[tuple[str, str], int]:
    """(SOP class, transfer syntax) -> the first accepted context for it in which we may send
    (SCU role), as pynetdicom's exact match picks it: files are sent only in their own syntax."""
    accepted: dict[tuple[str, str], int] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu is True and cx.context_id is not None:
            accepted.setdefault((str(cx.abstract_syntax), str(cx.transfer_syntax[0])), cx.context_id)
    return accepted


def _park_reactor(assoc: Association, timeout: float = 5.0) -> None:
    """Clear the reactor's checkpoint and wait until the reactor thread is blocked on it.

    Seeing a waiter on the checkpoint's condition (CPython's threading.Event internals) means the
    reactor is inside wait() and cannot touch the DIMSE queue until send_c_store sets it again.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    condition = getattr(checkpoint, "_cond", None)
    waiters = getattr(condition, "_waiters", None)
    if waiters is None:  # not CPython's Event: fall back on pynetdicom's own pause
        return
    deadline = time.monotonic() + timeout
    while not waiters and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0001)


def _read_meta(path: Path) -> _Outgoing:
    try:
        meta = read_file_meta(path)
    except (OSError, FileMetaError) as exc:
        raise UnreadableFileError(path, str(exc)) from exc
    return _Outgoing(
        path=path,
        sop_class_uid=meta.sop_class_uid,
        sop_instance_uid=meta.sop_instance_uid,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        dataset_offset=meta.dataset_offset,
    )


def _batches(outgoing: Sequence[_Outgoing]) -> Iterator[list[_Outgoing]]:
    """Split into runs needing at most 128 distinct contexts each, fallbacks included (one
    association per run)."""
    batch: list[_Outgoing] = []
    keys: set[tuple[str, str]] = set()
    for item in outgoing:
        needed = {item.context_key, *item.fallback_keys} - keys
        if batch and len(keys) + len(needed) > MAX_PRESENTATION_CONTEXTS:
            yield batch
            batch, keys = [], set()
        batch.append(item)
        keys |= {item.context_key, *item.fallback_keys}
    if batch:
        yield batch


def _failure_reason(assoc: Association, connected: bool) -> str:
    # pynetdicom marks a refused TCP connection as aborted too, hence the separate flag.
    if not connected:
        return "connection refused, unreachable or timed out"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        if primitive is None:
            return "rejected"
        source, diagnostic = int(primitive.result_source or 0), int(primitive.diagnostic or 0)
        permanence = "permanent" if primitive.result == 0x01 else "transient"
        detail = _REJECT_REASONS.get((source, diagnostic), f"source {source}, diagnostic {diagnostic}")
        return f"rejected ({permanence}): {detail}"
    if assoc.is_aborted:
        return "aborted by the peer"
    return f"no A-ASSOCIATE response within {assoc.acse_timeout} s"


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
