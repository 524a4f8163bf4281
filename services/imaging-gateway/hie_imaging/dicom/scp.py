"""Inbound DICOM: a C-ECHO/C-STORE SCP that hands each received instance over byte for byte."""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import cast

from pydicom import dcmread
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from hie_imaging.dicom import sop
from hie_imaging.dicom.admission import (
    ConnectionGate,
    GatedAssociationServer,
    GatedRequestHandler,
    OnRefused,
    ReservedFor,
)
from hie_imaging.dicom.scu import MAX_PDU_BYTES, enable_tcp_nodelay
from hie_imaging.dicom.spool import InvalidUidError, SpoolFullError, validate_uid
from hie_imaging.dicom.structure import IncompleteDatasetError, check_complete, read_identifiers

LOGGER = logging.getLogger(__name__)

IsAllowed = Callable[[str, str], bool]
"""(calling AE title, peer IP address) -> may this peer associate? Asked once per association."""

OnInstance = Callable[["ReceivedInstance"], int]
"""Takes one received instance, returns the DIMSE status for the sender. Called from association
threads, possibly concurrently, so it must be thread-safe."""

# PS3.8 §9.3.4 A-ASSOCIATE-RJ (result, source, diagnostic).
_REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
_REJECT_TRY_LATER = (0x02, 0x01, 0x01)  # transient, service user, no reason given
_UNLIMITED = 1 << 30

_IDENTIFYING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """One C-STORE as received: who sent it, what it is, and the Part 10 file bytes (meta included)."""

    calling_ae: str
    peer_address: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    data: bytes = field(repr=False)


