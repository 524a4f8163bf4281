"""Durable on-disk spool of received DICOM instances, keyed by SOP Instance UID."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

LOGGER = logging.getLogger(__name__)

# PS3.5 §9.1: a UID is digits and dots, at most 64 characters. Anything else is refused before it
# gets anywhere near the filesystem.
_UID_PATTERN = re.compile(r"[0-9.]{1,64}")
_TEMP_PREFIX = ".tmp-"
INCOMING = "incoming"  # the journal of instances answered but not yet recorded


class SpoolError(Exception):
    """Base class for spool failures."""


class InvalidUidError(SpoolError, ValueError):
    """The value is not a DICOM UID, so it cannot name a spooled instance."""

    def __init__(self, uid: str) -> None:
        super().__init__(f"not a DICOM UID: {uid!r}")
        self.uid = uid


class SpoolFullError(SpoolError):
    """Writing would leave less free space than the spool's reserve."""

    def __init__(self, free: int, needed: int) -> None:
        super().__init__(f"spool needs {needed} bytes free (instance plus reserve), {free} available")
        self.free = free
        self.needed = needed


class InstanceNotFoundError(SpoolError, LookupError):
    """No instance with this SOP Instance UID is in the spool."""

    def __init__(self, uid: str) -> None:
        super().__init__(f"no spooled instance {uid}")
        self.uid = uid


def validate_uid(uid: str) -> str:
    """Return `uid` unchanged if it is a syntactically valid DICOM UID, else raise InvalidUidError."""
    if not _UID_PATTERN.fullmatch(uid):
        raise InvalidUidError(uid)
    return uid


class Spool:
    """Instances as Part 10 files under `root`, written atomically so a reader never sees half a file.

    Paths come from a SHA-256 of the UID (two fan-out levels keep directories small), so the same UID
    always maps to the same file and storing it again replaces the content: retries are harmless.
    """

    def __init__(self, root: Path, min_free_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes

    def path(self, sop_instance_uid: str) -> Path:
        """Return where the instance lives (or would live); does not touch the disk."""
        digest = hashlib.sha256(validate_uid(sop_instance_uid).encode("ascii")).hexdigest()
        return self.root / digest[:2] / digest[2:4] / f"{digest}.dcm"

    def exists(self, sop_instance_uid: str) -> bool:
        return self.path(sop_instance_uid).is_file()

    def store(self, sop_instance_uid: str, data: bytes, pending: str | None = None) -> Path:
        """Write `data` for the instance atomically; return its path once the bytes are durable.

        Without `pending`: temp file, fsync, rename, fsync the directory. With `pending` (an opaque
        tag without "/" or "~"), the instance is also entered in the incoming journal under that tag:
        that entry is what is made durable, so a caller may answer before recording the instance
        elsewhere; `settle()` removes the entry once it is recorded, `pending_entries()` lists those
        a crash left behind. Either way a reader never sees half a file.
        """
        target = self.path(sop_instance_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        incoming = self.root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        needed = len(data) + self.min_free_bytes
        if free < needed:
            raise SpoolFullError(free, needed)

        fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=incoming)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            if pending is None:
                os.replace(tmp_name, target)
            else:
                _link_over(tmp_name, target)
                os.replace(tmp_name, incoming / f"{sop_instance_uid}~{pending}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        # One directory fsync makes the rename (or the journal entry) durable (POSIX).
        _fsync_directory(target.parent if pending is None else incoming)
        return target

    def pending_entries(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, tag) of journal entries not yet settled, oldest first."""
        incoming = self.root / INCOMING
        if not incoming.is_dir():
            return []
        entries = []
        for entry in sorted(os.scandir(incoming), key=lambda e: e.stat().st_mtime):
            uid, sep, tag = entry.name.partition("~")
            if sep and not entry.name.startswith(_TEMP_PREFIX):
                entries.append((uid, tag))
        return entries

    def restore(self, sop_instance_uid: str, tag: str) -> Path:
        """Put a journal entry's file back at its spool path (the link may not have survived a crash)."""
        target = self.path(sop_instance_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_over(str(self.root / INCOMING / f"{sop_instance_uid}~{tag}"), target)
        return target

    def settle(self, entries: Iterable[tuple[str, str]]) -> None:
        """The instances are recorded: make their spool paths durable, then drop their journal entries."""
        entries = list(entries)
        for directory in {self.path(uid).parent for uid, _ in entries}:
            _fsync_directory(directory)
        for uid, tag in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / INCOMING / f"{uid}~{tag}")

    def read(self, sop_instance_uid: str) -> bytes:
        try:
            return self.path(sop_instance_uid).read_bytes()
        except FileNotFoundError:
            raise InstanceNotFoundError(sop_instance_uid) from None

    def delete(self, sop_instance_uid: str) -> bool:
        """Remove the instance; return False if it was not there (deleting twice is not an error)."""
        target = self.path(sop_instance_uid)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        _fsync_directory(target.parent)
        return True

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a crash left behind mid-write; call at startup, before serving."""
        removed = 0
        stale_files = [
            *self.root.glob(f"*/*/{_TEMP_PREFIX}*"),
            *self.root.glob(f"{INCOMING}/{_TEMP_PREFIX}*"),
        ]
        for stale in stale_files:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed += 1
        if removed:
            LOGGER.warning("removed %d stale spool temp files", removed)
        return removed


def _link_over(source: str, target: Path) -> None:
    """Hard-link `source` at `target`, replacing what is there (a resend of the same instance)."""
    try:
        os.link(source, target)
    except FileExistsError:
        tmp = target.with_name(f"{_TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{target.name}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.link(source, tmp)
        os.replace(tmp, target)


def _fsync_directory(directory: Path) -> None:
    """Make a rename or unlink durable: the directory entry must reach the disk too (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
