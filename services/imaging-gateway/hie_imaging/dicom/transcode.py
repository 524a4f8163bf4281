"""The relay's fallback: an instance rewritten in an uncompressed syntax when a peer refuses its own.

Only ever decompression into explicit or implicit VR little endian (scu.FALLBACK_SYNTAXES), never a
re-compression; the caller (scu._send_batch) deletes the temporary file after the C-STORE.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

# PS3.3 C.7.6.1.1.5: Lossy Image Compression Method (0028,2114) of the lossy-capable syntaxes.
_LOSSY_METHOD: Final[dict[str, str]] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    HTJ2K: "ISO_15444_15",
}


class TranscodeError(Exception):
    """An instance cannot be rewritten in an uncompressed syntax (no decoder, corrupt pixel data)."""


def transcode(path: Path, source: UID, target: UID) -> Path:
    """Write the Part 10 file at `path` (in `source`) in the uncompressed syntax `target` to a
    temporary Part 10 file (the caller deletes it); raise TranscodeError if it cannot be.

    Encapsulated pixel data is decompressed (as pydicom decodes it: YCbCr becomes RGB), the SOP
    Instance UID is kept (the pixel values are those of the instance as stored), and Lossy Image
    Compression is set to 01 when the compressed stream itself shows lossy coding (PS3.3
    C.7.6.1.1.5). Uncompressed and deflated data are only re-encoded.
    """
    if not source.is_little_endian:
        # pydicom re-encodes the element structure but not the byte order of OW/OF values.
        raise TranscodeError(f"no conversion from {source.name} (retired) is implemented")
    try:
        ds = dcmread(path)
        if source.is_compressed:
            _decompress(ds, source)
        ds.file_meta.TransferSyntaxUID = target
        handle, name = tempfile.mkstemp(prefix="hie-transcode-", suffix=".dcm")
        os.close(handle)
        out = Path(name)
        try:
            ds.save_as(out, enforce_file_format=True)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    except Exception as exc:  # any decoder or encoder error: the instance is not sent, nothing else
        detail = " ".join(str(exc).split())  # pydicom's decoder errors span several lines
        raise TranscodeError(f"{type(exc).__name__}: {detail}"[:200]) from exc
    return out


def _decompress(ds: Dataset, source: UID) -> None:
    compressed_bytes = len(ds.PixelData)
    lossy = _lossy_coded(ds.PixelData, source)
    # Encapsulated pixel data nested in items (the Icon Image Sequence, PS3.5 A.4) is encoded in the
    # same syntax and has to be decoded as well.
    nested = [
        item
        for element in list(ds.iterall())
        if element.VR == "SQ"
        for item in element.value
        if "PixelData" in item and item["PixelData"].is_undefined_length
    ]
    for item in nested:
        item.file_meta = FileMetaDataset()
        item.file_meta.TransferSyntaxUID = source
        item.decompress(generate_instance_uid=False)
        del item.file_meta
    ds.decompress(generate_instance_uid=False)
    # Only valid with encapsulated pixel data (PS3.5 A.4).
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)
    if lossy and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds and "LossyImageCompressionRatio" not in ds:
            ds.LossyImageCompressionMethod = _LOSSY_METHOD[source]
            ratio = len(ds.PixelData) / max(1, compressed_bytes)
            ds.LossyImageCompressionRatio = f"{ratio:.2f}"


def _lossy_coded(pixel_data: bytes, source: UID) -> bool:
    """True if the encapsulated frames show lossy coding: a JPEG DCT process, an irreversible JPEG
    2000 wavelet, JPEG-LS with NEAR > 0. False when the syntax is lossless or the stream does not say."""
    if source in (JPEGBaseline8Bit, JPEGExtended12Bit):
        return True
    if source not in _LOSSY_METHOD:
        return False
    fragments = generate_fragments(pixel_data)
    next(fragments, None)  # the Basic Offset Table
    if source == JPEGLSNearLossless:
        return any(_jpeg_ls_near(fragment) for fragment in fragments)
    return any(_j2k_irreversible(fragment) for fragment in fragments)


def _marker_segments(data: bytes, start: int) -> Iterator[tuple[int, int]]:
    """(marker, offset of its 2-byte length) of each marker segment from `start` (JPEG and J2K)."""
    offset = start
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        yield marker, offset + 2
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")


def _j2k_irreversible(fragment: bytes) -> bool:
    """ISO 15444-1 A.6.1: the COD segment's transformation byte, 0 = 9-7 irreversible wavelet."""
    if not fragment.startswith(b"\xff\x4f"):  # not the start of a codestream (SOC)
        return False
    for marker, at in _marker_segments(fragment, 2):
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4), levels, cb width, cb height, cb style, transform
            return at + 11 < len(fragment) and fragment[at + 11] == 0
        if marker in (0x90, 0x93):  # SOT, SOD: the main header is over
            break
    return False


def _jpeg_ls_near(fragment: bytes) -> int:
    """ISO 14495-1 C.2.3: the NEAR parameter of the first scan header (0 = lossless)."""
    if not fragment.startswith(b"\xff\xd8"):  # not the start of an image (SOI)
        return 0
    for marker, at in _marker_segments(fragment, 2):
        if marker == 0xDA:  # SOS: Ls, Ns, Ns x (Ci, Tmi), NEAR
            components = fragment[at + 2] if at + 2 < len(fragment) else 0
            near = at + 3 + 2 * components
            return fragment[near] if near < len(fragment) else 0
    return 0
