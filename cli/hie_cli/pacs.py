"""A demo PACS (storage SCP keeping what it receives in memory) and a small C-STORE sender.

Both run their associations on ``hie_platform.dicom_reactor`` (threads that wait for work), as the
imaging gateways do: with pynetdicom's own, each open association end polls twice a millisecond, and
one idle association between this PACS and a sender in the same process took 14.5 % of a core
(measured 2026-12-07 with pynetdicom 3.0.4). ``make load`` runs both beside the
federation it measures, on the same two cores.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from hie_platform.dicom_reactor import QuietRequestHandler, request_association
from hie_platform.natsd import free_port

MAX_PDU = 128 * 1024


class DemoPacs:
    """The destination hospital's PACS in the demo: accepts every storage SOP class."""

    def __init__(self, ae_title: str, host: str = "127.0.0.1") -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = free_port(host)
        self._received: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            self._received.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPInstanceUID)] = bytes(
                ds.PixelData
            )
        return 0x0000

    def start(self) -> None:
        ae = AE(self.ae_title)
        ae.maximum_pdu_size = MAX_PDU
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        # What ae.start_server(block=False) does, with associations that wait instead of polling.
        server = cast(
            ThreadedAssociationServer,
            ae.make_server(
                (self.host, self.port),
                evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, _nodelay)],
                request_handler=QuietRequestHandler,
            ),
        )
        ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"DemoPacs@{self.port}", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def received_for(self, study_uid: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._received.get(study_uid, {}))


def _nodelay(event: Any) -> None:
    # Without TCP_NODELAY a pynetdicom association crawls at ~15 instances/s on loopback.
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NO_RESPONSE = 0xFFFF  # our marker: the instance got no C-STORE response


def send_series(
    datasets: Sequence[Dataset], host: str, port: int, called_ae: str, calling_ae: str, associations: int = 3
) -> dict[str, int]:
    """C-STORE datasets; returns SOP Instance UID → DIMSE status (NO_RESPONSE if never answered).

    Like a modality or PACS, it sends again, on a new association, whatever got no response: an
    aborted association, or pynetdicom 3.0.4's send_c_store race (under CPU load a send can miss its
    response and wait out the DIMSE timeout, then the association is aborted). Stores are
    idempotent by SOP Instance UID at the gateway, so a resend never makes a second copy.
    """
    statuses: dict[str, int] = {}
    for attempt in range(associations):
        pending = [ds for ds in datasets if statuses.get(str(ds.SOPInstanceUID), NO_RESPONSE) == NO_RESPONSE]
        if not pending:
            break
        try:
            _send_once(pending, host, port, called_ae, calling_ae, statuses)
        except ConnectionError:
            if attempt == associations - 1:
                raise
    return statuses


def _send_once(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    statuses: dict[str, int],
) -> None:
    ae = AE(calling_ae)
    ae.maximum_pdu_size = MAX_PDU
    ae.dimse_timeout = 10  # a missed response costs this long before the resend
    pairs = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    contexts = [build_context(sop_class, syntax) for sop_class, syntax in sorted(pairs)]
    handlers: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, _nodelay)]
    assoc = request_association(ae, host, port, called_ae, contexts, MAX_PDU, handlers)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_ae} at {host}:{port} was not established")
    try:
        for ds in datasets:
            if not assoc.is_established:
                break  # aborted (by the peer, or by pynetdicom after a DIMSE timeout): resend the rest
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # ended between the check and the send
                break
            statuses[str(ds.SOPInstanceUID)] = int(status.Status) if "Status" in status else NO_RESPONSE
    finally:
        if assoc.is_established:
            assoc.release()
