"""The SCP refuses a structurally incomplete dataset (cut inside its pixel data, a sequence overrunning
the data, a missing delimiter) with 0xC210 "Cannot understand" before anything is spooled, and still
takes every complete dataset byte for byte, whatever its transfer syntax.

Sent with pynetdicom through `send_files`, which streams each Part 10 file's dataset bytes as they are
(truncated files included), so the gateway sees exactly the bytes under test.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from peers import MODALITY_AE, dataset_bytes
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from hie_imaging.dicom.scp import ReceivedInstance
from hie_imaging.dicom.scu import send_files
from hie_imaging.dicom.spool import Spool
from hie_imaging.dicom.structure import MAX_DEPTH, IncompleteDatasetError, check_complete, read_identifiers

if TYPE_CHECKING:
    from conftest import MakeSeries, Recorder, RunningServer, StartGateway

CANNOT_UNDERSTAND = 0xC210
PIXEL_DATA = {True: b"\xe0\x7f\x10\x00", False: b"\x7f\xe0\x00\x10"}  # (7FE0,0010), little / big endian

NATIVE = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
ENCAPSULATED = ["SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"]
COMPLETE = [*NATIVE, *ENCAPSULATED, "image_dfl.dcm"]


@pytest.fixture
def spooling(start_gateway: StartGateway, tmp_path: Path) -> tuple[RunningServer, Spool]:
    """A StorageServer whose on_instance spools each instance (as the gateway's does) and records it."""
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    holder: list[Recorder] = []

    def on_instance(instance: ReceivedInstance) -> int:
        spool.store(instance.sop_instance_uid, instance.data)
        return holder[0](instance)

    running = start_gateway(on_instance=on_instance)
    holder.append(running.recorder)
    return running, spool


def spooled(spool: Spool) -> list[Path]:
    return [path for path in spool.root.rglob("*") if path.is_file()] if spool.root.exists() else []


def pixel_data_at(part10: bytes) -> int:
    """Offset of the top-level (7FE0,0010) header in a Part 10 file."""
    little = (
        dcmread(BytesIO(part10), stop_before_pixels=True).file_meta.TransferSyntaxUID != ExplicitVRBigEndian
    )
    offset = part10.rfind(PIXEL_DATA[little])
    assert offset > 0
    return offset


def refused_and_nothing_kept(running: RunningServer, spool: Spool, bad: Path, good: Path) -> None:
    """`bad` is refused with 0xC210 and leaves nothing behind; `good`, on the same association, is kept."""
    statuses = send_files(running.endpoint, MODALITY_AE, [bad, good])
    bad_uid, good_uid = (str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in (bad, good))
    assert statuses[bad_uid] == CANNOT_UNDERSTAND
    assert statuses[good_uid] == 0x0000
    assert list(running.recorder.by_uid()) == [good_uid]
    assert not spool.exists(bad_uid)
    assert spooled(spool) == [spool.path(good_uid)]
    assert not any((spool.root / "incoming").iterdir())


@pytest.mark.parametrize("source", NATIVE)
def test_native_pixel_data_cut_in_the_middle_is_refused(
    spooling: tuple[RunningServer, Spool], make_series: MakeSeries, tmp_path: Path, source: str
) -> None:
    running, spool = spooling
    bad, good = make_series(2, source=source)
    whole = bad.read_bytes()
    pixels = pixel_data_at(whole)
    cut = pixels + 12 + (len(whole) - pixels - 12) // 2  # half way into the pixel data value
    bad.write_bytes(whole[:cut])

    refused_and_nothing_kept(running, spool, bad, good)


@pytest.mark.parametrize("source", ENCAPSULATED)
@pytest.mark.parametrize("cut", ["inside the last fragment", "without the sequence delimiter"])
def test_encapsulated_pixel_data_cut_short_is_refused(
    spooling: tuple[RunningServer, Spool], make_series: MakeSeries, source: str, cut: str
) -> None:
    running, spool = spooling
    bad, good = make_series(2, source=source)
    whole = bad.read_bytes()
    assert whole.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # the sequence delimiter ends the file
    bad.write_bytes(whole[:-13] if cut == "inside the last fragment" else whole[:-8])

    refused_and_nothing_kept(running, spool, bad, good)


def _with_sequence(part10: bytes, declared_extra: int, keep_pixels: bool) -> bytes:
    """CT_small with a defined-length (0040,0275) sequence of one item before its pixel data, whose
    declared length exceeds its contents by `declared_extra` (0: a correct sequence)."""
    element = b"\x08\x00\x00\x01SH\x02\x00T1"  # (0008,0100) SH "T1"
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(element)) + element
    sequence = b"\x40\x00\x75\x02SQ\x00\x00" + struct.pack("<I", len(item) + declared_extra) + item
    pixels = pixel_data_at(part10)
    return part10[:pixels] + sequence + (part10[pixels:] if keep_pixels else b"")


