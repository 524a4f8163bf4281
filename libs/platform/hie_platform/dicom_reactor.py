"""pynetdicom associations whose two threads wait for work instead of polling every millisecond.

pynetdicom 3.0.4 runs two threads per association end: the DUL reactor (`dul.py`, sleeps
`_run_loop_delay = 0.001` s whenever it finds nothing to do, then checks its queues and the socket
with a zero-timeout `select`) and the association reactor (`association.py`, `time.sleep(0.001)`
per loop while it looks for DIMSE messages, a release or an abort). An idle association therefore
wakes about 2,000 times a second, and each hop of a relay pays up to a millisecond of latency per
PDU in each direction. On the 2-core development machine these wake-ups were most of the gateways'
CPU during a relay (the Python code itself held the GIL a fifth of the time).

`QuietAssociation` keeps pynetdicom's loops step for step and replaces only the waiting:

- the DUL reactor blocks in `select` on its socket and a wake-up socket pair, written to whenever
  another thread queues a primitive for it (a DIMSE message to send, an A-RELEASE, an A-ABORT);
- the association reactor blocks on an `Event`, set whenever the DUL queues a DIMSE message or an
  ACSE primitive for it, when its pause checkpoint is cleared (so that `send_c_store` and our
  `scu._park_reactor` find it parked at once), when it is killed and when the DUL thread ends;
- both still wake every `IDLE_WAIT` seconds without a reason, which covers pynetdicom's timers
  (ARTIM, the network idle timeout) and any state change this module does not hear about.

The class is used on both legs: `QuietRequestHandler` for the SCP (`make_server(request_handler=…)`,
pynetdicom's own hook) and `request_association` for the SCU, which do what pynetdicom's
`RequestHandler._create_association` and `AE.associate` do, with this class. Everything here is
written against pynetdicom 3.0.4 (pinned in constraints.txt); with any other version `ENABLED` is
False and both fall back on pynetdicom's own classes, so an upgrade cannot silently break a relay.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR, MODE_REQUESTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler

ENABLED = pynetdicom.__version__ == "3.0.4"
IDLE_WAIT = 0.05  # seconds a reactor sleeps when nothing woke it (pynetdicom: 0.001)


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls `notify` after each put (the put happens first, then the wake-up)."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Checkpoint(threading.Event):
    """The association reactor's pause checkpoint; clearing it wakes the reactor so it parks now."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def clear(self) -> None:
        super().clear()
        self._notify()


class QuietDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in `select` instead of sleeping 1 ms per idle loop."""

    def __init__(self, assoc: QuietAssociation) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._reactor_ident: int | None = None
        self.to_provider_queue = _NotifyingQueue(self._wake)
        # Filled by the association reactor's thread (its own wake-up is not needed there).
        self.event_queue = _NotifyingQueue(self._wake_unless_reactor)
        self.to_user_queue = _NotifyingQueue(assoc.poke)

    def _wake(self) -> None:
        # A full pair means it is already woken; a closed one, that the reactor has ended.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _wake_unless_reactor(self) -> None:
        if threading.get_ident() != self._reactor_ident:
            self._wake()

    def _wait(self) -> None:
        """Until the socket is readable, another thread queued something, or IDLE_WAIT passed."""
        readers: list[Any] = [self._wake_r]
        sock = self.socket
        raw = sock.socket if sock is not None and sock._is_connected else None
        if raw is not None:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # TLS bytes already decrypted and buffered: select would not see them
            readers.append(raw)
        timeout = IDLE_WAIT
        if self.artim_timer.timeout is not None and self.artim_timer._start_time is not None:
            timeout = min(timeout, max(0.001, self.artim_timer.remaining))
        try:
            select.select(readers, [], [], timeout)
        except (OSError, ValueError):  # the socket was closed under us; the loop finds out
            time.sleep(self._run_loop_delay)
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's `DULServiceProvider.run_reactor` with `_wait()` for the sleep."""
        self._reactor_ident = threading.get_ident()
        try:
            self._reactor_loop()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            cast(QuietAssociation, self.assoc).poke()

    def _reactor_loop(self) -> None:
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                pynetdicom.dul.LOGGER.exception("Exception in DUL.run(), aborting association")
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False


