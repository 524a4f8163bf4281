"""C-STORE command sets encoded and decoded with struct, not through pydicom datasets.

pynetdicom 3.0.4 builds every DIMSE command set as a pydicom `Dataset` (one `setattr` per element
with keyword lookups and value validation), encodes it with `write_dataset` twice (once only to
learn the Command Group Length) and decodes each received one with `read_dataset`, then copies it
element by element onto the primitive. For a C-STORE that was 12-16 % of a gateway's CPU per
instance: each instance crosses pynetdicom twice per gateway (C-STORE-RQ in, C-STORE-RSP out;
C-STORE-RQ out, C-STORE-RSP in).

This module swaps in, for C-STORE-RQ and C-STORE-RSP only, message classes that go straight from
the primitive to the encoded command set and back (PS3.7 §9.3.1, §E: implicit VR little endian,
elements in ascending tag order, group length first). Everything else about the message — the
data set, its streaming from a file, fragmentation into PDVs, the other DIMSE services — is still
pynetdicom's. A command set with an element this codec does not handle (Move Originator, Error
Comment, Offending Element, any unknown tag, an unexpected value length) goes the pynetdicom way,
whole. Code that reads `message.command_set` still gets a pydicom `Dataset`'s attributes: it is
decoded from the same bytes on first access (pynetdicom's own logging handlers, for instance, which
the gateway turns off).

Written against pynetdicom 3.0.4 (pinned); with any other version nothing is swapped (`ENABLED`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import dimse, dimse_messages, dsutils
from pynetdicom.dimse_primitives import C_STORE

ENABLED = pynetdicom.__version__ == "3.0.4"

_STORE_RQ, _STORE_RSP = 0x0001, 0x8001
_NO_DATA_SET, _DATA_SET = 0x0101, 0x0001

# (tag element of group 0000, primitive attribute, VR) in ascending tag order.
_RQ_FIELDS = (
    (0x0002, "AffectedSOPClassUID", "UI"),
    (0x0100, "CommandField", "US"),
    (0x0110, "MessageID", "US"),
    (0x0700, "Priority", "US"),
    (0x0800, "CommandDataSetType", "US"),
    (0x1000, "AffectedSOPInstanceUID", "UI"),
)
_RSP_FIELDS = (
    (0x0002, "AffectedSOPClassUID", "UI"),
    (0x0100, "CommandField", "US"),
    (0x0120, "MessageIDBeingRespondedTo", "US"),
    (0x0800, "CommandDataSetType", "US"),
    (0x0900, "Status", "US"),
    (0x1000, "AffectedSOPInstanceUID", "UI"),
)
_FIELDS = {_STORE_RQ: _RQ_FIELDS, _STORE_RSP: _RSP_FIELDS}
_BY_ELEMENT = {
    kind: {element: (name, vr) for element, name, vr in fields} for kind, fields in _FIELDS.items()
}
# Primitive parameters that exist in the command set only as the fields above, or not at all; if
# any other parameter is set (Move Originator, Error Comment, Offending Element), pynetdicom encodes.
_OTHER_RQ = ("MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")
_OTHER_RSP = ("ErrorComment", "OffendingElement")

_SET_HERE = ("CommandField", "CommandDataSetType")  # from the message type and its data set
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")

_pynetdicom_encode: Callable[..., bytes | None] = dsutils.encode
_pynetdicom_decode: Callable[..., Dataset] = dsutils.decode


class _CommandSet:
    """An encoded C-STORE command set and its values; any other attribute comes from a pydicom
    `Dataset` decoded from the same bytes on first use."""

    __slots__ = ("_dataset", "encoded", "values")

    def __init__(self, encoded: bytes, values: dict[str, Any]) -> None:
        self.encoded = encoded
        self.values = values
        self._dataset: Dataset | None = None

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        return getattr(self.dataset(), name)

    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = _pynetdicom_decode(BytesIO(self.encoded), True, True)
        return self._dataset

    def __iter__(self) -> Any:
        return iter(self.dataset())

    def __contains__(self, name: object) -> bool:
        return name in cast(Any, self.dataset())


def encode_command(kind: int, values: dict[str, Any]) -> bytes:
    """The command set of a C-STORE-RQ or -RSP (`kind`) with these values (None: left out)."""
    parts = []
    for element, name, vr in _FIELDS[kind]:
        value = values.get(name)
        if value is None:
            continue
        if vr == "UI":
            raw = str(value).encode("ascii")
            if len(raw) % 2:
                raw += b"\x00"
        else:
            raw = _US.pack(value)
        parts.append(_ELEMENT_HEADER.pack(0x0000, element, len(raw)) + raw)
    body = b"".join(parts)
    return _ELEMENT_HEADER.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


def decode_command(encoded: bytes) -> dict[str, Any] | None:
    """The values of a C-STORE-RQ or -RSP command set, or None when it is anything else (or holds
    an element this codec does not handle): pynetdicom decodes those."""
    end, pos = len(encoded), 0
    raw: dict[int, bytes] = {}
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(encoded, pos)
        pos += 8
        if group != 0x0000 or pos + length > end or element in raw:
            return None
        raw[element] = encoded[pos : pos + length]
        pos += length
    field = raw.get(0x0100)
    if field is None or len(field) != 2:
        return None
    kind = _US.unpack(field)[0]
    known = _BY_ELEMENT.get(kind)
    if known is None:
        return None
    values: dict[str, Any] = {}
    for element, value in raw.items():
        if element == 0x0000:
            if len(value) != 4:
                return None
            continue
        if element not in known:
            return None
        name, vr = known[element]
        if vr == "UI":
            try:
                values[name] = value.decode("ascii").rstrip("\x00 ")
            except UnicodeDecodeError:
                return None
        elif len(value) == 2:
            values[name] = _US.unpack(value)[0]
        else:
            return None
    if "CommandDataSetType" not in values:
        return None
    return values


def _encode(ds: Any, *args: Any, **kwargs: Any) -> bytes | None:
    """pynetdicom's `dsutils.encode` as `dimse_messages` calls it, for command sets only."""
    if isinstance(ds, _CommandSet):
        return ds.encoded
    return _pynetdicom_encode(ds, *args, **kwargs)


