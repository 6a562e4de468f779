"""Named DIMSE status codes answered by the listener.

Every code we answer is defined once here (pynetdicom's :class:`~pynetdicom.status.Status` where it has
a name for it) and checked against pynetdicom's Storage Service Class status table, so the rest of the
package never carries raw hex.
"""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, Status


class StoreStatus(IntEnum):
    """DIMSE statuses the C-STORE / C-ECHO SCP answers (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = Status.SUCCESS
    #: Refused: Out of Resources - disk full or the spool cannot be written.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class - missing/invalid UIDs, inconsistent pixel module.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand - the data set could not be parsed.
    CANNOT_UNDERSTAND = 0xC000
    #: Processing failure - an unexpected error while storing (database, ...).
    PROCESSING_FAILURE = 0x0110
    #: Refused: SOP Class not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Warning: Coercion of data elements (not used: we never modify what we receive).
    COERCION_OF_DATA_ELEMENTS = 0xB000


def refused_for_our_fault(code: int) -> bool:
    """Whether an instance answered ``code`` was refused for a fault on our side (0xA7xx out of resources:
    the disk or the spool; 0x0110 processing failure: the database...), not for its own data: the kept
    file may be stored by a retry once the fault is fixed (:mod:`pacs_listener.reingest`)."""
    return (code & 0xFF00) == StoreStatus.OUT_OF_RESOURCES or code == StoreStatus.PROCESSING_FAILURE


def describe(code: int) -> str:
    """``'Failure: Refused: Out of Resources'`` style text for logs and quarantine sidecars."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    if entry is None:
        return f"unknown status {code:#06x}"
    category, text = entry
    return f"{category}: {text}" if text else category


def is_success(code: int) -> bool:
    return code == StoreStatus.SUCCESS
