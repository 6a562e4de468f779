import struct

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    CTImageStorage,
    MRImageStorage,
    RTPlanStorage,
    generate_uid,
)

from pacs_listener.status import StoreStatus
from pacs_listener.validate import InvalidDataset, RequestIds, is_valid_uid, validate_received

from .conftest import make_mr, to_file_bytes


def request_for(ds, ts=ExplicitVRLittleEndian, **override):
    fields = dict(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax_uid=ts)
    fields.update(override)
    return RequestIds(**fields)


def reject(data, request, status=StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS) -> str:
    with pytest.raises(InvalidDataset) as info:
        validate_received(data, request)
    assert info.value.status == status
    return info.value.reason


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_valid_native_instance_passes(ts):
    ds = make_mr()
    out = validate_received(to_file_bytes(ds, ts), request_for(ds, ts))
    assert out.SOPInstanceUID == ds.SOPInstanceUID


def test_odd_native_length_padded_to_even_passes():
    ds = make_mr(rows=3, cols=3)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(9) + b"\0"  # 9 bytes of pixels + the pad byte
    validate_received(to_file_bytes(ds), request_for(ds))


def test_one_bit_packed_pixels_pass():
    ds = make_mr(rows=4, cols=4)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = bytes(2)  # 16 pixels packed in 2 bytes
    validate_received(to_file_bytes(ds), request_for(ds))


def test_compressed_corpus_instance_passes_without_decoding(corpus_file):
    path = corpus_file("dicom-test-files/WG04/J2KI/NM1_J2KI")
    raw = path.read_bytes()
    ds = dcmread(path)
    validate_received(raw, request_for(ds, ds.file_meta.TransferSyntaxUID))


def test_instance_without_pixel_data_of_a_non_image_class_passes():
    ds = make_mr()
    del ds.PixelData
    ds.SOPClassUID = RTPlanStorage
    validate_received(to_file_bytes(ds), request_for(ds))


def test_unparseable_data_set_cannot_be_understood():
    ds = make_mr()
    data = to_file_bytes(ds)
    i = data.index(b"\x08\x00\x16\x00UI")  # SOPClassUID header: give it a VR that does not exist
    broken = data[:i] + b"\x08\x00\x16\x00ZZ" + data[i + 6 :]
    reason = reject(broken, request_for(ds), StoreStatus.CANNOT_UNDERSTAND)
    assert "cannot be parsed" in reason and "ZZ" in reason
    reject(b"", request_for(ds), StoreStatus.CANNOT_UNDERSTAND)
    reject(b"\0" * 132, request_for(ds), StoreStatus.CANNOT_UNDERSTAND)


def test_a_parser_error_quoting_a_value_is_redacted(monkeypatch):
    """The reason is logged and listed for admins: a value quoted by the parser's exception (here a patient
    name) does not reach it; the exception's kind and the rest of its text do."""
    ds = make_mr()

    def parser_quoting_a_value(*args, **kwargs):
        raise ValueError(f"invalid literal for int() with base 10: '{ds.PatientName}' in tag (0020,0013)")

    monkeypatch.setattr("pacs_listener.validate.dcmread", parser_quoting_a_value)
    reason = reject(to_file_bytes(ds), request_for(ds), StoreStatus.CANNOT_UNDERSTAND)
    assert str(ds.PatientName) and str(ds.PatientName) not in reason
    assert reason == "data set cannot be parsed: ValueError: invalid literal for int() with base 10: '…' in tag (0020,0013)"


@pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_identifier_rejected(keyword):
    ds = make_mr()
    request = request_for(ds)
    delattr(ds, keyword)
    assert keyword in reject(to_file_bytes(ds), request)


@pytest.mark.parametrize("bad", ["1.2.3.04", "1.2.abc", "1." + "2" * 70, "1..2", "../../etc"])
def test_invalid_uid_rejected(bad):
    ds = make_mr()
    ds.SeriesInstanceUID = bad
    reason = reject(to_file_bytes(ds), request_for(ds))
    assert "SeriesInstanceUID" in reason and "not a valid UID" in reason
    assert not is_valid_uid(bad)


def test_sop_class_mismatch_with_request_rejected():
    ds = make_mr()
    reason = reject(to_file_bytes(ds), request_for(ds, sop_class_uid=CTImageStorage))
    assert "Affected SOP Class UID" in reason


def test_sop_instance_mismatch_with_request_rejected():
    ds = make_mr()
    reason = reject(to_file_bytes(ds), request_for(ds, sop_instance_uid=generate_uid()))
    assert "Affected SOP Instance UID" in reason