class QuietAssociation(Association):
    """A pynetdicom Association whose DUL and reactor threads wait for work (see the module doc)."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        self._activity = threading.Event()
        super().__init__(ae, mode)
        self.dul: QuietDUL = QuietDUL(self)
        self.dimse.msg_queue = _NotifyingQueue(self.poke)
        self._reactor_checkpoint = _Checkpoint(self.poke)
        self._reactor_checkpoint.set()
        # The ARTIM and network idle timers live on the DUL: set their timeouts on the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def poke(self) -> None:
        """Wake the association reactor to look at its queues and flags now."""
        self._activity.set()

    def kill(self) -> None:
        super().kill()
        self.poke()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's `Association._run_reactor`, waiting on `_activity` instead of 1 ms.

        The event is cleared before the checks, so whatever is queued after them sets it again and
        the next wait returns at once; after serving a message the loop looks again without waiting.
        """
        self._is_paused = False
        busy = True
        while not self._kill:
            if not busy:
                self._activity.wait(IDLE_WAIT)
            self._activity.clear()
            busy = False

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                busy = True
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                pynetdicom.association.LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                pynetdicom.association.LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                pynetdicom.association.LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


class BulkSocket(AssociationSocket):
    """pynetdicom's association socket, reading what has arrived in one call instead of 4 KiB ones.

    pynetdicom 3.0.4's `AssociationSocket.recv` calls `socket.recv(4096)` and extends a bytearray
    until it has the PDU: 128 calls for a 512 KB instance at each hop. Reading into a buffer of the
    requested size takes what the kernel holds at once; measured on a socket pair, 8.7 instead of
    64 µs of CPU per 128 KiB PDU. Returns early, with what it has, when the peer closes (as pynetdicom's).
    """

    def _shutdown_socket(self) -> None:
        """Shut down and close the socket, closing it even when shutdown() fails. pynetdicom 3.0.4
        closes only after a successful shutdown(), which raises ENOTCONN for a socket the peer has
        already closed (every association the acceptor ends after A-RELEASE) or that never connected
        (a refused connection): those sockets stayed open until the garbage collector found them
        (74 in one full test run, found by recording where each unclosed socket was created)."""
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buffer) as view:
            while nr_read < nr_bytes:
                received = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not received:
                    break
                nr_read += received
        del buffer[nr_read:]
        return buffer


class QuietRequestHandler(RequestHandler):
    """The SCP's per-connection handler: pynetdicom's, creating a QuietAssociation."""

    def _create_association(self) -> Association:
        if not ENABLED:
            return super()._create_association()
        assoc = QuietAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(BulkSocket(assoc, client_socket=cast(socket.socket, self.request)))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # One list for every association: pynetdicom deep-copies it each time (16 contexts of 11
        # syntaxes: 5 % of a gateway's CPU in make load's imaging op, py-spy --gil), but negotiation
        # only reads it and builds new contexts for the result (presentation.negotiate_as_acceptor).
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def request_association(
    ae: ApplicationEntity,
    host: str,
    port: int,
    ae_title: str,
    contexts: Sequence[PresentationContext],
    max_pdu: int,
    evt_handlers: Sequence[evt.EventHandlerType],
) -> Association:
    """`ae.associate(host, port, contexts, ae_title, max_pdu, evt_handlers)` with a QuietAssociation."""
    if not ENABLED:
        return ae.associate(
            host,
            port,
            contexts=list(contexts),
            ae_title=ae_title,
            max_pdu=max_pdu,
            evt_handlers=list(evt_handlers),
        )
    if not contexts:
        raise RuntimeError("At least one requested presentation context is required")
    remote_address = AddressInformation.from_addr_port(host, port)
    bind_address = ("::0", 0) if remote_address.address_family == socket.AF_INET6 else ("", 0)
    local_address = AddressInformation.from_tuple(bind_address)

    assoc = QuietAssociation(ae, MODE_REQUESTOR)
    assoc.name = f"RequestorThread@{datetime.now():%Y%m%d%H%M%S}"
    assoc.set_socket(BulkSocket(assoc, address=local_address))
    assoc.acceptor.ae_title = ae_title
    assoc.acceptor.address_info = remote_address
    assoc.requestor.address_info = local_address
    assoc.requestor.ae_title = ae.ae_title
    assoc.requestor.maximum_length = max_pdu
    assoc.requestor.implementation_class_uid = ae.implementation_class_uid
    assoc.requestor.implementation_version_name = ae.implementation_version_name

    requested = copy.deepcopy(list(contexts))
    ae._validate_requested_contexts(requested)
    for index, context in enumerate(requested):
        context.context_id = 2 * index + 1
    assoc.requestor.requested_contexts = requested

    for handler in evt_handlers:
        assoc.bind(*handler)

    assoc.request()
    if assoc.is_established:
        assoc.start()
    return assoc