@pytest.mark.parametrize("where", ["into the pixel data", "past the end of the data"])
def test_sequence_whose_length_overruns_is_refused(
    spooling: tuple[RunningServer, Spool], make_series: MakeSeries, where: str
) -> None:
    running, spool = spooling
    bad, good = make_series(2)
    keep_pixels = where == "into the pixel data"
    # The same sequence with its true length is a complete dataset: only the length is at fault.
    check_complete(dataset_bytes(_with_sequence(bad.read_bytes(), 0, keep_pixels)), ExplicitVRLittleEndian)
    bad.write_bytes(_with_sequence(bad.read_bytes(), 64, keep_pixels))

    refused_and_nothing_kept(running, spool, bad, good)


@pytest.mark.parametrize("source", COMPLETE)
def test_complete_datasets_are_taken_byte_for_byte(
    spooling: tuple[RunningServer, Spool], make_series: MakeSeries, source: str
) -> None:
    running, spool = spooling
    files = make_series(2, source=source)

    statuses = send_files(running.endpoint, MODALITY_AE, files)

    assert set(statuses.values()) == {0x0000}
    received = running.recorder.by_uid()
    for path in files:
        source_bytes = path.read_bytes()
        meta = dcmread(path, stop_before_pixels=True).file_meta
        instance = received[str(meta.MediaStorageSOPInstanceUID)]
        assert instance.transfer_syntax_uid == meta.TransferSyntaxUID
        assert dataset_bytes(instance.data) == dataset_bytes(source_bytes)
        assert spool.read(instance.sop_instance_uid) == instance.data


# --- the walker on its own -----------------------------------------------------------------------


def _dataset(source: str) -> tuple[bytes, str]:
    path = get_testdata_file(source)
    assert path is not None
    part10 = Path(path).read_bytes()
    return dataset_bytes(part10), str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("source", COMPLETE)
