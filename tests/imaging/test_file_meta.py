"""The relay reads each spooled file's meta once, with struct (hie_imaging.dicom.filemeta): the same
three UIDs pydicom reads and the same dataset offset pynetdicom's `split_dataset` finds, and the
refusals `send_files` turns into UnreadableFileError before connecting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from peers import dataset_bytes
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import encode_file_meta, split_dataset

from hie_imaging.dicom.filemeta import FileMetaError, read_file_meta
from hie_imaging.dicom.scp import part10

if TYPE_CHECKING:
    from conftest import RunningServer

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def assert_as_pydicom_reads(path: Path) -> None:
    meta = read_file_meta(path)
    expected = read_file_meta_info(path)
    _, offset = split_dataset(path)
    assert meta.sop_class_uid == expected.MediaStorageSOPClassUID
    assert meta.sop_instance_uid == expected.MediaStorageSOPInstanceUID
    assert meta.transfer_syntax_uid == expected.TransferSyntaxUID
    assert meta.dataset_offset == offset


@pytest.mark.parametrize(
    "source",
    ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
)
def test_files_pydicom_wrote_read_as_pydicom_reads_them(source: str, tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    dcmread(get_testdata_file(source)).save_as(path, enforce_file_format=True)
    assert_as_pydicom_reads(path)


@pytest.mark.parametrize("instance", ["1.2.3.45", "1.2.3.4"])  # odd and even length
def test_files_the_scp_spooled_read_as_pydicom_reads_them(instance: str, tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    path.write_bytes(part10(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", CT, instance, EXPLICIT, "CT_MODALITY"))
    assert_as_pydicom_reads(path)
    assert read_file_meta(path).sop_instance_uid == instance


def test_a_file_meta_longer_than_the_first_read_is_read_on(tmp_path: Path) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.45")
    meta.TransferSyntaxUID = UID(EXPLICIT)
    meta.ImplementationClassUID = UID("1.2.3.4.5")
    meta.PrivateInformationCreatorUID = UID("1.2.3.4.6")
    meta.PrivateInformation = b"\x01" * 5000  # OB: a 4-byte length
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + b"\x08\x00\x05\x00CS\x00\x00")
    assert_as_pydicom_reads(path)


def test_a_file_with_only_its_meta_has_an_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    path.write_bytes(part10(b"", CT, "1.2.3.45", EXPLICIT, "CT_MODALITY"))
    assert read_file_meta(path).dataset_offset == path.stat().st_size


def _meta_without(keyword: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.45")
    meta.TransferSyntaxUID = UID(EXPLICIT)
    delattr(meta, keyword)
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=False)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + b"\x08\x00\x05\x00CS\x00\x00"


GOOD = part10(b"\x08\x00\x05\x00CS\x00\x00", CT, "1.2.3.45", EXPLICIT, "CT_MODALITY")
BAD = {
    "not DICOM": (b"not an image", "preamble"),
    "no DICM prefix": (b"\x00" * 200, "preamble"),
    "file meta cut in a header": (GOOD[:150], "cut short"),
    "file meta cut in a value": (GOOD[:170], "cut short"),
    "no transfer syntax": (_meta_without("TransferSyntaxUID"), "lacks TransferSyntaxUID"),
    "no SOP instance": (_meta_without("MediaStorageSOPInstanceUID"), "lacks MediaStorageSOPInstanceUID"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_is_not_a_usable_part10_file_is_refused_with_the_reason(case: str, tmp_path: Path) -> None:
    data, reason = BAD[case]
    path = tmp_path / "file"
    path.write_bytes(data)
    with pytest.raises(FileMetaError, match=reason):
        read_file_meta(path)


def test_send_files_reads_each_file_meta_once_and_streams_from_its_offset(
    gateway: RunningServer, ct_series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's `send_c_store(path)` would decode the file meta again (`split_dataset`)."""
    import pynetdicom.association

    from hie_imaging.dicom import command, scu

    def no_second_read(path: Path) -> None:
        raise AssertionError(f"file meta of {path} read again")

    if command.ENABLED:
        monkeypatch.setattr(pynetdicom.association, "split_dataset", no_second_read)
    reads: list[Path] = []
    monkeypatch.setattr(scu, "read_file_meta", lambda path: reads.append(path) or read_file_meta(path))

    statuses = scu.send_files(gateway.endpoint, "CT_MODALITY", ct_series)

    assert sorted(reads) == sorted(ct_series)
    received = gateway.recorder.by_uid()
    for path in ct_series:
        meta = read_file_meta(path)
        assert statuses[meta.sop_instance_uid] == 0x0000
        assert dataset_bytes(received[meta.sop_instance_uid].data) == path.read_bytes()[meta.dataset_offset :]
