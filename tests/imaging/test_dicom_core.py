"""The gateway's DICOM core against real peers over loopback: DCMTK tools and pynetdicom, nothing mocked."""

from __future__ import annotations

import socket
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from peers import MODALITY_AE, dataset_bytes
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from hie_imaging.dicom import sop
from hie_imaging.dicom.scp import ReceivedInstance
from hie_imaging.dicom.scu import (
    AssociationFailedError,
    associate,
    echo,
    send_files,
)
from hie_imaging.dicom.spool import Spool
from hie_platform import dicom_reactor as reactor
from hie_platform.dicom_reactor import QuietAssociation, QuietDUL

if TYPE_CHECKING:
    from conftest import Dcmtk, MakeSeries, Poll, RunningServer, StartGateway


def nodelay(sock: socket.socket | None) -> int:
    assert sock is not None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# --- Storage SCP fed by DCMTK -------------------------------------------------------------------


@pytest.mark.dcmtk
def test_storescu_series_arrives_bit_for_bit(
    dcmtk: Dcmtk, gateway: RunningServer, ct_series: list[Path]
) -> None:
    result = dcmtk.scu("storescu", MODALITY_AE, gateway.endpoint, files=ct_series)
    assert result.returncode == 0, result.stderr

    received = gateway.recorder.by_uid()
    assert len(received) == len(ct_series)
    for path in ct_series:
        source = dcmread(path)
        instance = received[str(source.SOPInstanceUID)]
        kept = dcmread(BytesIO(instance.data))
        assert kept.PixelData == source.PixelData
        # Data Set Trailing Padding (FFFC,FFFC) carries no data and PS3.10 §7.2 lets any application
        # drop it; storescu used to, DCMTK 3.6.7-9~deb12u4 keeps it. Every other element outside the
        # 0002 file meta round-trips.
        for dataset in (source, kept):
            dataset.pop(0xFFFCFFFC, None)
        assert kept == source
        assert instance.calling_ae == MODALITY_AE
        assert instance.peer_address == "127.0.0.1"
        assert instance.sop_class_uid == CTImageStorage
        assert instance.study_instance_uid == source.StudyInstanceUID
        assert instance.series_instance_uid == source.SeriesInstanceUID
        assert instance.transfer_syntax_uid == ExplicitVRLittleEndian
        assert kept.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID


@pytest.mark.dcmtk
def test_storescu_compressed_pixel_data_is_kept_as_sent(
    dcmtk: Dcmtk, gateway: RunningServer, make_series: MakeSeries
) -> None:
    files = make_series(2, source="SC_rgb_jpeg_dcmtk.dcm")
    # -xy: also propose JPEG baseline, in a presentation context of its own.
    result = dcmtk.scu("storescu", MODALITY_AE, gateway.endpoint, "-xy", files=files)
    assert result.returncode == 0, result.stderr

    received = gateway.recorder.by_uid()
    for path in files:
        source = path.read_bytes()
        instance = received[str(dcmread(path).SOPInstanceUID)]
        assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
        assert dcmread(BytesIO(instance.data)).PixelData == dcmread(path).PixelData
        assert dataset_bytes(instance.data) == dataset_bytes(source)


@pytest.mark.dcmtk
def test_echoscu_succeeds_and_unknown_calling_ae_is_rejected(dcmtk: Dcmtk, gateway: RunningServer) -> None:
    known = dcmtk.scu("echoscu", MODALITY_AE, gateway.endpoint)
    unknown = dcmtk.scu("echoscu", "STRANGER", gateway.endpoint)

    assert known.returncode == 0, known.stderr
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stderr + unknown.stdout


# --- Association acceptance ---------------------------------------------------------------------


def test_allow_list_change_applies_to_the_next_association(gateway: RunningServer) -> None:
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(sop.VERIFICATION_SOP_CLASS)
    host, port = gateway.server.address

    first = ae.associate(host, port, ae_title=gateway.server.ae_title)
    assert first.is_established
    first.release()

    gateway.allowed.discard(MODALITY_AE)  # e.g. the registry suspended the institution
    second = ae.associate(host, port, ae_title=gateway.server.ae_title)
    assert second.is_rejected
    rejection = second.acceptor.primitive
    assert rejection is not None
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
    assert not echo(gateway.endpoint, MODALITY_AE)


def test_allow_list_failure_rejects_instead_of_letting_peers_in(
    start_gateway: StartGateway, ct_series: list[Path]
) -> None:
    def registry_unavailable(_ae: str, _address: str) -> bool:
        raise RuntimeError("registry cache unavailable")

    gateway = start_gateway(is_allowed=registry_unavailable)

    with pytest.raises(AssociationFailedError, match="rejected \\(transient\\)") as failure:
        send_files(gateway.endpoint, MODALITY_AE, ct_series)
    assert failure.value.completed == {}
    assert gateway.recorder.instances == []