def test_every_cut_after_the_pixel_data_header_is_refused(source: str) -> None:
    data, syntax = _dataset(source)
    check_complete(data, syntax)
    if syntax == DeflatedExplicitVRLittleEndian:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        inflate.decompress(data)
        stream_end = len(data) - len(inflate.unused_data)  # bytes after the deflate stream are not data
        cuts = range(1, stream_end)
    else:
        little = syntax != ExplicitVRBigEndian
        start = data.rfind(PIXEL_DATA[little])
        assert start > 0
        cuts = range(start + 1, len(data), max(1, (len(data) - start) // 500))
    for cut in cuts:
        with pytest.raises(IncompleteDatasetError):
            check_complete(data[:cut], syntax)


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", *tag) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value


ITEM_UNDEFINED = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
LEAF = b"\x08\x00\x00\x01SH\x02\x00T1"


def _undefined_sequence(body: bytes, vr: bytes = b"SQ") -> bytes:
    return (
        b"\x40\x00\x75\x02"
        + vr
        + b"\x00\x00\xff\xff\xff\xff"
        + ITEM_UNDEFINED
        + body
        + ITEM_END
        + SEQUENCE_END
    )


def test_undefined_length_sequences_and_items_need_their_delimiters() -> None:
    whole = LEAF + _undefined_sequence(LEAF) + _element((0x0040, 0x0276), b"UT", b"ok")
    check_complete(whole, ExplicitVRLittleEndian)
    without_item_end = whole.replace(ITEM_END, b"")
    without_sequence_end = whole.replace(SEQUENCE_END, b"")
    for broken in (without_item_end, without_sequence_end, whole[:-16]):
        with pytest.raises(IncompleteDatasetError):
            check_complete(broken, ExplicitVRLittleEndian)


def test_un_of_undefined_length_is_walked_as_implicit_vr() -> None:
    implicit_leaf = b"\x08\x00\x00\x01\x02\x00\x00\x00T1"
    whole = LEAF + _undefined_sequence(implicit_leaf, vr=b"UN")
    check_complete(whole, ExplicitVRLittleEndian)
    with pytest.raises(IncompleteDatasetError):
        check_complete(whole[:-9], ExplicitVRLittleEndian)


def test_un_of_undefined_length_in_big_endian_is_walked_as_implicit_little_endian() -> None:
    leaf_be = b"\x00\x08\x01\x00SH\x00\x02T1"
    items_le = ITEM_UNDEFINED + b"\x08\x00\x00\x01\x02\x00\x00\x00T1" + ITEM_END + SEQUENCE_END
    whole = leaf_be + b"\x00\x40\x02\x75UN\x00\x00\xff\xff\xff\xff" + items_le + leaf_be
    check_complete(whole, ExplicitVRBigEndian)
    with pytest.raises(IncompleteDatasetError):
        check_complete(whole[: -len(leaf_be) - 3], ExplicitVRBigEndian)


def test_implicit_vr_sequences_are_walked() -> None:
    leaf = b"\x08\x00\x00\x01\x02\x00\x00\x00T1"
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(leaf)) + leaf
    sequence = b"\x40\x00\x75\x02" + struct.pack("<I", len(item)) + item
    undefined = b"\x40\x00\x76\x02\xff\xff\xff\xff" + ITEM_UNDEFINED + leaf + ITEM_END + SEQUENCE_END
    check_complete(leaf + sequence + undefined, ImplicitVRLittleEndian)
    # Implicit VR cannot tell a sequence from a value: a defined length is skipped as a value.
    with pytest.raises(IncompleteDatasetError):
        check_complete(leaf + sequence + undefined[:-8], ImplicitVRLittleEndian)
    with pytest.raises(IncompleteDatasetError):
        check_complete(leaf + sequence[:-1], ImplicitVRLittleEndian)


def test_nesting_beyond_the_limit_is_refused_not_recursed() -> None:
    nested = LEAF
    for _ in range(MAX_DEPTH + 1):
        nested = _undefined_sequence(nested)
    with pytest.raises(IncompleteDatasetError, match="nested"):
        check_complete(nested, ExplicitVRLittleEndian)


def test_a_truncated_deflate_stream_is_refused() -> None:
    data, syntax = _dataset("image_dfl.dcm")
    assert syntax == DeflatedExplicitVRLittleEndian
    with pytest.raises(IncompleteDatasetError, match="inflate"):
        check_complete(data[: len(data) // 2], syntax)


# --- the identifying UIDs, read without pydicom ---------------------------------------------------

IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@pytest.mark.parametrize(
    "source", [*NATIVE, *ENCAPSULATED, "rtplan.dcm", "reportsi.dcm", "rtdose.dcm", "MR_small_RLE.dcm"]
)
def test_identifiers_are_what_pydicom_reads(source: str) -> None:
    data, syntax = _dataset(source)
    path = get_testdata_file(source)
    assert path is not None
    expected = {k: str(v).strip() for k in IDENTIFYING if (v := dcmread(path).get(k)) is not None}
    assert read_identifiers(data, syntax) == expected
    assert len(expected) == 4


def _uid(tag: tuple[int, int], value: bytes) -> bytes:
    return struct.pack("<HH", *tag) + b"UI" + struct.pack("<H", len(value)) + value


def test_identifiers_after_sequences_with_padding_and_missing() -> None:
    defined_item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(LEAF)) + LEAF
    defined_sequence = b"\x08\x00\x15\x11SQ\x00\x00" + struct.pack("<I", len(defined_item)) + defined_item
    undefined = _undefined_sequence(LEAF).replace(b"\x40\x00\x75\x02", b"\x08\x00\x40\x11", 1)
    data = b"".join(
        (
            _uid((0x0008, 0x0016), b"1.2.840.10008.5.1.4.1.1.2\x00"),
            _uid((0x0008, 0x0018), b"1.2.3.4 "),
            defined_sequence,  # (0008,1115)
            undefined,  # (0008,1140), undefined length: walked to its delimiter
            _uid((0x0020, 0x000D), b"1.2.3"),
            _uid((0x0020, 0x0010), b"99"),  # not identifying: skipped
            _element((0x7FE0, 0x0010), b"OW", b"\x00" * 8),
        )
    )
    assert read_identifiers(data, ExplicitVRLittleEndian) == {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "SOPInstanceUID": "1.2.3.4",
        "StudyInstanceUID": "1.2.3",
    }
    # The reading stops after (0020,000E): what comes later is not looked at (check_complete is).
    assert read_identifiers(data[:-3], ExplicitVRLittleEndian)["StudyInstanceUID"] == "1.2.3"
    for broken in (data[:10], data.replace(SEQUENCE_END, b"")):
        with pytest.raises(IncompleteDatasetError):
            read_identifiers(broken, ExplicitVRLittleEndian)
