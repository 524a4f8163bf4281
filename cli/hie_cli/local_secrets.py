"""The local run's data directory, locked down like a deployment: every file the owner's only, and
secrets generated per data directory (never the public placeholders in the services' defaults)."""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

SECRETS_FILE = "secrets.json"
# Child processes create their files (databases, JetStream, spools, keys, logs) with this umask.
UMASK = 0o077
# The services' placeholder secrets (config.py defaults), generated instead on first start.
GENERATED = ("patient_key_secret", "portal_session_secret", "console_session_secret")


def lock_down(data: Path) -> None:
    """Create ``data`` 0700, and bring whatever an older run left there to 0700 / 0600."""
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    data.chmod(0o700)
    for root, dirs, files in os.walk(data):
        for name in dirs:
            Path(root, name).chmod(0o700)
        for name in files:
            path = Path(root, name)
            if not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(stat.S_IMODE(path.stat().st_mode) & 0o700)


def write_private(path: Path, text: str) -> None:
    """Write a file that only the owner may read, atomically (created 0600, never readable between)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def open_log(path: Path) -> int:
    """A log file descriptor for a child (append, 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def local_secrets(data: Path, nats_users: list[str]) -> dict[str, str]:
    """The data directory's secrets, generated on first start and reused after: the services'
    secrets and one NATS password per user (``nats:<user>``). Kept in ``secrets.json`` (0600)."""
    path = data / SECRETS_FILE
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = [*GENERATED, *(f"nats:{user}" for user in nats_users)]
    missing = [name for name in wanted if name not in stored]
    for name in missing:
        stored[name] = secrets.token_urlsafe(32)
    if missing or not path.exists():
        write_private(path, json.dumps(stored, indent=2))
    return stored


LOCK_FILE = "hie.lock"


class DataDirBusy(RuntimeError):
    """Another `hie up` holds the data directory; the message names it."""


def lock_data_dir(data: Path) -> int:
    """Hold ``data`` for this process alone (an exclusive, non-blocking flock on ``hie.lock``) and
    write our pid into it. A second `hie up` on the same directory would share the NATS store and
    overwrite federation.json and the registry's addresses of the first; it is refused instead, and
    writes nothing. The lock goes with the process, however it ends (the kernel releases it)."""
    import fcntl

    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirBusy(_busy_message(data, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _busy_message(data: Path, holder: str) -> str:
    where = ""
    try:
        registry = json.loads((data / "federation.json").read_text()).get("registry_url")
        where = f" (registry {registry})" if registry else ""
    except (OSError, ValueError):
        pass
    return (
        f"{data} is in use by the federation of pid {holder}{where}; stop it first (Ctrl-C there), "
        "or run another one with --data-dir"
    )


def unlock_data_dir(data: Path, fd: int) -> None:
    """Release the lock of a clean stop (the pid is cleared so no one reads a stale one)."""
    os.ftruncate(fd, 0)
    os.close(fd)
