"""The gateway's DICOM client (send_files, echo, associate) against DCMTK storescp and the gateway's own
server over loopback, and the file meta it writes (split from test_dicom_core.py)."""

from __future__ import annotations

import gc
import warnings
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from peers import MODALITY_AE, dataset_bytes
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import sop_class

from hie_imaging.dicom import sop
from hie_imaging.dicom.scu import (
    AssociationFailedError,
    DicomEndpoint,
    UnreadableFileError,
    echo,
    send_files,
)

if TYPE_CHECKING:
    from conftest import MakeSeries, RunningServer, StartStorescp


# --- SCU against DCMTK storescp -----------------------------------------------------------------


@pytest.mark.dcmtk
def test_send_files_to_storescp_arrive_unchanged(
    start_storescp: StartStorescp, make_series: MakeSeries, ct_series: list[Path]
) -> None:
    peer = start_storescp("+xa")
    files = ct_series + make_series(2, source="MR_small_jp2klossless.dcm")

    statuses = send_files(peer.endpoint, MODALITY_AE, files)

    received = peer.received()
    assert len(received) == len(files)
    for path in files:
        source = dcmread(path)
        uid = str(source.SOPInstanceUID)
        assert statuses[uid] == 0x0000
        assert dcmread(BytesIO(received[uid])).PixelData == source.PixelData
        assert dataset_bytes(received[uid]) == dataset_bytes(path.read_bytes())


@pytest.mark.dcmtk
def test_peer_refusing_a_transfer_syntax_fails_only_those_files(
    start_storescp: StartStorescp, make_series: MakeSeries, ct_series: list[Path]
) -> None:
    peer = start_storescp()  # DCMTK default: uncompressed transfer syntaxes only
    jpeg2000 = make_series(1, source="MR_small_jp2klossless.dcm")
    # A codestream that cannot be decoded, so the fallback to an uncompressed syntax (see
    # test_transcoding.py) cannot help either.
    broken = dcmread(jpeg2000[0])
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    broken.save_as(jpeg2000[0])

    statuses = send_files(peer.endpoint, MODALITY_AE, ct_series + jpeg2000)

    uid_of = {
        path: str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in ct_series + jpeg2000
    }
    assert statuses[uid_of[jpeg2000[0]]] == 0x0122
    assert all(statuses[uid_of[path]] == 0x0000 for path in ct_series)
    assert set(peer.received()) == {uid_of[path] for path in ct_series}


@pytest.mark.dcmtk
def test_echo_reports_a_live_and_a_dead_peer(start_storescp: StartStorescp, free_port: int) -> None:
    peer = start_storescp()

    assert echo(peer.endpoint, MODALITY_AE)
    assert not echo(DicomEndpoint("NOBODY", "127.0.0.1", free_port), MODALITY_AE, timeout=2)


def test_associations_leave_no_socket_open(
    gateway: RunningServer, ct_series: list[Path], free_port: int
) -> None:
    """pynetdicom 3.0.4 closes an association's socket only after a successful shutdown(), which
    fails once the peer has closed (a released association) or when the connection was refused;
    reactor.BulkSocket closes it anyway, so nothing is left for the garbage collector to close."""
    gc.collect()
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always", ResourceWarning)
        statuses = send_files(gateway.endpoint, MODALITY_AE, ct_series[:3])
        assert sorted(statuses.values()) == [sop.STATUS_SUCCESS] * 3
        assert echo(gateway.endpoint, MODALITY_AE)
        assert not echo(DicomEndpoint("NOBODY", "127.0.0.1", free_port), MODALITY_AE, timeout=2)
        gc.collect()
    unclosed = [str(w.message) for w in found if "unclosed" in str(w.message)]
    assert unclosed == []


def test_send_files_to_a_closed_port_raises(ct_series: list[Path], free_port: int) -> None:
    endpoint = DicomEndpoint("NOBODY", "127.0.0.1", free_port)

    with pytest.raises(AssociationFailedError) as failure:
        send_files(endpoint, MODALITY_AE, ct_series, timeout=2)

    assert failure.value.endpoint == endpoint
    assert "connection refused" in failure.value.reason


def test_send_files_by_an_unknown_ae_raises_rejected(gateway: RunningServer, ct_series: list[Path]) -> None:
    with pytest.raises(AssociationFailedError, match="calling AE title not recognised"):
        send_files(gateway.endpoint, "STRANGER", ct_series)
    assert gateway.recorder.instances == []


def test_send_files_refuses_a_non_dicom_file_before_connecting(
    gateway: RunningServer, ct_series: list[Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.txt"
    report.write_text("not an image")

    with pytest.raises(UnreadableFileError) as failure:
        send_files(gateway.endpoint, MODALITY_AE, [*ct_series, report])

    assert failure.value.path == report
    assert gateway.recorder.instances == []


def test_every_secondary_capture_variant_is_accepted() -> None:
    names = [name for name in dir(sop_class) if "SecondaryCapture" in name and name.endswith("Storage")]
    variants = {str(getattr(sop_class, name)) for name in names}
    assert len(variants) == 5
    assert variants <= set(sop.STORAGE_SOP_CLASSES)
    assert sop.TRANSFER_SYNTAXES[0] == ExplicitVRLittleEndian
    assert sop.TRANSFER_SYNTAXES[-1] == "1.2.840.10008.1.2.2"


def test_part10_file_meta_is_what_pydicom_writes() -> None:
    """The handler's hand-made file meta (written per C-STORE, for speed) matches pydicom's to the byte."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import encode_file_meta

    from hie_imaging.dicom.scp import part10

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.45")  # odd length: padded with a NUL
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = "CT_MODALITY"  # odd length: padded with a space
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + b"DATASET"
    made = part10(b"DATASET", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1", "CT_MODALITY")
    assert made == expected
