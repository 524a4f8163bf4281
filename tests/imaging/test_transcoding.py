"""Issue 6: an instance is decoded into an uncompressed syntax only when the receiver accepts none of its
own, against real DCMTK `storescp` peers (and, at the end, through both gateways).

`storescp` without options accepts only uncompressed syntaxes (explicit VR little and big endian,
implicit VR little endian), `+xi` only implicit VR little endian, `+xa` every syntax DCMTK knows.
It runs with `+B`, so each file it writes holds the dataset exactly as it came over the wire.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import tempfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from gateway_harness import (
    CLINIC_AE,
    HOSPITAL,
    SEVERANCE,
    SNUBH,
    ConsentDesk,
    Federation,
    new_patient_key,
    publish_exchange,
    referral,
    study_of,
    until,
    until_count,
)
from nats.aio.client import Client as NatsClient
from peers import dataset_bytes, sop_uid
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from hie_imaging.dicom import scu, sop, transcode
from hie_imaging.dicom.scu import MAX_PRESENTATION_CONTEXTS, send_files

if TYPE_CHECKING:
    from conftest import DcmtkPeer, MakeSeries, StartGatewayApp, StartStorescp

pytestmark = pytest.mark.dcmtk

MODALITY_AE = "CT_MODALITY"
SCU_LOGGER = "hie_imaging.dicom.scu"


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Decoded instances are written to a temporary file each: all of them must be gone afterwards."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert list(folder.iterdir()) == [], "a transcoded file was left behind"


def transfer_syntax(part10: bytes) -> UID:
    return UID(dcmread(BytesIO(part10), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def decoded(part10_or_path: bytes | Path) -> np.ndarray:
    """pydicom's decode of the pixel data (its defaults: YCbCr is converted to RGB)."""
    source = BytesIO(part10_or_path) if isinstance(part10_or_path, bytes) else part10_or_path
    return dcmread(source).pixel_array


def dcmtk_compressed(make_series: MakeSeries, *tool: str) -> Path:
    """A CT instance compressed by a DCMTK tool (`dcmcjpeg`, `dcmcrle`), in place."""
    (path,) = make_series(1)
    out = path.with_suffix(".tmp")
    result = subprocess.run([*tool, str(path), str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    out.replace(path)
    return path


# --- the fallback against DCMTK storescp --------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "syntax"),
    [
        ("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5"),  # RLE, colour
        ("SC_rgb_rle_2frame.dcm", "1.2.840.10008.1.2.5"),  # RLE, two frames
        ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),  # JPEG baseline, YCbCr
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),  # JPEG 2000, irreversible
    ],
)
def test_compressed_instances_arrive_decoded_and_uncompressed_ones_bit_identical(
    start_storescp: StartStorescp,
    make_series: MakeSeries,
    ct_series: list[Path],
    caplog: pytest.LogCaptureFixture,
    source: str,
    syntax: str,
) -> None:
    peer = start_storescp()  # uncompressed syntaxes only
    compressed = make_series(2, source=source)
    assert dcmread(compressed[0]).file_meta.TransferSyntaxUID == syntax

    with caplog.at_level(logging.INFO, logger=SCU_LOGGER):
        result = send_files(peer.endpoint, MODALITY_AE, ct_series + compressed)

    received = peer.received()
    assert set(result.values()) == {0x0000}
    assert sorted(received) == sorted(sop_uid(path) for path in ct_series + compressed)
    for path in compressed:  # (a) decoded, the same pixel values, the same instance
        uid = sop_uid(path)
        assert transfer_syntax(received[uid]) == ExplicitVRLittleEndian
        assert np.array_equal(decoded(received[uid]), decoded(path))
        assert result.transcoded[uid] == (syntax, ExplicitVRLittleEndian)
    for path in ct_series:  # (b) as stored, not decoded
        uid = sop_uid(path)
        assert dataset_bytes(received[uid]) == dataset_bytes(path.read_bytes())
        assert uid not in result.transcoded
    assert result.untranscodable == {}
    # One association for all five, and one line about the transcoding on it.
    lines = [r.getMessage() for r in caplog.records if r.name == SCU_LOGGER and r.levelno == logging.INFO]
    assert len(lines) == 1
    assert "transcoded 2 of 5 instances on this association" in lines[0]


