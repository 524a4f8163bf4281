"""The gateway's durable spool (hie_imaging.dicom.spool) on a real filesystem: hashed paths, atomic
writes, idempotent stores, refused UIDs, the free-space reserve."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hie_imaging.dicom.spool import InstanceNotFoundError, InvalidUidError, Spool, SpoolFullError

UID = "1.2.826.0.1.3680043.8.498.1"


def test_spool_stores_under_a_hashed_path_and_reads_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)

    path = spool.store(UID, b"first")

    assert path == spool.path(UID)
    assert UID not in str(path)
    assert path.is_relative_to(tmp_path / "spool")
    assert spool.exists(UID)
    assert spool.read(UID) == b"first"


def test_spool_store_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)

    first = spool.store(UID, b"first")
    second = spool.store(UID, b"second version")

    assert first == second
    assert spool.read(UID) == b"second version"
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == [first]


def test_spool_readers_never_see_a_half_written_instance(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    versions = (b"a" * 1_000_000, b"b" * 2_000_000)
    spool.store(UID, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        turn = 0
        while not stop.is_set():
            turn += 1
            spool.store(UID, versions[turn % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = {spool.read(UID) for _ in range(200)}
    finally:
        stop.set()
        writer.join()

    assert seen <= set(versions)


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "1.2.3/4", "1.2.3 ", "1" * 65, "1.2\x00.3", "1.2.a"])
def test_spool_refuses_what_is_not_a_uid(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)

    with pytest.raises(InvalidUidError) as failure:
        spool.store(bad, b"data")

    assert failure.value.uid == bad
    assert not (tmp_path / "spool").exists()


def test_spool_full_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.store(UID, b"kept")
    full = Spool(tmp_path / "spool", min_free_bytes=2**62)

    with pytest.raises(SpoolFullError) as failure:
        full.store(UID, b"new data")

    assert failure.value.needed == 2**62 + len(b"new data")
    assert 0 < failure.value.free < failure.value.needed
    assert full.read(UID) == b"kept"


def test_spool_delete_then_read_raises_not_found(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.store(UID, b"data")

    assert spool.delete(UID)
    assert not spool.delete(UID)
    with pytest.raises(InstanceNotFoundError):
        spool.read(UID)
