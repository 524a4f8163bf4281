"""C-STORE command sets encoded and decoded without pydicom datasets (hie_imaging.dicom.command) are
byte for byte what pynetdicom 3.0.4 makes of the same primitive, and decode to the same primitive;
anything the codec does not handle goes pynetdicom's way. (Every C-STORE of the other imaging tests
crosses this codec on both ends, against DCMTK, Orthanc and pynetdicom.)"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import dimse, dimse_messages, dsutils
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from hie_imaging.dicom import command
from hie_imaging.dicom import scu as _scu  # noqa: F401  (installs the codec, as the gateway does)

pytestmark = pytest.mark.skipif(not command.ENABLED, reason="written against pynetdicom 3.0.4")

CT = "1.2.840.10008.5.1.4.1.1.2"  # odd length: padded with a NUL
MR = "1.2.840.10008.5.1.4.1.1.4"
PARAMETERS = ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPClassUID", "AffectedSOPInstanceUID")


def request(instance: str = "1.2.3.4", priority: int = 2, data: bytes = b"\x08\x00" * 8) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = instance
    primitive.Priority = priority
    primitive.DataSet = BytesIO(data)
    return primitive


def response(status: int = 0x0000, comment: str | None = None, sop_class: str | None = MR) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    if sop_class is not None:
        primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = "1.2.3.45"
    primitive.Status = status
    if comment is not None:
        primitive.ErrorComment = comment
    return primitive


def pdvs(message: Any, primitive: C_STORE) -> list[tuple[int, bytes]]:
    message.primitive_to_message(primitive)
    return [pdv for pdata in message.encode_msg(1, 16384) for pdv in pdata.presentation_data_value_list]


def pynetdicom_class(primitive: C_STORE) -> Any:
    return dimse_messages.C_STORE_RSP if primitive.MessageIDBeingRespondedTo else dimse_messages.C_STORE_RQ


def ours(primitive: C_STORE) -> Any:
    table = dimse._RSP_TO_MESSAGE if primitive.MessageIDBeingRespondedTo else dimse._RQ_TO_MESSAGE
    return table[C_STORE]()


def received(fragments: list[tuple[int, bytes]]) -> Any:
    message = dimse_messages.DIMSEMessage()
    for fragment in fragments:
        pdata = P_DATA()
        pdata.presentation_data_value_list.append(fragment)
        if message.decode_msg(pdata):
            return message
    raise AssertionError("the message did not complete")


CASES = {
    "request": request(),
    "request, even UID, high priority": request("1.2.3.45", 1),
    "request, dataset streamed from a file": None,
    "response success": response(),
    "response warning, no SOP class": response(0xB000, sop_class=None),
    "response failure with a comment (pynetdicom's way)": response(0xA700, "out of resources"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_command_sets_are_pynetdicoms_byte_for_byte_and_decode_to_the_same_primitive(
    case: str, tmp_path: Path
) -> None:
    primitive = CASES[case]
    if primitive is None:  # what send_c_store(path) does with STORE_SEND_CHUNKED_DATASET
        path = tmp_path / "ds.bin"
        path.write_bytes(b"\x00" * 10 + b"\x08\x00" * 300)
        primitive = request()
        primitive.DataSet = None  # type: ignore[assignment]
        primitive._dataset_path = (path, 10)
    expected = pdvs(pynetdicom_class(primitive)(), primitive)
    assert pdvs(ours(primitive), primitive) == expected

    message = received(expected)
    assert type(message) is ours(primitive).__class__
    decoded = message.message_to_primitive()
    for name in (*PARAMETERS, "Priority", "Status", "ErrorComment"):
        if hasattr(primitive, name):
            assert getattr(decoded, name) == getattr(primitive, name), name
    if primitive.MessageIDBeingRespondedTo is None and primitive.DataSet is not None:
        assert decoded.DataSet.getvalue() == primitive.DataSet.getvalue()


def test_a_fast_command_set_still_answers_as_a_pydicom_dataset() -> None:
    primitive = request()
    expected = pdvs(dimse_messages.C_STORE_RQ(), primitive)
    message = received(expected)
    assert isinstance(message.command_set, command._CommandSet)
    assert message.command_set.CommandField == 0x0001
    assert message.command_set.CommandGroupLength == len(expected[0][1]) - 1 - 12
    assert "AffectedSOPInstanceUID" in message.command_set
    assert next(element.keyword for element in message.command_set) == "CommandGroupLength"


def test_command_sets_the_codec_does_not_handle_are_left_to_pynetdicom() -> None:
    move = request()
    move.MoveOriginatorApplicationEntityTitle = "MOVER"
    move.MoveOriginatorMessageID = 3
    encoded = dsutils.encode(_pynetdicom_command_set(move), True, True)
    assert encoded is not None
    assert command.decode_command(encoded) is None
    message = received(pdvs(ours(move), move))
    assert message.message_to_primitive().MoveOriginatorApplicationEntityTitle == "MOVER"
    for broken in (encoded[:-1], encoded[:6], encoded + b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00"):
        assert command.decode_command(broken) is None


def _pynetdicom_command_set(primitive: C_STORE) -> Any:
    message = pynetdicom_class(primitive)()
    message.primitive_to_message(primitive)
    return message.command_set