def test_dcmtk_jpeg_lossless_and_rle_arrive_decoded(
    start_storescp: StartStorescp, make_series: MakeSeries
) -> None:
    peer = start_storescp()
    ct_pixels = decoded(Path(str(get_testdata_file("CT_small.dcm"))))
    files = {
        dcmtk_compressed(make_series, "dcmcjpeg"): JPEGLosslessSV1,  # DCMTK's default
        dcmtk_compressed(make_series, "dcmcjpeg", "+el"): JPEGLossless,  # process 14, any predictor
        dcmtk_compressed(make_series, "dcmcrle"): RLELossless,
    }

    result = send_files(peer.endpoint, MODALITY_AE, list(files))

    received = peer.received()
    expected = {sop_uid(path): syntax for path, syntax in files.items()}
    assert {uid: source for uid, (source, _) in result.transcoded.items()} == expected
    for path in files:
        uid = sop_uid(path)
        assert result[uid] == 0x0000
        assert transfer_syntax(received[uid]) == ExplicitVRLittleEndian
        # Both lossless: the pixels are those of CT_small, bit for bit.
        assert np.array_equal(decoded(received[uid]), ct_pixels)


def test_a_peer_taking_only_implicit_vr_gets_implicit_vr(
    start_storescp: StartStorescp, make_series: MakeSeries, ct_series: list[Path]
) -> None:
    peer = start_storescp("+xi")
    rle = make_series(1, source="MR_small_RLE.dcm")

    result = send_files(peer.endpoint, MODALITY_AE, ct_series[:1] + rle)

    received = peer.received()
    for path, source in ((ct_series[0], ExplicitVRLittleEndian), (rle[0], RLELossless)):
        uid = sop_uid(path)
        assert result[uid] == 0x0000
        assert result.transcoded[uid] == (source, ImplicitVRLittleEndian)
        assert transfer_syntax(received[uid]) == ImplicitVRLittleEndian
        assert np.array_equal(decoded(received[uid]), decoded(path))


