"""The Part 10 file meta of a spooled file, read once with struct: what to send it as, and from where.

The relay sends each spooled file's dataset bytes as they are stored, so it needs, per file, the
SOP class, the SOP instance and the transfer syntax (to pick the presentation context) and the
offset at which the dataset starts after the file meta (to stream from there). pydicom's
`read_file_meta_info` and then pynetdicom's `split_dataset` each decoded the meta into a pydicom
dataset for this, one after the other, per outbound instance; this reads the group 0002 element
headers (PS3.10 §7.1: explicit VR little endian after the 128-byte preamble and "DICM") and slices
the three values out, as the SCP's `structure.read_identifiers` does for the dataset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import UID

from hie_imaging.dicom.structure import LONG_VRS

_PREAMBLE = 128
_PREFIX = b"DICM"
_FIRST_READ = 1024  # the meta the SCP writes is ~200 bytes; a longer one is read on
_TAG = struct.Struct("<HH")
_SHORT_LENGTH = struct.Struct("<H")
_LONG_LENGTH = struct.Struct("<I")
_UNDEFINED = 0xFFFFFFFF
_WANTED = {
    0x0002: "MediaStorageSOPClassUID",
    0x0003: "MediaStorageSOPInstanceUID",
    0x0010: "TransferSyntaxUID",
}


class FileMetaError(ValueError):
    """The file has no Part 10 preamble or file meta that parses, or lacks one of the three UIDs."""


@dataclass(frozen=True, slots=True)
class FileMeta:
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID
    dataset_offset: int  # where the dataset starts: the first byte after group 0002


def read_file_meta(path: Path) -> FileMeta:
    """The three UIDs of the file meta (as pydicom reads a UI value: trailing NULs and spaces dropped)
    and the dataset's offset. Raises FileMetaError, or OSError when the file cannot be read."""
    with path.open("rb") as file:
        data = bytearray(file.read(_FIRST_READ))
        if len(data) < _PREAMBLE + len(_PREFIX) or data[_PREAMBLE : _PREAMBLE + 4] != _PREFIX:
            raise FileMetaError('no 128-byte preamble and "DICM" prefix (not a DICOM Part 10 file)')
        values: dict[int, str] = {}
        pos = _PREAMBLE + len(_PREFIX)
        while True:
            if not _have(file, data, pos + 8):
                if len(data) == pos:  # nothing after the file meta
                    break
                raise FileMetaError("file meta cut short")
            group, element = _TAG.unpack_from(data, pos)
            if group != 0x0002:
                break
            if bytes(data[pos + 4 : pos + 6]) in LONG_VRS:
                if not _have(file, data, pos + 12):
                    raise FileMetaError("file meta cut short")
                header, length = 12, _LONG_LENGTH.unpack_from(data, pos + 8)[0]
            else:
                header, length = 8, _SHORT_LENGTH.unpack_from(data, pos + 6)[0]
            if length == _UNDEFINED:
                raise FileMetaError(f"file meta element (0002,{element:04X}) has an undefined length")
            end = pos + header + length
            if not _have(file, data, end):
                raise FileMetaError("file meta cut short")
            if element in _WANTED:
                values[element] = data[pos + header : end].decode("latin-1").rstrip("\0 ").strip()
            pos = end
    missing = [keyword for element, keyword in _WANTED.items() if not values.get(element)]
    if missing:
        raise FileMetaError(f"file meta lacks {', '.join(missing)}")
    return FileMeta(UID(values[0x0002]), values[0x0003], UID(values[0x0010]), pos)


def _have(file: BinaryIO, data: bytearray, end: int) -> bool:
    """Read on until `data` holds `end` bytes; False if the file ends first."""
    while len(data) < end:
        more = file.read(max(_FIRST_READ, end - len(data)))
        if not more:
            return False
        data += more
    return True
