"""Strict checks of a received data set, beyond what pydicom accepts.

:func:`validate_received` parses the bytes exactly as received (every element is decoded, so lazy
parsing errors surface here and not later in the pipeline) and checks:

* the identifying UIDs (SOP Class, SOP Instance, Study, Series) are present and syntactically valid,
  and the SOP Class/Instance UIDs agree with the C-STORE request's Affected SOP Class/Instance UIDs;
* an image storage SOP class carries pixel data;
* the image pixel module is consistent where pixel data is present: Rows, Columns, BitsAllocated,
  SamplesPerPixel, NumberOfFrames positive, and for native (uncompressed) transfer syntaxes the
  PixelData length matches Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames.

A reason quotes no value of the data set: pydicom's exception text, which may quote one (a name in the
wrong element, say), has its quoted values of more than two characters (a VR is two) replaced by ``'…'``
(:func:`medgru.logsafe.redact`), since the reason is logged and shown to admins.

Encapsulated (compressed) pixel data is not decoded: we store it as received even when no decoder is
available. A failure raises :class:`InvalidDataset` with a reason and the DIMSE status to answer.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID, UID_dictionary

from medgru.logsafe import redact
from pacs_listener.status import StoreStatus

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_MAX = 64
_VALID_BITS_ALLOCATED = {1, 8, 16, 32, 64}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class InvalidDataset(Exception):
    """A received data set we refuse: ``reason`` says what is wrong, ``status`` what we answer."""

    def __init__(self, reason: str, status: StoreStatus = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                 costly: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        #: refused because pydicom's parse would cost too much (a deflate bomb, too many elements, too deep):
        #: nothing may parse the data set afterwards, not even for the quarantine record's UIDs
        self.costly = costly


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
            f"data set cannot be parsed: {type(exc).__name__}: {redact(str(exc), keep_up_to=2)[:300]}", StoreStatus.CANNOT_UNDERSTAND
        ) from exc
    return ds


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
MAX_NESTING = 32
#: the most data elements a data set may hold, at every depth. pydicom keeps some 400 bytes and 20 us of
#: parsing per element, so 8-byte empty elements make a small request cost ~50 times its size in memory
#: (1 M of them, 8 MB sent: 380 MB more resident, 24 s of CPU, then again in the assembler and worker).
#: A large enhanced multi-frame or RT structure set holds a few hundred thousand. Sequence items count too:
#: an empty item is 8 bytes sent and a whole Dataset once parsed (1 M of them: 26 s of CPU, then stored)
MAX_ELEMENTS = 1_000_000
#: the most a deflated data set may inflate to: a few kilobytes of deflate can claim gigabytes (a
#: "deflate bomb"), which the check and then pydicom would each hold in memory; the deflated syntax
#: carries structured reports, waveforms and the like, far below this
MAX_INFLATED_BYTES = 512 * 2**20
_LITTLE = "little"


def _dataset_stream(file_bytes: bytes, transfer_syntax_uid: str) -> bytes | None:
    """The encoded data set after the file meta (inflated for the deflated syntax); None if unknown."""
    if len(file_bytes) < 144 or file_bytes[128:132] != b"DICM" or file_bytes[132:136] != b"\x02\x00\x00\x00":
        return None
    meta_end = 144 + int.from_bytes(file_bytes[140:144], "little")
    body = file_bytes[meta_end:]
    if UID(transfer_syntax_uid).is_deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, MAX_INFLATED_BYTES)
        except zlib.error as exc:
            raise InvalidDataset(f"deflated data set cannot be inflated: {exc}", StoreStatus.CANNOT_UNDERSTAND) from exc
        if inflater.unconsumed_tail:
            raise InvalidDataset(f"deflated data set inflates to more than {MAX_INFLATED_BYTES / 2**20:g} MiB "
                                 f"(MAX_INFLATED_BYTES), from {len(file_bytes) - meta_end} bytes",
                                 StoreStatus.CANNOT_UNDERSTAND, costly=True)
    return body


def _implicit_sequence(tag: int) -> bool:
    """Whether pydicom reads a defined-length element of ``tag`` in implicit VR as a sequence (its dictionary
    VR is SQ); it then parses every item and element in it."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def check_encoding(file_bytes: bytes, transfer_syntax_uid: str) -> None:
    """Walk every element header: no value may run past its container (pydicom silently truncates).

    Also bounds sequence nesting (:data:`MAX_NESTING`), which pydicom would recurse into.

    The value of a UN element of undefined length is a sequence encoded in implicit VR little endian
    whatever the transfer syntax (PS3.5 6.2.2: a private sequence forwarded by a PACS that lacks the
    private dictionary); it is walked as such, except that an item whose first element carries an explicit
    VR is walked as explicit VR, as pydicom reads it.
    """
    ts = UID(transfer_syntax_uid)
    body = _dataset_stream(file_bytes, transfer_syntax_uid)
    if body is None or not ts.is_transfer_syntax:
        return
    syntax = (ts.is_implicit_VR, (_LITTLE if ts.is_little_endian else "big"))

    def fail(pos: int, what: str) -> InvalidDataset:
        return InvalidDataset(f"malformed encoding at byte {pos} of the data set: {what}", StoreStatus.CANNOT_UNDERSTAND)

    def item_tag(pos: int, order: str) -> tuple[int, int]:
        # item and delimiter headers: (group, element) + 4-byte length, in the data set's byte order
        group = int.from_bytes(body[pos : pos + 2], order)
        elem = int.from_bytes(body[pos + 2 : pos + 4], order)
        return (group << 16) | elem, int.from_bytes(body[pos + 4 : pos + 8], order)

    def un_item_syntax(pos: int) -> tuple[bool, str]:
        # implicit VR little endian, unless the item's first element has two capital letters for a VR
        explicit = pos + 6 <= len(body) and all(0x41 <= b <= 0x5A for b in body[pos + 4 : pos + 6])
        return not explicit, _LITTLE

    def walk_items(pos: int, end: int | None, depth: int, syntax: tuple[bool, str], datasets: bool = True,
                   un_value: bool = False) -> int:
        """Items of a sequence (datasets) or fragments of encapsulated pixel data (not datasets) from pos;
        returns the position after the sequence. ``un_value``: the value of a UN of undefined length."""
        while end is None or pos < end:
            if pos + 8 > len(body):
                raise fail(pos, "sequence ends before its delimiter")
            tag, length = item_tag(pos, syntax[1])
            pos += 8
            if tag == _SEQ_END:
                if end is not None:
                    raise fail(pos, "sequence delimiter inside a defined-length sequence")
                return pos
            if tag != _ITEM:
                raise fail(pos - 8, f"expected an item tag, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            item_syntax = un_item_syntax(pos) if un_value else syntax
            if datasets:
                count_element()
            if length == _UNDEFINED:
                if not datasets:
                    raise fail(pos, "pixel data fragment of undefined length")
                pos = walk_elements(pos, None, depth + 1, item_syntax)
            else:
                if pos + length > len(body) or (end is not None and pos + length > end):
                    raise fail(pos, f"item of {length} bytes runs past the end")
                if datasets:
                    walk_elements(pos, pos + length, depth + 1, item_syntax)
                pos += length
        if pos != end:
            raise fail(pos, "sequence items overrun the sequence length")
        return pos

    elements = 0

    def count_element() -> None:
        nonlocal elements
        elements += 1
        if elements > MAX_ELEMENTS:
            raise InvalidDataset(f"more than {MAX_ELEMENTS} data elements and sequence items (MAX_ELEMENTS)",
                                 StoreStatus.CANNOT_UNDERSTAND, costly=True)

    def walk_elements(pos: int, end: int | None, depth: int, syntax: tuple[bool, str]) -> int:
        if depth > MAX_NESTING:
            raise InvalidDataset(f"malformed encoding at byte {pos} of the data set: sequences nested deeper than "
                                 f"{MAX_NESTING}", StoreStatus.CANNOT_UNDERSTAND, costly=True)
        implicit, order = syntax
        limit = len(body) if end is None else end
        while pos < limit:
            if pos + 8 > limit:
                raise fail(pos, "element header cut short")
            tag, _ = item_tag(pos, order)
            if tag == _ITEM_END:
                if end is not None or depth == 0:
                    raise fail(pos, "item delimiter inside a defined-length item")
                return pos + 8
            count_element()
            if implicit:
                vr, length, pos = None, int.from_bytes(body[pos + 4 : pos + 8], order), pos + 8
            else:
                vr = body[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    if pos + 12 > limit:
                        raise fail(pos, "element header cut short")
                    length, pos = int.from_bytes(body[pos + 8 : pos + 12], order), pos + 12
                else:
                    length, pos = int.from_bytes(body[pos + 6 : pos + 8], order), pos + 8
            if length == _UNDEFINED:
                if vr == b"UN":  # a sequence in implicit VR little endian whatever the syntax
                    pos = walk_items(pos, None, depth, (True, _LITTLE), un_value=True)
                    continue
                if vr not in (None, b"SQ", b"OB", b"OW"):
                    raise fail(pos, f"undefined length on VR {vr!r}")
                is_pixels = tag == 0x7FE00010 or vr in (b"OB", b"OW")
                pos = walk_items(pos, None, depth, syntax, datasets=not is_pixels)
                continue
            if pos + length > limit:
                raise fail(pos, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, "
                                f"only {limit - pos} remain")
            if length and (vr == b"SQ" or (implicit and _implicit_sequence(tag))):  # pydicom parses both
                walk_items(pos, pos + length, depth, syntax)
            pos += length
        if end is None and depth > 0:
            raise fail(pos, "item ends before its delimiter")
        return pos

    walk_elements(0, None, 0, syntax)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def check_identifiers(ds: Dataset, request: RequestIds) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, keyword)
        if not value:
            raise InvalidDataset(f"{keyword} is missing or empty")
        if not is_valid_uid(value):  # the value is not quoted: a modality may put a name there
            raise InvalidDataset(f"{keyword} is not a valid UID ({len(value)} characters; a UID is at most "
                                 f"{_UID_MAX} digits and dots)")
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


def _count_fragments(value: bytes, ts: UID) -> int:
    """Fragments of encapsulated pixel data after its Basic Offset Table item."""
    from pydicom.encaps import parse_fragments

    order = "little" if ts.is_little_endian else "big"
    if len(value) < 8:
        return 0
    bot_length = int.from_bytes(value[4:8], order)
    return parse_fragments(value[8 + bot_length:], endianness="<" if order == "little" else ">")[0]


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
        frames = _positive_int(ds, "NumberOfFrames", 1)
        try:
            fragments = _count_fragments(elem.value or b"", ts)
        except ValueError as exc:  # an item tag where none belongs: the fragments cannot be counted
            raise InvalidDataset(f"encapsulated PixelData cannot be parsed: {exc}") from exc
        if frames > fragments:  # PS3.5 A.4: a fragment holds data of one frame only
            raise InvalidDataset(f"NumberOfFrames {frames} exceeds the {fragments} fragments of the "
                                 f"encapsulated PixelData (a fragment holds one frame at most)")
        return
    expected = expected_native_length(ds)
    actual = len(elem.value or b"")
    frames = _positive_int(ds, "NumberOfFrames", 1)
    # too short is always wrong; trailing padding shorter than one frame is tolerated (an odd length is
    # padded to even; some writers pad more), a whole frame or more in excess means NumberOfFrames lies
    if actual < expected or actual - expected >= max(expected // frames, 2):
        raise InvalidDataset(
            f"PixelData has {actual} bytes, the pixel module (Rows {ds.get('Rows')} x Columns "
            f"{ds.get('Columns')} x SamplesPerPixel {ds.get('SamplesPerPixel', 1)} x BitsAllocated "
            f"{ds.get('BitsAllocated')} x NumberOfFrames {ds.get('NumberOfFrames', 1)}) implies {expected}"
        )


def validate_received(file_bytes: bytes, request: RequestIds) -> Dataset:
    """Parse and check a received instance; returns the parsed data set or raises :class:`InvalidDataset`."""
    if not is_valid_uid(str(request.sop_instance_uid)):
        raise InvalidDataset(f"request Affected SOP Instance UID {str(request.sop_instance_uid)[:80]!r} is invalid")
    check_encoding(file_bytes, request.transfer_syntax_uid)
    ds = parse_received(file_bytes)
    check_identifiers(ds, request)
    try:
        check_pixel_module(ds, request.transfer_syntax_uid)
    except InvalidDataset:
        raise
    except Exception as exc:  # odd VRs / values in the pixel module
        raise InvalidDataset(f"pixel module cannot be checked: {type(exc).__name__}: {redact(str(exc), keep_up_to=2)}") from exc
    return ds
