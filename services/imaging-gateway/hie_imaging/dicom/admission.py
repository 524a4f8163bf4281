"""Who gets a connection slot on the SCP, decided when the TCP connection is accepted.

pynetdicom starts two threads for every accepted connection and counts them all, associated or not,
against `maximum_associations`; an attacker with 16 silent connections used every slot. Here each
connection takes a slot before any thread starts:

- a *reserved* slot if its source address is a registered caller's host and that address holds
  fewer connections than it has reserved slots (`reserved` per registered AE at that address);
- otherwise a *shared* slot, if the address holds fewer than `per_peer` shared slots and fewer than
  `shared` are taken in all.

Anything else is refused at once with an A-ASSOCIATE-RJ (transient, local limit exceeded) and
closed (`Lingerer`). A registered peer from its registered host therefore always finds a slot, whatever other
addresses do. The slot is given back when pynetdicom shuts the connection down, or, if the
association thread died without doing so, at the next admission.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from hie_platform.dicom_reactor import QuietRequestHandler

LOGGER = logging.getLogger(__name__)

ReservedFor = Callable[[str], int]
"""(source IP address) -> how many registered callers have this address as their host."""

OnRefused = Callable[[str], None]
"""Told the reason of every refused connection or association (for a metric)."""

# PS3.8 §9.3.4: A-ASSOCIATE-RJ, transient, service provider (presentation), local limit exceeded.
_LIMIT_EXCEEDED_RJ = bytes((0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x02, 0x03, 0x02))
_LOG_EVERY_SECONDS = 10.0  # one refusal line per address and reason in this window; the metric counts all


def normalize_address(address: str) -> str:
    """An IP address in one spelling: IPv4-mapped IPv6 as IPv4, no zone index, compressed IPv6."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(eq=False)
class Ticket:
    """One accepted connection's slot."""

    address: str
    reserved: bool
    thread: Association | None = None
    released: bool = False