def test_server_prefers_explicit_vr_when_the_peer_offers_implicit_first(gateway: RunningServer) -> None:
    context = build_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = associate(gateway.endpoint, MODALITY_AE, [context])
    try:
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [ExplicitVRLittleEndian]
    finally:
        assoc.release()


def test_tcp_nodelay_and_128k_pdus_on_both_ends(gateway: RunningServer, wait_for: Poll) -> None:
    assoc = associate(gateway.endpoint, MODALITY_AE, [build_context(sop.VERIFICATION_SOP_CLASS)])
    try:
        wait_for(lambda: len(gateway.server.active_associations()) == 1, what="server-side association")
        (acceptor,) = gateway.server.active_associations()
        assert nodelay(acceptor.dul.socket.socket if acceptor.dul.socket else None) != 0
        assert nodelay(assoc.dul.socket.socket if assoc.dul.socket else None) != 0
        assert assoc.acceptor.maximum_length == 131072  # what the gateway advertised
        assert acceptor.requestor.maximum_length == 131072  # what the SCU advertised
    finally:
        assoc.release()


def test_both_ends_run_the_waiting_reactor_and_end_with_the_association(
    gateway: RunningServer, wait_for: Poll
) -> None:
    assoc = associate(gateway.endpoint, MODALITY_AE, [build_context(sop.VERIFICATION_SOP_CLASS)])
    wait_for(lambda: len(gateway.server.active_associations()) == 1, what="server-side association")
    (acceptor,) = gateway.server.active_associations()
    for end in (assoc, acceptor):
        assert isinstance(end, QuietAssociation)
        assert isinstance(end.dul, QuietDUL)
    assert assoc.send_c_echo().Status == 0x0000

    assoc.release()

    # Nothing polls any more: the release has to wake all four threads, or they would linger.
    wait_for(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(), what="acceptor threads end")
    wait_for(lambda: not assoc.is_alive() and not assoc.dul.is_alive(), what="requestor threads end")
    assert acceptor.is_released


def test_associations_share_the_servers_contexts_and_leave_them_as_they_were(gateway: RunningServer) -> None:
    """Every association negotiates against the server's one list of supported contexts (not a copy):
    a negotiation with role selection and an implicit-first offer must change none of them."""

    def snapshot() -> list[tuple[object, ...]]:
        return [
            (cx.abstract_syntax, list(cx.transfer_syntax), cx.context_id, cx.result, cx.scu_role, cx.scp_role)
            for cx in server_contexts
        ]

    server_contexts = gateway.server._server.contexts if gateway.server._server else []
    assert server_contexts
    before = snapshot()
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, True
    offered = [
        build_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        build_context(sop.VERIFICATION_SOP_CLASS),
    ]
    ae = AE(ae_title=MODALITY_AE)
    for _ in range(2):
        assoc = ae.associate(
            gateway.endpoint.host, gateway.endpoint.port, offered, gateway.endpoint.ae_title, ext_neg=[role]
        )
        try:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    assert snapshot() == before


def test_an_idle_association_notices_the_peer_abort(gateway: RunningServer, wait_for: Poll) -> None:
    assoc = associate(gateway.endpoint, MODALITY_AE, [build_context(sop.VERIFICATION_SOP_CLASS)])
    wait_for(lambda: len(gateway.server.active_associations()) == 1, what="server-side association")
    (acceptor,) = gateway.server.active_associations()

    assoc.abort()

    wait_for(lambda: acceptor.is_aborted and not acceptor.is_alive(), what="the SCP to see the abort")
    assert echo(gateway.endpoint, MODALITY_AE)  # and the server goes on serving


def test_stock_pynetdicom_associations_when_the_version_is_not_the_one_reactor_was_written_for(
    gateway: RunningServer, make_series: MakeSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reactor, "ENABLED", False)
    files = make_series(3)

    assoc = associate(gateway.endpoint, MODALITY_AE, [build_context(sop.VERIFICATION_SOP_CLASS)])
    try:
        assert type(assoc) is Association
    finally:
        assoc.release()
    statuses = send_files(gateway.endpoint, MODALITY_AE, files)

    assert sorted(statuses.values()) == [0, 0, 0]
    assert len(gateway.recorder.by_uid()) == 3