def test_a_peer_accepting_the_compressed_syntax_gets_the_bytes_as_stored(
    start_storescp: StartStorescp, make_series: MakeSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = start_storescp("+xa")  # every syntax DCMTK knows
    files = [
        *make_series(2, source="SC_rgb_rle.dcm"),
        *make_series(1, source="SC_rgb_jpeg_dcmtk.dcm"),
        *make_series(1, source="JPEG2000.dcm"),
    ]

    def no_decoding(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an instance the peer accepts as stored was read with pydicom")

    monkeypatch.setattr(transcode, "dcmread", no_decoding)  # the fallback moved out of scu
    result = send_files(peer.endpoint, MODALITY_AE, files)

    received = peer.received()
    assert (result.transcoded, result.untranscodable) == ({}, {})
    for path in files:
        uid = sop_uid(path)
        assert result[uid] == 0x0000
        assert dataset_bytes(received[uid]) == dataset_bytes(path.read_bytes())
        assert transfer_syntax(received[uid]) == dcmread(path).file_meta.TransferSyntaxUID


def test_an_undecodable_instance_keeps_0122_with_a_warning_naming_its_syntax(
    start_storescp: StartStorescp,
    make_series: MakeSeries,
    ct_series: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    peer = start_storescp()
    (broken,) = make_series(1, source="MR_small_jp2klossless.dcm")
    ds = dcmread(broken)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a codestream cut short
    ds.save_as(broken)

    with caplog.at_level(logging.WARNING, logger=SCU_LOGGER):
        result = send_files(peer.endpoint, MODALITY_AE, [*ct_series, broken])

    assert result[sop_uid(broken)] == 0x0122
    assert result.untranscodable[sop_uid(broken)]  # the decoder's reason
    assert all(result[sop_uid(path)] == 0x0000 for path in ct_series)
    assert result.transcoded == {}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "refused MR Image Storage in JPEG 2000 Image Compression (Lossless Only)" in warning
    assert "cannot be decoded" in warning
    assert set(peer.received()) == {sop_uid(path) for path in ct_series}


def test_a_peer_taking_big_endian_gets_it_as_stored(
    start_storescp: StartStorescp, make_series: MakeSeries
) -> None:
    peer = start_storescp()  # DCMTK's default still accepts the retired explicit VR big endian
    (big_endian,) = make_series(1, source="MR_small_bigendian.dcm")

    result = send_files(peer.endpoint, MODALITY_AE, [big_endian])

    assert result == {sop_uid(big_endian): 0x0000}
    assert result.transcoded == {}
    assert dataset_bytes(peer.received()[sop_uid(big_endian)]) == dataset_bytes(big_endian.read_bytes())


def test_big_endian_refused_is_not_byte_swapped_blindly(
    start_storescp: StartStorescp, make_series: MakeSeries
) -> None:
    peer = start_storescp("+xi")  # implicit VR little endian only: explicit big endian is refused
    (big_endian,) = make_series(1, source="MR_small_bigendian.dcm")

    result = send_files(peer.endpoint, MODALITY_AE, [big_endian])

    assert result == {sop_uid(big_endian): 0x0122}
    assert "Big Endian" in result.untranscodable[sop_uid(big_endian)]
    assert peer.received() == {}


def test_lossy_coding_is_recorded_when_the_sender_did_not(
    start_storescp: StartStorescp, make_series: MakeSeries
) -> None:
    """PS3.3 C.7.6.1.1.5: once an image was lossy compressed, Lossy Image Compression is 01 for good.
    Decoded, the transfer syntax no longer says so; the attribute must."""
    peer = start_storescp()
    jpeg, lossless = make_series(1, source="SC_rgb_jpeg_dcmtk.dcm"), make_series(1, source="SC_rgb_rle.dcm")
    ds = dcmread(jpeg[0])
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(jpeg[0])

    send_files(peer.endpoint, MODALITY_AE, jpeg + lossless)

    received = {uid: dcmread(BytesIO(data)) for uid, data in peer.received().items()}
    marked = received[sop_uid(jpeg[0])]
    assert marked.LossyImageCompression == "01"
    assert marked.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(marked.LossyImageCompressionRatio) > 1
    assert marked.SOPInstanceUID == sop_uid(jpeg[0])  # the same image: no new instance
    assert "LossyImageCompression" not in received[sop_uid(lossless[0])]


def test_an_encapsulated_icon_is_decoded_too(start_storescp: StartStorescp, make_series: MakeSeries) -> None:
    peer = start_storescp()
    (path,) = make_series(1, source="SC_rgb_rle.dcm")
    icon = Dataset()
    icon.Rows = icon.Columns = 8
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    thumbnail = np.arange(64, dtype=np.uint8).reshape(8, 8)
    icon.file_meta = FileMetaDataset()
    icon.compress(RLELossless, thumbnail, generate_instance_uid=False)  # PS3.5 A.4: in the same syntax
    del icon.file_meta
    ds = dcmread(path)
    ds.IconImageSequence = Sequence([icon])
    ds.save_as(path)

    result = send_files(peer.endpoint, MODALITY_AE, [path])

    assert result[sop_uid(path)] == 0x0000
    kept = dcmread(BytesIO(peer.received()[sop_uid(path)]))
    assert not kept.IconImageSequence[0]["PixelData"].is_undefined_length
    assert np.frombuffer(kept.IconImageSequence[0].PixelData, np.uint8).reshape(8, 8).tolist() == (
        thumbnail.tolist()
    )
    assert np.array_equal(kept.pixel_array, decoded(path))


def test_fallback_contexts_count_against_the_128_context_limit(tmp_path: Path) -> None:
    """Each instance brings its own context and, for its SOP class, the uncompressed fallbacks."""
    syntaxes = [UID(f"1.2.840.10008.1.2.4.{n}") for n in (50, 57, 70, 80, 90, 91)]
    sop_classes = [generate_uid() for _ in range(30)]
    outgoing = [
        scu._Outgoing(tmp_path / f"{i}-{j}.dcm", sop_class, generate_uid(), syntax, 0)
        for i, sop_class in enumerate(sop_classes)
        for j, syntax in enumerate(syntaxes)
    ]

    batches = list(scu._batches(outgoing))

    assert [item for batch in batches for item in batch] == outgoing
    for batch in batches:
        keys = {key for item in batch for key in (item.context_key, *item.fallback_keys)}
        assert len(keys) <= MAX_PRESENTATION_CONTEXTS
    # 30 classes x (6 own + 2 fallback) = 240 contexts: two associations, each filled up to the limit.
    assert len(batches) == 2


def test_uncompressed_instances_propose_the_other_uncompressed_syntax_only(tmp_path: Path) -> None:
    ct = scu._Outgoing(tmp_path / "ct.dcm", CTImageStorage, generate_uid(), ExplicitVRLittleEndian, 0)
    sc = scu._Outgoing(tmp_path / "sc.dcm", SecondaryCaptureImageStorage, generate_uid(), RLELossless, 0)

    assert ct.fallback_keys == ((CTImageStorage, ImplicitVRLittleEndian),)
    assert sc.fallback_keys == (
        (SecondaryCaptureImageStorage, ExplicitVRLittleEndian),
        (SecondaryCaptureImageStorage, ImplicitVRLittleEndian),
    )


def test_every_compressed_syntax_the_gateway_accepts_has_a_decoder_installed() -> None:
    """The pinned plugins (pyproject.toml) decode whatever the Storage SCP may have taken in."""
    compressed = [syntax for syntax in sop.TRANSFER_SYNTAXES if syntax.is_compressed]
    assert len(compressed) == 7  # JPEG baseline, lossless (2), JPEG-LS lossless, JPEG 2000 (2), RLE
    missing = {
        syntax.name: get_decoder(syntax).missing_dependencies
        for syntax in compressed
        if not get_decoder(syntax).is_available
    }
    assert missing == {}


# --- through both gateways ------------------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_rle_study_relayed_to_a_pacs_taking_only_uncompressed_arrives_decoded(
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    make_series: MakeSeries,
) -> None:
    pacs: DcmtkPeer = start_storescp("+uf")  # uncompressed syntaxes only
    await imaging_federation.set_dicom(HOSPITAL, pacs.endpoint)
    hub1, hub2 = await gateway_apps(SEVERANCE), await gateway_apps(SNUBH)
    series = make_series(4, source="MR_small_RLE.dcm")
    study = study_of(series)
    patient = new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study, patient))

    async def linked() -> bool:
        return (await hub1.rows(study))["links"] == 1 and (await hub2.rows(study))["links"] == 1

    await until(linked, "both gateways to link the study to the referral")
    # The clinic's PACS sends RLE, which hub 1 takes as it is.
    statuses = await asyncio.to_thread(send_files, imaging_federation.gateway(SEVERANCE), CLINIC_AE, series)
    assert set(statuses.values()) == {0x0000}
    assert statuses.transcoded == {}
    await until_count(hub2, study, "delivered", len(series), timeout=60)

    received = {sop_uid(path): path.read_bytes() for path in pacs.files()}
    assert sorted(received) == sorted(sop_uid(path) for path in series)
    for path in series:
        data = received[sop_uid(path)]
        assert transfer_syntax(data) == ExplicitVRLittleEndian
        assert np.array_equal(decoded(data), decoded(path))
    # Hub 2 took RLE from hub 1 as it was; only the last hop, to the PACS, decoded.
    assert await hub1.metric("hie_imaging_instances_transcoded_total", result="sent") == 0
    assert await hub2.metric("hie_imaging_instances_transcoded_total", result="sent") == len(series)
    assert await hub2.metric("hie_imaging_instances_transcoded_total", result="failed") == 0