class StorageServer:
    """The gateway's Storage SCP (PS3.4 Annex B) and Verification SCP, on pynetdicom threads.

    Calling AE titles are checked by `is_allowed` at association time, so an allow-list fed from the
    registry takes effect for the next association without a restart. Connections take a slot from
    `gate` when they are accepted (admission.py): `maximum_associations` shared ones, at most
    `max_connections_per_peer` of them per source address, and `reserved_per_caller` more for each
    registered caller whose host is that address (`reserved_for`).
    """

    def __init__(
        self,
        ae_title: str,
        is_allowed: IsAllowed,
        on_instance: OnInstance,
        *,
        require_called_aet: bool = True,
        maximum_associations: int = 16,
        max_connections_per_peer: int = 8,
        reserved_per_caller: int = 1,
        reserved_for: ReservedFor | None = None,
        on_refused: OnRefused | None = None,
        acse_timeout: float = 5,
        dimse_timeout: float = 60,
        network_timeout: float = 60,
    ) -> None:
        self.ae_title = ae_title
        self._is_allowed = is_allowed
        self._on_instance = on_instance
        # Connection slots are counted by the gate at accept (admission.py), not by pynetdicom,
        # whose own count (every thread, associated or not, against one limit) is kept out of play.
        self.gate = ConnectionGate(
            shared=maximum_associations,
            per_peer=min(max_connections_per_peer, maximum_associations),
            reserved=reserved_per_caller,
            reserved_for=reserved_for or (lambda _address: 0),
            on_refused=on_refused,
        )
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_pdu_size = MAX_PDU_BYTES
        self._ae.maximum_associations = _UNLIMITED
        self._ae.require_called_aet = require_called_aet
        # Also the time a new connection has to send its whole A-ASSOCIATE-RQ (pynetdicom's ARTIM
        # and its wait for the request); a silent connection is closed after it.
        self._ae.acse_timeout = acse_timeout
        self._ae.dimse_timeout = dimse_timeout
        self._ae.network_timeout = network_timeout
        for sop_class in sop.STORAGE_SOP_CLASSES:
            self._ae.add_supported_context(sop_class, list(sop.TRANSFER_SYNTAXES))
        self._ae.add_supported_context(sop.VERIFICATION_SOP_CLASS, list(sop.TRANSFER_SYNTAXES[:2]))
        self._server: GatedAssociationServer | None = None

    def start(self, host: str, port: int, ae_title: str | None = None) -> None:
        """Listen on (host, port); port 0 picks a free port (see `address`). Returns at once."""
        if self._server is not None:
            raise RuntimeError("StorageServer is already running")
        if ae_title is not None:
            self.ae_title = ae_title
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, enable_tcp_nodelay),
            (evt.EVT_REQUESTED, _handle_requested, [self._is_allowed]),
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, _handle_store, [self._on_instance]),
        ]
        # What ae.start_server(block=False) does, with associations that wait instead of polling.
        server = cast(
            GatedAssociationServer,
            self._ae.make_server(
                (host, port),
                ae_title=self.ae_title,
                evt_handlers=handlers,
                server_class=GatedAssociationServer,
                request_handler=GatedRequestHandler,
                gate=self.gate,
                socket_timeout=self._ae.network_timeout,
            ),
        )
        self._ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{port}", daemon=True).start()
        self._server = server
        LOGGER.info("DICOM SCP %s listening on %s:%d", self.ae_title, *self.address)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._server is None:
            raise RuntimeError("StorageServer is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def active_associations(self) -> list[Association]:
        """Associations being served right now (for health, metrics and tests)."""
        return [] if self._server is None else list(self._server.active_associations)

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop listening, give open associations `grace_seconds` to finish, then abort the rest.

        An aborted sender retries; stores are idempotent by SOP Instance UID, so nothing is lost.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        for assoc in server.active_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in server.active_associations:
            LOGGER.warning("aborting association from %s on shutdown", assoc.requestor.ae_title)
            assoc.abort()
        LOGGER.info("DICOM SCP %s stopped", self.ae_title)


def _handle_requested(event: Event, is_allowed: IsAllowed) -> None:
    """EVT_REQUESTED: reject before negotiation unless the calling AE is allowed from this address.

    pynetdicom skips its own negotiation when a handler of this event has already sent an
    A-ASSOCIATE-RJ (Association.run_reactor checks `is_rejected`; pydicom/pynetdicom#408).
    Exceptions in notification handlers are only logged by pynetdicom, which would let the
    association through, so this handler must never raise: it fails closed.
    """
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling_ae = primitive.calling_ae_title.strip() if primitive is not None else ""
    peer_address = assoc.requestor.address
    try:
        allowed = is_allowed(calling_ae, peer_address)
        reject = None if allowed else _REJECT_UNKNOWN_CALLING_AE
    except Exception:
        LOGGER.exception("allow-list check failed for %r at %s; rejecting", calling_ae, peer_address)
        reject = _REJECT_TRY_LATER
    if reject is not None:
        LOGGER.warning("rejected association from %r at %s", calling_ae, peer_address)
        assoc.acse.send_reject(*reject)
        # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is on the wire and the
        # connection is closed. Returning at once lets pynetdicom shut the socket down before the
        # queued RJ PDU is written, and the peer sees an abort instead of the reason.
        assoc.kill()


def _handle_echo(event: Event) -> int:
    return sop.STATUS_SUCCESS


def _handle_store(event: Event, on_instance: OnInstance) -> int:
    """EVT_C_STORE: pass the instance on exactly as received; the pixel data is never decoded."""
    try:
        calling_ae = event.assoc.requestor.ae_title.strip()
        peer_address = event.assoc.requestor.address
        request = cast(C_STORE, event.request)
        stream = cast(BytesIO, request.DataSet).getvalue()  # the dataset as it came off the wire
        affected_class = str(request.AffectedSOPClassUID)
        affected_instance = str(request.AffectedSOPInstanceUID)
        syntax = UID(str(event.context.transfer_syntax))
        status, uids = _identify(stream, syntax, affected_class, affected_instance)
        if status == sop.STATUS_SUCCESS:
            status = _check_complete(stream, syntax)
        if status != sop.STATUS_SUCCESS:
            LOGGER.warning("C-STORE from %r at %s refused with 0x%04X", calling_ae, peer_address, status)
            return status
        instance = ReceivedInstance(
            calling_ae=calling_ae,
            peer_address=peer_address,
            sop_class_uid=uids["SOPClassUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            transfer_syntax_uid=str(syntax),
            data=part10(stream, uids["SOPClassUID"], uids["SOPInstanceUID"], syntax, calling_ae),
        )
        return on_instance(instance)
    except SpoolFullError as exc:
        # A7xx tells the sender to try again later; C211 would read as a hard failure.
        LOGGER.error("C-STORE refused, spool full: %s", exc)
        return sop.STATUS_OUT_OF_RESOURCES
    except Exception:
        LOGGER.exception("C-STORE handler failed")
        return sop.STATUS_PROCESSING_FAILURE


def part10(dataset: bytes, sop_class: str, sop_instance: str, syntax: str, source_ae: str) -> bytes:
    """A Part 10 file around the dataset bytes: preamble, "DICM", file meta (PS3.10 §7.1).

    Written by hand rather than through pydicom (event.encoded_dataset): this runs for every
    C-STORE, and a pydicom FileMetaDataset costs more than the rest of the handler together.
    """
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _uid_value(sop_class)),
            _meta_element(0x0003, b"UI", _uid_value(sop_instance)),
            _meta_element(0x0010, b"UI", _uid_value(syntax)),
            _meta_element(0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
            _meta_element(0x0013, b"SH", _text_value(PYNETDICOM_IMPLEMENTATION_VERSION)),
            _meta_element(0x0016, b"AE", _text_value(source_ae)),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\x00" * 128, b"DICM", group_length, elements, dataset))


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR little endian; OB (and the other long VRs) has 2 reserved bytes and a 4-byte length.
    if vr == b"OB":
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_value(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _check_complete(dataset: bytes, syntax: UID) -> int:
    """Walk every element header to the end of the dataset (values skipped, never decoded).

    A dataset that does not parse into whole elements (cut inside the pixel data, a sequence or
    item overrunning the data, a missing delimiter, a truncated deflate stream) is 0xC210: PS3.4
    Annex B.2.3's "Cannot understand" (Cxxx) is the failure for a dataset the SCP cannot parse into
    elements; 0xA900 is for a well-formed dataset of another SOP class than the request names.
    """
    try:
        check_complete(dataset, syntax)
    except IncompleteDatasetError as exc:
        LOGGER.warning("C-STORE dataset is incomplete: %s", exc)
        return sop.STATUS_CANNOT_UNDERSTAND
    return sop.STATUS_SUCCESS


def _identify(
    dataset: bytes, syntax: UID, affected_class: str, affected_instance: str
) -> tuple[int, dict[str, str]]:
    """Read only the identifying UIDs (stopping after Series Instance UID) and check them against
    the request.

    Statuses follow DCMTK's storescp: unreadable or missing identifiers are "cannot understand"
    (0xC210); a dataset whose SOP class or instance differs from the request is 0xA900.
    """
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            meta = part10(b"", affected_class, affected_instance, syntax, "")
            ds = dcmread(
                BytesIO(meta + dataset), stop_before_pixels=True, specific_tags=list(_IDENTIFYING_KEYWORDS)
            )
            uids = {keyword: str(ds.get(keyword) or "").strip() for keyword in _IDENTIFYING_KEYWORDS}
        else:
            # Every other syntax encodes the dataset itself in little endian (big endian for its
            # retired namesake): the element headers up to (0020,000E) are read with struct, as
            # check_complete reads them, instead of building a pydicom dataset for four values.
            found = read_identifiers(dataset, syntax)
            uids = {keyword: found.get(keyword, "") for keyword in _IDENTIFYING_KEYWORDS}
        for value in uids.values():
            validate_uid(value)
    except InvalidUidError:
        return sop.STATUS_CANNOT_UNDERSTAND, {}
    except Exception:
        LOGGER.warning("C-STORE dataset could not be parsed", exc_info=True)
        return sop.STATUS_CANNOT_UNDERSTAND, {}
    if uids["SOPClassUID"] != affected_class.strip() or uids["SOPInstanceUID"] != affected_instance.strip():
        return sop.STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, {}
    return sop.STATUS_SUCCESS, uids