def test_stop_aborts_associations_still_open_after_the_grace_period(
    gateway: RunningServer, wait_for: Poll
) -> None:
    assoc = associate(gateway.endpoint, MODALITY_AE, [build_context(sop.VERIFICATION_SOP_CLASS)])
    wait_for(lambda: len(gateway.server.active_associations()) == 1, what="server-side association")

    gateway.server.stop(grace_seconds=0.1)

    wait_for(lambda: assoc.is_aborted, what="the SCU to see the abort")
    assert not echo(gateway.endpoint, MODALITY_AE, timeout=2)


# --- C-STORE outcomes the sender sees -----------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",  # deflated
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPEG2000.dcm",
    ],
)
def test_send_files_to_gateway_keeps_every_byte(
    gateway: RunningServer, make_series: MakeSeries, source: str
) -> None:
    files = make_series(2, source=source)

    statuses = send_files(gateway.endpoint, MODALITY_AE, files)

    received = gateway.recorder.by_uid()
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert statuses[uid] == 0x0000
        original = path.read_bytes()
        assert dataset_bytes(received[uid].data) == dataset_bytes(original)
        assert received[uid].transfer_syntax_uid == dcmread(path).file_meta.TransferSyntaxUID


def test_failure_status_from_on_instance_reaches_the_sender(
    gateway: RunningServer, ct_series: list[Path]
) -> None:
    gateway.recorder.status = 0xA700

    statuses = send_files(gateway.endpoint, MODALITY_AE, ct_series)

    assert set(statuses.values()) == {0xA700}
    assert not any(sop.is_stored(status) for status in statuses.values())


def test_on_instance_exception_is_c211_and_the_server_keeps_serving(
    gateway: RunningServer, ct_series: list[Path]
) -> None:
    gateway.recorder.error = RuntimeError("database down")
    failed = send_files(gateway.endpoint, MODALITY_AE, ct_series[:1])
    gateway.recorder.error = None
    stored = send_files(gateway.endpoint, MODALITY_AE, ct_series)

    assert list(failed.values()) == [0xC211]
    assert set(stored.values()) == {0x0000}
    assert len(gateway.recorder.instances) == len(ct_series)


def test_spool_full_in_on_instance_is_out_of_resources(
    start_gateway: StartGateway, ct_series: list[Path], tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)

    def spool_it(instance: ReceivedInstance) -> int:
        spool.store(instance.sop_instance_uid, instance.data)
        return 0x0000

    gateway = start_gateway(on_instance=spool_it)

    statuses = send_files(gateway.endpoint, MODALITY_AE, ct_series[:1])

    assert list(statuses.values()) == [0xA700]  # "out of resources": the sender retries later
    assert not any((tmp_path / "spool").rglob("*.dcm"))


def test_dataset_without_sop_instance_uid_is_refused(
    gateway: RunningServer, ct_series: list[Path], tmp_path: Path
) -> None:
    ds = dcmread(ct_series[0])
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID  # the file meta still names the instance, so pynetdicom will send it
    broken = tmp_path / "no-instance-uid.dcm"
    ds.save_as(broken, enforce_file_format=False)

    statuses = send_files(gateway.endpoint, MODALITY_AE, [broken])

    assert statuses == {uid: 0xC210}
    assert gateway.recorder.instances == []


def test_dataset_without_study_uid_is_refused(gateway: RunningServer, ct_series: list[Path]) -> None:
    ds = dcmread(ct_series[0])
    del ds.StudyInstanceUID
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = associate(gateway.endpoint, MODALITY_AE, [context])
    try:
        status = assoc.send_c_store(ds).Status
    finally:
        assoc.release()

    assert status == 0xC210
    assert gateway.recorder.instances == []


def test_dataset_of_another_sop_class_is_refused(gateway: RunningServer, ct_series: list[Path]) -> None:
    ds = dcmread(ct_series[0])
    ds.SOPClassUID = MRImageStorage  # the request will still say CT
    path = ct_series[0].with_name("mislabelled.dcm")
    ds.save_as(path, enforce_file_format=False)

    statuses = send_files(gateway.endpoint, MODALITY_AE, [path])

    assert statuses == {str(ds.SOPInstanceUID): 0xA900}
    assert gateway.recorder.instances == []


def test_unparseable_dataset_is_refused(
    gateway: RunningServer, ct_series: list[Path], tmp_path: Path
) -> None:
    original = ct_series[0].read_bytes()
    meta_end = len(original) - len(dataset_bytes(original))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(original[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 64)

    statuses = send_files(gateway.endpoint, MODALITY_AE, [garbage])

    assert list(statuses.values()) == [0xC210]
    assert gateway.recorder.instances == []
