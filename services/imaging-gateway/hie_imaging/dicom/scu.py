"""Outbound DICOM: C-ECHO and C-STORE of spooled Part 10 files to a peer, bytes sent as stored.

Every function blocks; callers run them in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from hie_imaging.dicom import sop
from hie_imaging.dicom.reactor import request_association

LOGGER = logging.getLogger(__name__)

MAX_PDU_BYTES = 128 * 1024
# PS3.8 §9.3.2.2: context IDs are odd numbers 1-255, so one association carries at most 128.
MAX_PRESENTATION_CONTEXTS = 128

# PS3.8 Table 9-21 (A-ASSOCIATE-RJ) reason codes, keyed by (source, diagnostic).
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


class AssociationFailedError(Exception):
    """No association, or it ended early. `completed` holds statuses of instances already answered."""

    def __init__(self, endpoint: DicomEndpoint, reason: str, completed: dict[str, int] | None = None) -> None:
        super().__init__(f"association with {endpoint} failed: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.completed: dict[str, int] = dict(completed or {})


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

    @property
    def context_key(self) -> tuple[str, str]:
        return (str(self.sop_class_uid), str(self.transfer_syntax_uid))


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
) -> dict[str, int]:
    """C-STORE each Part 10 file unchanged; return SOP Instance UID -> DIMSE status.

    Only the file meta is read (SOP class, instance, transfer syntax); exactly those (SOP class,
    transfer syntax) pairs are proposed, so the dataset goes out in the syntax it was received in,
    with no decode and no transcode. A pair the peer refuses gets 0x0122 without being sent.
    Use `sop.is_stored(status)` to judge the result. Raises UnreadableFileError before connecting if
    any file lacks file meta, and AssociationFailedError if an association is refused, rejected or
    aborted (its `completed` says which instances were already answered; resending is safe because
    stores are idempotent by SOP Instance UID).
    """
    outgoing = [_read_meta(path) for path in files]
    # Only with this switch does pynetdicom's send_c_store(path) stream the file's dataset bytes as
    # they are; otherwise it dcmread()s the file and re-encodes it. The switch is process-wide in
    # pynetdicom 3 and the gateway never wants the re-encoding path, so we set it and leave it set.
    _config.STORE_SEND_CHUNKED_DATASET = True

    statuses: dict[str, int] = {}
    for batch in _batches(outgoing):
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in _unique_contexts(batch)]
        try:
            assoc = associate(endpoint, calling_ae, contexts, timeout)
        except AssociationFailedError as exc:
            raise AssociationFailedError(endpoint, exc.reason, statuses) from None
        try:
            _send_batch(assoc, endpoint, batch, statuses)
        finally:
            _close(assoc)
    return statuses


def _send_batch(
    assoc: Association, endpoint: DicomEndpoint, batch: list[_Outgoing], statuses: dict[str, int]
) -> None:
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    for item in batch:
        if item.context_key not in accepted:
            LOGGER.warning(
                "%s refused %s in %s; not sent",
                endpoint,
                item.sop_class_uid.name,
                item.transfer_syntax_uid.name,
            )
            statuses[item.sop_instance_uid] = sop.STATUS_SOP_CLASS_NOT_SUPPORTED
            continue
        if not assoc.is_established:
            raise AssociationFailedError(endpoint, "association ended by the peer", statuses)
        # pynetdicom 3.0.4 race: send_c_store pauses the association reactor by clearing a checkpoint
        # and polling `_is_paused`, but the reactor sets `_is_paused = False` only *after* its wait()
        # returns. If the sender checks in that gap (~1 in 5,000 sends under CPU load) both threads
        # run, the reactor takes our C-STORE-RSP off the DIMSE queue, send_c_store waits out the
        # dimse_timeout and aborts, and the retry stores a duplicate at the peer. Parking the
        # reactor first closes the gap; the moderate timeout and the callers' retry remain as backup.
        _park_reactor(assoc)
        try:
            rsp = assoc.send_c_store(item.path)
        except RuntimeError:  # the peer released or aborted between our check and the send
            raise AssociationFailedError(endpoint, "association ended by the peer", statuses) from None
        status = rsp.get("Status")
        if status is None:
            # pynetdicom returns an empty response both when the peer aborts and on DIMSE timeout.
            reason = f"no C-STORE response (peer abort or {assoc.dimse_timeout} s DIMSE timeout)"
            raise AssociationFailedError(endpoint, reason, statuses)
        statuses[item.sop_instance_uid] = int(status)
        if not sop.is_stored(int(status)):
            LOGGER.warning("%s answered C-STORE with status 0x%04X", endpoint, int(status))


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
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        raise UnreadableFileError(path, str(exc)) from exc
    required = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    missing = [keyword for keyword in required if keyword not in meta]
    if missing:
        raise UnreadableFileError(path, f"file meta lacks {', '.join(missing)}")
    return _Outgoing(
        path=path,
        sop_class_uid=UID(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=UID(meta.TransferSyntaxUID),
    )


def _unique_contexts(batch: Sequence[_Outgoing]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(item.context_key for item in batch))


def _batches(outgoing: Sequence[_Outgoing]) -> Iterator[list[_Outgoing]]:
    """Split into runs needing at most 128 distinct contexts each (one association per run)."""
    batch: list[_Outgoing] = []
    keys: set[tuple[str, str]] = set()
    for item in outgoing:
        if item.context_key not in keys and len(keys) == MAX_PRESENTATION_CONTEXTS:
            yield batch
            batch, keys = [], set()
        batch.append(item)
        keys.add(item.context_key)
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
