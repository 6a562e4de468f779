"""The IOCM rejection note of results a revision replaced: a valid Key Object Selection document."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from reporting.kos import KOS_SERIES_NUMBER, RejectedObject, build_rejection_note
from reporting.sc import build_overlay_sc
from reporting.sr import build_sr
from tests.reporting import helpers as h


@pytest.fixture(scope="module")
def earlier(dicom_corpus: Path):
    """The DX source and the SR and SC of an earlier result on it."""
    ds = pydicom.dcmread(dicom_corpus / h.DX_FILE)
    frame = h.windowed(ds)
    heat = h.blob(frame.shape)
    det = h.detection(heat[None])
    return ds, build_sr([ds], det, h.card()), build_overlay_sc(ds, frame, heat, det, h.card())


def _rejected(*objects) -> list[RejectedObject]:
    return [RejectedObject(str(o.SeriesInstanceUID), str(o.SOPClassUID), str(o.SOPInstanceUID)) for o in objects]


def test_the_note_rejects_the_earlier_objects_in_their_study_and_is_valid(earlier, tmp_path: Path) -> None:
    source, sr, sc = earlier
    refs = [(str(source.SOPInstanceUID), 1), ("1.2.826.0.1.3680043.10.9.8", 1)]  # the revision's frames
    note = build_rejection_note(source, _rejected(sr, sc), h.card(), frame_refs=refs)
    # IOCM: the title says why, the content and the evidence list exactly the rejected instances
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    listed = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in note.ContentSequence
              if "ReferencedSOPSequence" in item}
    assert listed == {str(sr.SOPInstanceUID), str(sc.SOPInstanceUID)}
    (study,) = note.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID == note.StudyInstanceUID
    evidence = {(str(s.SeriesInstanceUID), str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert evidence == {(str(sr.SeriesInstanceUID), Comprehensive3DSRStorage, str(sr.SOPInstanceUID)),
                        (str(sc.SeriesInstanceUID), SecondaryCaptureImageStorage, str(sc.SOPInstanceUID))}
    assert note.PatientID == source.PatientID and note.SeriesNumber == KOS_SERIES_NUMBER
    assert note.SeriesInstanceUID not in {sr.SeriesInstanceUID, sc.SeriesInstanceUID}
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    errors, warnings = h.dciodvfy(path)
    assert errors == [] and warnings == [], "\n".join(errors + warnings)
    assert "Rejected for Quality Reasons" in h.dsrdump(path)
    # the same revision gives the same note (a re-run sends it again, the PACS keeps one); another, another
    again = build_rejection_note(source, _rejected(sr, sc), h.card(), frame_refs=refs)
    assert again.SOPInstanceUID == note.SOPInstanceUID
    assert build_rejection_note(source, _rejected(sr), h.card(), frame_refs=refs[:1]).SOPInstanceUID != note.SOPInstanceUID


def test_nothing_to_reject_or_a_bad_uid_is_refused(earlier) -> None:
    source, sr, _ = earlier
    with pytest.raises(ValueError, match="at least one"):
        build_rejection_note(source, [], h.card(), frame_refs=[(str(source.SOPInstanceUID), 1)])
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_rejection_note(source, [RejectedObject(str(sr.SeriesInstanceUID), Comprehensive3DSRStorage, "x.1")],
                             h.card(), frame_refs=[(str(source.SOPInstanceUID), 1)])


@pytest.mark.parametrize("charset", [["", "ISO 2022 IR 87"], "ISO_IR 6", "ISO_IR 192", "ISO_IR 100"])
def test_legal_source_character_sets_give_a_note(earlier, charset, tmp_path: Path) -> None:
    # highdicom took the note's character set from the first referenced object and refused "\ISO 2022 IR 87"
    source, sr, _ = earlier
    source = copy.deepcopy(source)
    source.SpecificCharacterSet = charset
    note = build_rejection_note(source, _rejected(sr), h.card(), frame_refs=[(str(source.SOPInstanceUID), 1)])
    assert note.SeriesDate == note.ContentDate
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == [], "\n".join(errors)
