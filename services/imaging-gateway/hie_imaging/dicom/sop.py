"""The DICOM vocabulary the gateway speaks: storage SOP classes, transfer syntaxes, statuses."""

from __future__ import annotations

from typing import Final

from pydicom import uid
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

# Images a hub exchanges for referrals: cross-sectional, projection, ultrasound, captures, and the
# key-object note that marks which images matter (PS3.4 Annex B). pydicom.uid has the same UIDs as
# pynetdicom.sop_class, with static types.
STORAGE_SOP_CLASSES: Final[tuple[UID, ...]] = (
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.UltrasoundImageStorage,
    uid.UltrasoundMultiFrameImageStorage,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    uid.KeyObjectSelectionDocumentStorage,
)

VERIFICATION_SOP_CLASS: Final[UID] = UID("1.2.840.10008.1.1")

# Order matters: pynetdicom, as acceptor, picks the first of *our* syntaxes that the requestor offers.
# Explicit VR LE comes first so the VRs survive the hop; compressed syntaxes are accepted as sent and
# never transcoded, because the gateway relays bytes and must not touch pixel data.
TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50
    JPEGLosslessSV1,  # .4.70
    JPEGLossless,  # .4.57
    JPEGLSLossless,  # .4.80
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
    RLELossless,  # .5
    ExplicitVRBigEndian,  # retired in PS3.5, still sent by old modalities
)

# DIMSE statuses, PS3.4 Annex B.2.3 and PS3.7 Annex C.
STATUS_SUCCESS: Final = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC210
STATUS_PROCESSING_FAILURE: Final = 0xC211
STATUS_COERCION_OF_DATA_ELEMENTS: Final = 0xB000
STATUS_ELEMENTS_DISCARDED: Final = 0xB006
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Final = 0xB007

STORED_STATUSES: Final[frozenset[int]] = frozenset(
    {
        STATUS_SUCCESS,
        STATUS_COERCION_OF_DATA_ELEMENTS,
        STATUS_ELEMENTS_DISCARDED,
        STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)


def is_stored(status: int) -> bool:
    """Return True when the peer kept the instance (success or one of the storage warnings)."""
    return status in STORED_STATUSES
