"""Strict checks of a received data set, beyond what pydicom accepts.

:func:`validate_received` parses the bytes exactly as received (every element is decoded, so lazy
parsing errors surface here and not later in the pipeline) and checks:

* the identifying UIDs (SOP Class, SOP Instance, Study, Series) are present and syntactically valid,
  and the SOP Class/Instance UIDs agree with the C-STORE request's Affected SOP Class/Instance UIDs;
* an image storage SOP class carries pixel data;
* the image pixel module is consistent where pixel data is present: Rows, Columns, BitsAllocated,
  SamplesPerPixel, NumberOfFrames positive, and for native (uncompressed) transfer syntaxes the
  PixelData length matches Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames.

Encapsulated (compressed) pixel data is not decoded: we store it as received even when no decoder is
available. A failure raises :class:`InvalidDataset` with a reason and the DIMSE status to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, UID_dictionary

from pacs_listener.status import StoreStatus

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_MAX = 64
_VALID_BITS_ALLOCATED = {1, 8, 16, 32, 64}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class InvalidDataset(Exception):
    """A received data set we refuse: ``reason`` says what is wrong, ``status`` what we answer."""

    def __init__(self, reason: str, status: StoreStatus = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class RequestIds:
    """What the C-STORE request says about the instance it carries."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: dotted decimal, no leading zeros, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= _UID_MAX and bool(_UID_RE.match(value))


def is_image_storage_class(sop_class_uid: str) -> bool:
    entry = UID_dictionary.get(sop_class_uid)
    return bool(entry) and entry[1] == "SOP Class" and "Image Storage" in entry[0]


def parse_received(file_bytes: bytes) -> Dataset:
    """Parse a whole Part 10 stream (preamble + meta + data set) and decode every element."""
    try:
        ds = dcmread(BytesIO(file_bytes))
        for elem in ds.iterall():  # decodes deferred raw elements: malformed values raise here
            _ = elem.value
    except Exception as exc:  # pydicom raises many kinds (ValueError, struct.error, RecursionError...)
        raise InvalidDataset(
            f"data set cannot be parsed: {type(exc).__name__}: {str(exc)[:300]}", StoreStatus.CANNOT_UNDERSTAND
        ) from exc
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def check_identifiers(ds: Dataset, request: RequestIds) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, keyword)
        if not value:
            raise InvalidDataset(f"{keyword} is missing or empty")
        if not is_valid_uid(value):
            raise InvalidDataset(f"{keyword} {value[:80]!r} is not a valid UID")
    if _text(ds, "SOPClassUID") != str(request.sop_class_uid).strip():
        raise InvalidDataset(
            f"SOPClassUID {_text(ds, 'SOPClassUID')} differs from the request's Affected SOP Class UID "
            f"{request.sop_class_uid}"
        )
    if _text(ds, "SOPInstanceUID") != str(request.sop_instance_uid).strip():
        raise InvalidDataset(
            f"SOPInstanceUID {_text(ds, 'SOPInstanceUID')} differs from the request's Affected SOP Instance "
            f"UID {request.sop_instance_uid}"
        )


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise InvalidDataset(f"{keyword} is missing although pixel data is present")
        value = default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidDataset(f"{keyword} {value!r} is not an integer") from exc
    if number <= 0:
        raise InvalidDataset(f"{keyword} is {number}, must be > 0")
    return number


def expected_native_length(ds: Dataset) -> int:
    """Bytes of native PixelData implied by the image pixel module (without the even-length pad)."""
    rows = _positive_int(ds, "Rows")
    cols = _positive_int(ds, "Columns")
    bits = _positive_int(ds, "BitsAllocated")
    samples = _positive_int(ds, "SamplesPerPixel", 1)
    frames = _positive_int(ds, "NumberOfFrames", 1)
    if bits not in _VALID_BITS_ALLOCATED:
        raise InvalidDataset(f"BitsAllocated {bits} is not one of {sorted(_VALID_BITS_ALLOCATED)}")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric == "YBR_FULL_422" and samples == 3:  # native 4:2:2 stores 2 samples per pixel
        total_bits = rows * cols * 2 * bits * frames
    else:
        total_bits = rows * cols * samples * bits * frames
    return (total_bits + 7) // 8


def check_pixel_module(ds: Dataset, transfer_syntax_uid: str) -> None:
    present = [kw for kw in _PIXEL_KEYWORDS if kw in ds]
    sop_class = _text(ds, "SOPClassUID")
    if not present:
        if is_image_storage_class(sop_class):
            raise InvalidDataset(f"image storage SOP class {sop_class} without pixel data")
        return
    if "PixelData" not in ds:
        for keyword in ("Rows", "Columns"):
            _positive_int(ds, keyword)
        return
    ts = UID(transfer_syntax_uid)
    elem = ds["PixelData"]
    if ts.is_encapsulated and ts.is_compressed:
        for keyword in ("Rows", "Columns"):
            _positive_int(ds, keyword)
        if not elem.is_undefined_length:
            raise InvalidDataset(f"PixelData is not encapsulated although transfer syntax {ts} is compressed")
        return
    expected = expected_native_length(ds)
    actual = len(elem.value or b"")
    # an odd length is padded by one byte to an even length
    if actual not in (expected, expected + (expected % 2)):
        raise InvalidDataset(
            f"PixelData has {actual} bytes, the pixel module (Rows {ds.get('Rows')} x Columns "
            f"{ds.get('Columns')} x SamplesPerPixel {ds.get('SamplesPerPixel', 1)} x BitsAllocated "
            f"{ds.get('BitsAllocated')} x NumberOfFrames {ds.get('NumberOfFrames', 1)}) implies {expected}"
        )


def validate_received(file_bytes: bytes, request: RequestIds) -> Dataset:
    """Parse and check a received instance; returns the parsed data set or raises :class:`InvalidDataset`."""
    if not is_valid_uid(str(request.sop_instance_uid)):
        raise InvalidDataset(f"request Affected SOP Instance UID {str(request.sop_instance_uid)[:80]!r} is invalid")
    ds = parse_received(file_bytes)
    check_identifiers(ds, request)
    try:
        check_pixel_module(ds, request.transfer_syntax_uid)
    except InvalidDataset:
        raise
    except Exception as exc:  # odd VRs / values in the pixel module
        raise InvalidDataset(f"pixel module cannot be checked: {type(exc).__name__}: {exc}") from exc
    return ds
