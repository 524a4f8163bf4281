"""DICOM I/O of the imaging gateway: the Storage SCP, the C-STORE/C-ECHO SCU and the spool.

Pure DICOM and files; the database, NATS and HTTP wiring live elsewhere in the service.
"""

from hie_imaging.dicom.scp import ReceivedInstance, StorageServer
from hie_imaging.dicom.scu import AssociationFailedError, DicomEndpoint, UnreadableFileError, echo, send_files
from hie_imaging.dicom.sop import is_stored
from hie_imaging.dicom.spool import InstanceNotFoundError, InvalidUidError, Spool, SpoolError, SpoolFullError

__all__ = [
    "AssociationFailedError",
    "DicomEndpoint",
    "InstanceNotFoundError",
    "InvalidUidError",
    "ReceivedInstance",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "StorageServer",
    "UnreadableFileError",
    "echo",
    "is_stored",
    "send_files",
]
