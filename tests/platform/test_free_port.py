"""free_port: a port below the kernel's ephemeral range, free when chosen (hie_platform.natsd)."""

from __future__ import annotations

import socket

from hie_platform.natsd import _ephemeral_low, free_port


def test_a_free_port_is_outside_the_range_client_connections_take() -> None:
    """An outgoing connection takes its local port from the ephemeral range: a port chosen there can be
    taken by any client before the service binds it (a full run saw a gateway's DICOM port in use)."""
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), (sorted(ports), low)
    assert len(ports) > 1  # chosen at random, not one port for every caller
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # still free a moment later


def test_a_taken_port_is_never_returned() -> None:
    held = []
    try:
        for _ in range(50):
            port = free_port()
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append(sock)
        assert len({s.getsockname()[1] for s in held}) == len(held)
    finally:
        for sock in held:
            sock.close()


def test_one_process_is_never_handed_the_same_port_twice() -> None:
    """Nothing holds a port between free_port and the service's bind: a launcher that chooses a hub's
    ports one after another must not get one twice (seen in `make load`: a hub and its gateway were
    given one port). 2,000 draws from 20,000 ports would repeat about a hundred times at random."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