def test_invalid_request_instance_uid_rejected():
    ds = make_mr()
    assert "request" in reject(to_file_bytes(ds), request_for(ds, sop_instance_uid="1.2.x"))


def test_image_class_without_pixel_data_rejected():
    ds = make_mr()
    del ds.PixelData
    assert "without pixel data" in reject(to_file_bytes(ds), request_for(ds))


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated"])
def test_missing_pixel_module_attribute_rejected(keyword):
    ds = make_mr()
    delattr(ds, keyword)
    ds["PixelData"].VR = "OW"  # unambiguous without BitsAllocated
    assert keyword in reject(to_file_bytes(ds), request_for(ds))


@pytest.mark.parametrize("keyword", ["Rows", "Columns"])
def test_zero_rows_or_columns_rejected(keyword):
    ds = make_mr()
    setattr(ds, keyword, 0)
    assert f"{keyword} is 0" in reject(to_file_bytes(ds), request_for(ds))


def test_unusual_bits_allocated_rejected():
    ds = make_mr()
    ds.BitsAllocated = 12
    assert "BitsAllocated 12" in reject(to_file_bytes(ds), request_for(ds))


def test_pixel_length_inconsistent_with_module_rejected():
    ds = make_mr(rows=4, cols=4)
    ds.NumberOfFrames = 3  # module says 3 frames, data holds one
    reason = reject(to_file_bytes(ds), request_for(ds))
    assert "PixelData has 32 bytes" in reason and "implies 96" in reason


def test_rows_inconsistent_corpus_file_rejected(corpus_file):
    path = corpus_file("synthetic_broken/rows_inconsistent_with_pixeldata.dcm")
    ds = dcmread(path)
    assert "PixelData has" in reject(path.read_bytes(), request_for(ds, ds.file_meta.TransferSyntaxUID))


def test_native_pixel_data_under_a_compressed_syntax_rejected():
    ds = make_mr()
    data = to_file_bytes(ds, ExplicitVRLittleEndian)
    # same bytes, but the request says the context's transfer syntax is JPEG 2000
    reason = reject(data, request_for(ds, ts=JPEG2000))
    assert "not encapsulated" in reason


def test_trailing_padding_shorter_than_a_frame_tolerated_whole_extra_frame_rejected():
    ds = make_mr(rows=4, cols=4)
    ds.PixelData = bytes(32 + 8)
    validate_received(to_file_bytes(ds), request_for(ds))
    ds.PixelData = bytes(64)
    assert "implies 32" in reject(to_file_bytes(ds), request_for(ds))


@pytest.mark.parametrize("cut", [20, 40, 700])
def test_truncated_stream_cannot_be_understood(cut):
    """pydicom silently accepts a value running past the end; we do not."""
    ds = make_mr(rows=16, cols=16)
    data = to_file_bytes(ds)
    reason = reject(data[: len(data) - cut], request_for(ds), StoreStatus.CANNOT_UNDERSTAND)
    assert "malformed encoding" in reason


def test_deeply_nested_sequences_rejected_before_pydicom_recurses():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = make_mr()
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(60):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    reason = reject(to_file_bytes(ds), request_for(ds), StoreStatus.CANNOT_UNDERSTAND)
    assert "nested deeper" in reason


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_nested_sequences_of_defined_and_undefined_length_walk_cleanly(ts):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = make_mr()
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.ReferencedSOPClassUID = MRImageStorage
    ds.ReferencedImageSequence = Sequence([item, item])
    validate_received(to_file_bytes(ds, ts), request_for(ds, ts))


def test_deflated_real_file_passes(corpus_file):
    path = corpus_file("pydicom/test_files/image_dfl.dcm")
    ds = dcmread(path)
    validate_received(path.read_bytes(), request_for(ds, ds.file_meta.TransferSyntaxUID))


def test_deflate_bomb_is_refused_before_it_is_inflated_whole(monkeypatch):
    """A deflated data set that inflates past MAX_INFLATED_BYTES is refused (0xC000) with the reason, after
    inflating no more than the limit; below the limit the same data set passes."""
    import pacs_listener.validate as validate

    ds = make_mr()
    ds.add_new(0x00091010, "OB", bytes(8 * 2**20))  # 8 MiB of zeros: a few KiB deflated
    ds.add_new(0x00090010, "LO", "BOMB TEST")
    data = to_file_bytes(ds, DeflatedExplicitVRLittleEndian)
    assert len(data) < 64 * 1024
    validate_received(data, request_for(ds, DeflatedExplicitVRLittleEndian))
    monkeypatch.setattr(validate, "MAX_INFLATED_BYTES", 2**20)
    with pytest.raises(InvalidDataset) as err:
        validate_received(data, request_for(ds, DeflatedExplicitVRLittleEndian))
    assert err.value.status == StoreStatus.CANNOT_UNDERSTAND
    assert "inflates to more than 1 MiB" in err.value.reason