@dataclass
class ConnectionGate:
    """The slot accounting (thread-safe); `reserved_for` must answer at once (no I/O)."""

    shared: int
    per_peer: int
    reserved: int
    reserved_for: ReservedFor
    on_refused: OnRefused | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _tickets: set[Ticket] = field(default_factory=set)
    _logged: dict[tuple[str, str], float] = field(default_factory=dict)

    def admit(self, address: str) -> Ticket | None:
        address = normalize_address(address)
        reserved_here = self.reserved * self.reserved_for(address)
        with self._lock:
            self._sweep()
            mine = [t for t in self._tickets if t.address == address]
            reserved_held = sum(t.reserved for t in mine)
            if reserved_held < reserved_here:
                ticket = Ticket(address, reserved=True)
            elif len(mine) - reserved_held >= self.per_peer:
                self._note(address, "peer-limit", logging.WARNING)
                return None
            elif sum(not t.reserved for t in self._tickets) >= self.shared:
                self._note(address, "capacity", logging.WARNING)
                return None
            else:
                ticket = Ticket(address, reserved=False)
            self._tickets.add(ticket)
            return ticket

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._release_locked(ticket)

    def held(self) -> dict[str, int]:
        """Connections holding a slot, by source address."""
        with self._lock:
            self._sweep()
            counts: dict[str, int] = {}
            for ticket in self._tickets:
                counts[ticket.address] = counts.get(ticket.address, 0) + 1
            return counts

    def _release_locked(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._tickets.discard(ticket)
        assoc = ticket.thread
        if assoc is not None and assoc.requestor.primitive is None:
            # Closed without a whole A-ASSOCIATE-RQ: pynetdicom's ACSE timeout (or the peer gave up).
            self._note(ticket.address, "no-association-request", logging.INFO)

    def _sweep(self) -> None:
        """Give back the slots of association threads that ended without shutting down (an exception
        escaped pynetdicom's reactor)."""
        for ticket in list(self._tickets):
            thread = ticket.thread
            if thread is not None and thread.ident is not None and not thread.is_alive():
                self._release_locked(ticket)

    def _note(self, address: str, reason: str, level: int) -> None:
        if self.on_refused is not None:
            with contextlib.suppress(Exception):
                self.on_refused(reason)
        now = time.monotonic()
        if now - self._logged.get((address, reason), float("-inf")) >= _LOG_EVERY_SECONDS:
            if len(self._logged) > 4096:
                self._logged.clear()
            self._logged[(address, reason)] = now
            LOGGER.log(level, "DICOM connection from %s refused or closed: %s", address, reason)


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, asking a ConnectionGate before it starts any thread."""

    # socketserver listens with a backlog of 5: a burst of connections (a flood, or many senders at
    # once) overflows it and the kernel drops SYNs, so a real peer's connect waits 1 s, 3 s... to retry.
    request_queue_size = 128

    def __init__(self, *args: Any, gate: ConnectionGate, socket_timeout: float | None, **kwargs: Any) -> None:
        self.gate = gate
        self._socket_timeout = socket_timeout
        self._held: dict[socket.socket, Ticket] = {}
        self._held_lock = threading.Lock()
        self.lingerer = Lingerer()
        super().__init__(*args, **kwargs)

    def server_close(self) -> None:
        super().server_close()
        self.lingerer.stop()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        sock = cast(socket.socket, request)
        ticket = self.gate.admit(str(client_address[0]))
        if ticket is None:
            self.lingerer.reject(sock)
            return False
        # Accepted sockets block without a timeout: a peer that stops in the middle of a PDU would
        # hold pynetdicom's DUL thread in recv() for ever. With one, that recv fails and the DUL aborts.
        sock.settimeout(self._socket_timeout)
        with self._held_lock:
            # Slots the gate took back itself (a dead association thread): forget their sockets.
            for stale in [s for s, t in self._held.items() if t.released]:
                del self._held[stale]
            self._held[sock] = ticket
        return True

    def attach(self, request: socket.socket, assoc: Association) -> None:
        """Tie `assoc` to its connection's slot, given back when pynetdicom closes the socket."""
        with self._held_lock:
            ticket = self._held.get(request)
        if ticket is not None:
            ticket.thread = assoc
            assoc.bind(evt.EVT_CONN_CLOSE, self._closed)

    def _closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE: pynetdicom closed the socket itself (an A-ABORT, its ARTIM timer)."""
        with self._held_lock:
            found = [(sock, t) for sock, t in self._held.items() if t.thread is event.assoc]
            for sock, _ in found:
                del self._held[sock]
        for _, ticket in found:
            self.gate.release(ticket)

    def shutdown_request(self, request: Any) -> None:
        """Give the slot back, and shut both directions: SHUT_WR alone (socketserver's) does not wake
        a DUL thread blocked in recv() on a peer that sent half a PDU and went quiet."""
        if self.lingerer.owns(request):
            return  # refused: the lingerer closes it
        with self._held_lock:
            ticket = self._held.pop(request, None)
        if ticket is not None:
            self.gate.release(ticket)
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)
        self.close_request(request)


class GatedRequestHandler(QuietRequestHandler):
    """QuietRequestHandler that ties the new association to its connection's slot."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        if isinstance(server, GatedAssociationServer):
            server.attach(cast(socket.socket, self.request), assoc)
        return assoc


class Lingerer:
    """Refused connections, kept for a moment after their A-ASSOCIATE-RJ on one thread of their own.

    Closing a socket with unread data makes Linux reset the connection, and a reset can destroy the
    RJ before the peer reads it (the peer's A-ASSOCIATE-RQ is usually still on its way). So each
    refused socket is read and its bytes dropped until the peer closes it or `seconds` pass; beyond
    `capacity` sockets waiting, a refused one is closed at once.
    """

    def __init__(self, seconds: float = 2.0, capacity: int = 256) -> None:
        self._seconds = seconds
        self._capacity = capacity
        self._socks: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def reject(self, sock: socket.socket) -> None:
        """Send A-ASSOCIATE-RJ (local limit exceeded) without reading the request; close it later."""
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(_LIMIT_EXCEEDED_RJ)
            sock.shutdown(socket.SHUT_WR)
        with self._lock:
            if self._stopped or len(self._socks) >= self._capacity:
                sock.close()
                return
            self._socks[sock] = time.monotonic() + self._seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="DicomRefusedLinger", daemon=True)
                self._thread.start()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def owns(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._socks

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(5)
        self._close_all()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                socks = dict(self._socks)
            now = time.monotonic()
            wait = max(0.0, min(socks.values(), default=now + 1.0) - now)
            readable, _, _ = select.select([self._wake_r, *socks], [], [], wait)
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            now = time.monotonic()
            for sock, deadline in socks.items():
                if (sock in readable and _drained(sock)) or now >= deadline:
                    with self._lock:
                        self._socks.pop(sock, None)
                    sock.close()

    def _close_all(self) -> None:
        with self._lock:
            socks, self._socks = list(self._socks), {}
        for sock in socks:
            sock.close()


def _drained(sock: socket.socket) -> bool:
    """Read and drop what is there; True once the peer has closed (or the connection failed)."""
    try:
        for _ in range(16):
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False