def _decode(stream: BytesIO, *args: Any, **kwargs: Any) -> Any:
    """pynetdicom's `dsutils.decode` as `dimse_messages` calls it: for received command sets."""
    encoded = stream.getvalue()
    values = decode_command(encoded)
    if values is None:
        return _pynetdicom_decode(BytesIO(encoded), *args, **kwargs)
    return _CommandSet(encoded, values)


class _FastStoreMessage:
    """What C_STORE_RQ and C_STORE_RSP below share; `_kind` and `_others` say which they are."""

    _kind: int
    _others: tuple[str, ...]
    command_set: Any
    data_set: Any
    _data_set_path: Any
    _data_set_file: Any
    context_id: int | None

    def __init__(self) -> None:  # pynetdicom's, without the Dataset of None-valued elements
        self.context_id = None
        self.encoded_command_set = BytesIO()
        self.data_set = BytesIO()
        self.command_set = None
        self._data_set_path = None
        self._data_set_file = None

    def primitive_to_message(self, primitive: Any) -> None:
        if not isinstance(primitive, C_STORE) or any(getattr(primitive, n) is not None for n in self._others):
            self.command_set = Dataset()
            for keyword in dimse_messages._COMMAND_SET_KEYWORDS[type(self).__name__.replace("_", "-")]:
                setattr(self.command_set, keyword, None)
            super().primitive_to_message(primitive)  # type: ignore[misc]
            return
        values: dict[str, Any] = {"CommandField": self._kind}
        for _, name, _ in _FIELDS[self._kind]:
            if name not in _SET_HERE:
                values[name] = getattr(primitive, name)
        data_set_type = _NO_DATA_SET
        self.data_set = BytesIO()
        if self._kind == _STORE_RQ:
            self.data_set = primitive.DataSet
            if self.data_set:
                data_set_type = _DATA_SET
        self._data_set_path = getattr(primitive, "_dataset_path", None)
        if self._data_set_path:
            data_set_type = _DATA_SET
        values["CommandDataSetType"] = data_set_type
        self.command_set = _CommandSet(encode_command(self._kind, values), values)

    def message_to_primitive(self) -> Any:
        command = self.command_set
        if not isinstance(command, _CommandSet):
            return super().message_to_primitive()  # type: ignore[misc]
        primitive = C_STORE()
        for name, value in command.values.items():
            if name not in _SET_HERE:
                setattr(primitive, name, value)
        if self._kind == _STORE_RQ:
            primitive.DataSet = self.data_set
        primitive._context_id = self.context_id
        primitive._dataset_path = self._data_set_path
        primitive._dataset_file = self._data_set_file
        return primitive


# Named as pynetdicom's (its code dispatches on the class name) and subclasses of them.
class C_STORE_RQ(_FastStoreMessage, dimse_messages.C_STORE_RQ):
    _kind = _STORE_RQ
    _others = _OTHER_RQ


class C_STORE_RSP(_FastStoreMessage, dimse_messages.C_STORE_RSP):
    _kind = _STORE_RSP
    _others = _OTHER_RSP


def install() -> None:
    """Swap the C-STORE message classes and the command-set codec in (idempotent)."""
    if not ENABLED or dimse._RQ_TO_MESSAGE[C_STORE] is C_STORE_RQ:
        return
    # The names dimse_messages imported from pynetdicom.dsutils, which it calls for command sets only.
    vars(dimse_messages).update(encode=_encode, decode=_decode)
    dimse._RQ_TO_MESSAGE[C_STORE] = C_STORE_RQ
    dimse._RSP_TO_MESSAGE[C_STORE] = C_STORE_RSP
    dimse_messages._MESSAGE_TYPES[_STORE_RQ] = ("C-STORE-RQ", C_STORE_RQ)
    dimse_messages._MESSAGE_TYPES[_STORE_RSP] = ("C-STORE-RSP", C_STORE_RSP)