_ITEM_UNDEFINED = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _explicit_le(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def _with_private_un_in_item(un_value: bytes):
    """An MR instance (explicit VR little endian) whose ReferencedImageSequence item, of undefined length,
    holds a private sequence sent as UN of undefined length (PS3.5 6.2.2: what a PACS without the private
    dictionary forwards), with ``un_value`` as its value."""
    ds = make_mr()
    data = to_file_bytes(ds)
    sequence = (
        struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00\xff\xff\xff\xff" + _ITEM_UNDEFINED
        + _explicit_le(0x0008, 0x1150, b"UI", b"1.2.3\x00") + _explicit_le(0x0008, 0x1155, b"UI", b"1.2.4\x00")
        + _explicit_le(0x0009, 0x0010, b"LO", b"ACME")
        + struct.pack("<HH", 0x0009, 0x1010) + b"UN\x00\x00\xff\xff\xff\xff" + un_value
        + _ITEM_DELIMITER + _SEQUENCE_DELIMITER
    )
    at = data.index(b"\x10\x00\x10\x00PN")  # PatientName, the first element after group 0008
    return ds, data[:at] + sequence + data[at:]


@pytest.mark.parametrize(
    "item_content",
    [
        struct.pack("<HHI", 0x0008, 0x0100, 2) + b"Y ",  # implicit VR little endian, as PS3.5 says
        _explicit_le(0x0008, 0x0100, b"SH", b"Y "),  # explicit VR, which pydicom reads too
    ],
    ids=["implicit", "explicit"],
)
def test_private_sequence_as_un_of_undefined_length_inside_an_item_passes(item_content):
    ds, data = _with_private_un_in_item(_ITEM_UNDEFINED + item_content + _ITEM_DELIMITER + _SEQUENCE_DELIMITER)
    out = validate_received(data, request_for(ds))
    item = out.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == "1.2.4"
    assert item[0x00091010].value[0][0x00080100].value == "Y"
    assert len(out.PixelData) == len(ds.PixelData)


def test_private_sequence_as_un_without_its_delimiter_cannot_be_understood():
    content = _ITEM_UNDEFINED + struct.pack("<HHI", 0x0008, 0x0100, 2) + b"Y " + _ITEM_DELIMITER
    ds, data = _with_private_un_in_item(content)  # no sequence delimiter: the item's delimiter comes next
    assert "malformed encoding" in reject(data, request_for(ds), StoreStatus.CANNOT_UNDERSTAND)


def _jpeg_mr(n_frames: int, n_fragments: int):
    from pydicom.encaps import encapsulate

    ds = make_mr(rows=8, cols=8, BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.NumberOfFrames = n_frames
    ds.PixelData = encapsulate([b"\xff\xd8fake\xff\xd9"] * n_fragments)
    ds["PixelData"].VR = "OB"
    return ds


def test_encapsulated_number_of_frames_beyond_its_fragments_is_refused(make_settings, sqlite_session_factory):
    """NumberOfFrames was not checked for compressed pixel data: one fragment claiming 2,000,000,000 frames
    was answered Success; the assembler then built a frame list of that length (hundreds of GB)."""
    from pydicom.uid import JPEGBaseline8Bit
    from sqlalchemy import select

    from pacs_listener.scp import Listener
    from storage.models import QuarantineItem

    from .conftest import store_with

    listener = Listener(make_settings(min_free_disk_mb=0), sqlite_session_factory)
    ok = _jpeg_mr(2, 2)
    assert store_with(listener, ok, JPEGBaseline8Bit) == StoreStatus.SUCCESS
    bad = _jpeg_mr(2_000_000_000, 1)
    assert store_with(listener, bad, JPEGBaseline8Bit) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    with sqlite_session_factory() as s:
        assert "NumberOfFrames" in s.scalars(select(QuarantineItem)).one().reason


def test_an_invalid_uid_is_not_quoted_in_the_log_or_the_reason(make_settings, sqlite_session_factory, caplog):
    """A modality that writes the patient's name into a UID element: the refusal's reason (logged, kept in
    the quarantine table, shown on the dashboard) quoted the value."""
    import logging

    from sqlalchemy import select

    from pacs_listener.scp import Listener
    from storage.models import QuarantineItem

    from .conftest import store_with

    listener = Listener(make_settings(min_free_disk_mb=0), sqlite_session_factory)
    ds = make_mr(SeriesInstanceUID="DOE^JOHN")
    with caplog.at_level(logging.INFO):
        assert store_with(listener, ds) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pacs_listener")]
    assert ours and not any("DOE" in m for m in ours)
    with sqlite_session_factory() as s:
        reason = s.scalars(select(QuarantineItem)).one().reason
    assert "DOE" not in reason and "SeriesInstanceUID" in reason


def test_encapsulated_pixel_data_whose_fragments_cannot_be_parsed_is_refused(make_settings, sqlite_session_factory):
    """Counting the fragments must not turn a malformed item into a failure of the handler: a named refusal."""
    from pydicom.uid import JPEGBaseline8Bit

    from pacs_listener.scp import Listener

    from .conftest import store_with

    ds = _jpeg_mr(1, 1)
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\x00\x01\x02\x03\x04\x05\x06\x07"
    listener = Listener(make_settings(min_free_disk_mb=0), sqlite_session_factory)
    assert store_with(listener, ds, JPEGBaseline8Bit) in (StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                                          StoreStatus.CANNOT_UNDERSTAND)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_data_set_of_more_elements_than_max_elements_is_refused_before_it_is_parsed(monkeypatch, ts):
    """Empty data elements cost 8 bytes to send and some 400 bytes and 20 us each once pydicom has parsed
    them: 1 M of them (8 MB) made medgru serve 380 MB larger for 24 s and were stored (seen live), so a
    100 MB request held gigabytes. A data set with more than MAX_ELEMENTS elements, counted at every depth
    (here most of them in a sequence item), is refused with 0xC000 and the reason; at the bound it passes."""
    from pydicom.dataset import Dataset

    import pacs_listener.validate as validate

    ds = make_mr()
    item = Dataset()
    for element in range(0x1010, 0x1010 + 40):
        item.add_new((0x0009, element), "LO", "")
    item.add_new((0x0009, 0x0010), "LO", "MANY")
    ds.add_new((0x0009, 0x0010), "LO", "MANY")
    ds.add_new((0x0009, 0x1001), "SQ", [item])
    data = to_file_bytes(ds, ts)
    parsed = list(dcmread(__import__("io").BytesIO(data)).iterall())
    total = len(parsed) + sum(len(e.value) for e in parsed if e.VR == "SQ")  # and the items pydicom parses
    monkeypatch.setattr(validate, "MAX_ELEMENTS", total, raising=False)
    validate_received(data, request_for(ds, ts))
    monkeypatch.setattr(validate, "MAX_ELEMENTS", total - 1, raising=False)
    reason = reject(data, request_for(ds, ts), StoreStatus.CANNOT_UNDERSTAND)
    assert f"more than {total - 1} data elements" in reason


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_sequence_items_count_towards_max_elements(monkeypatch, ts):
    """MAX_ELEMENTS counted data elements only, and an empty sequence item, 8 bytes sent as an empty element
    is, is a whole Dataset once pydicom has parsed it: 1 M empty items in one sequence (8 MB) passed the
    check, cost medgru serve 26 s of CPU and were stored with Success (seen live), to be parsed again by
    the assembler and the worker. In implicit VR a sequence of defined length (as pydicom and most writers
    encode it) was not walked at all, so neither its items nor their elements counted (seen live: 1 M empty
    elements in one item stored, 30 s of CPU). Items count towards the bound, and a defined-length
    element whose dictionary VR is SQ is walked in implicit VR, as pydicom parses it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    import pacs_listener.validate as validate

    ds = make_mr()
    items = [Dataset() for _ in range(300)]  # 200 empty items, 100 of one element
    for item in items[200:]:
        item.CodeValue = "1"
    ds.add_new((0x0040, 0x0260), "SQ", Sequence(items))  # Performed Protocol Code Sequence
    data = to_file_bytes(ds, ts)
    elements = sum(1 for _ in dcmread(__import__("io").BytesIO(data)).iterall())  # the items not among them
    monkeypatch.setattr(validate, "MAX_ELEMENTS", elements + 300, raising=False)
    validate_received(data, request_for(ds, ts))
    monkeypatch.setattr(validate, "MAX_ELEMENTS", elements + 299, raising=False)
    reason = reject(data, request_for(ds, ts), StoreStatus.CANNOT_UNDERSTAND)
    assert f"more than {elements + 299} data elements and sequence items" in reason
