"""The TID 1500 SR built from real corpus instances: dciodvfy-clean, dsrdump-readable, round-trips."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from reporting.sr import ABNORMAL, NORMAL, build_sr
from reporting.uids import derive_uid, input_key
from tests.reporting import helpers as h

PATIENT_STUDY = ("PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber")


@pytest.fixture(scope="module")
def mr_series(dicom_corpus: Path) -> list[pydicom.Dataset]:
    files = sorted(dicom_corpus.glob(h.MR_SERIES_GLOB))
    assert len(files) > 5
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


@pytest.fixture(scope="module")
def dx(dicom_corpus: Path) -> pydicom.Dataset:
    return pydicom.dcmread(dicom_corpus / h.DX_FILE, stop_before_pixels=True)


@pytest.fixture(scope="module")
def cr(dicom_corpus: Path) -> pydicom.Dataset:
    return pydicom.dcmread(dicom_corpus / h.CR_FILE, stop_before_pixels=True)


def _heat(t: int) -> np.ndarray:
    return np.stack([h.blob((32, 32))] * t)


def _sources(name: str, mr_series, dx, cr) -> list[pydicom.Dataset]:
    return {"mr": mr_series, "dx": [dx], "cr": [cr]}[name]


@pytest.mark.parametrize("name", ["mr", "dx", "cr"])
def test_sr_is_valid_and_readable(name: str, mr_series, dx, cr, tmp_path: Path) -> None:
    sources = _sources(name, mr_series, dx, cr)
    det = h.detection(_heat(len(sources)))
    sr = build_sr(sources, det, h.card())
    path = tmp_path / f"{name}.dcm"
    sr.save_as(path, enforce_file_format=True)

    errors, warnings = h.dciodvfy(path)
    assert errors == [], "\n".join(errors)
    assert warnings == [], "\n".join(warnings)

    dump = h.dsrdump(path)
    assert "Imaging Measurement Report" in dump
    assert '"Score")="0.8731"' in dump
    assert '"Threshold Value")="0.5123"' in dump
    assert '"Impression")=(263654008,SCT,"Abnormal")' in dump
    assert '"Anomaly cluster")=(consolidation,99MEDGRU,"consolidation")' in dump
    assert '"Algorithm Name")="medgru-svc"' in dump
    assert '"Algorithm Version")="1.2.0"' in dump
    assert '"Observer Type")=(121007,DCM,"Device")' in dump
    assert "NOT FOR DIAGNOSTIC USE" in dump
    assert dump.count("Source of Measurement") == len({s.SOPInstanceUID for s in sources})

    back = h.strict_read(path)
    src = sources[-1]
    assert back.StudyInstanceUID == src.StudyInstanceUID
    for kw in PATIENT_STUDY:
        assert str(back.get(kw, "")) == str(src.get(kw, "") or "").rstrip("\x00 "), kw
    assert str(back.PatientName) == str(src.PatientName).rstrip("\x00 ")
    assert back.Manufacturer == "MedGRU"
    assert back.SeriesDescription.startswith("MedGRU")
    assert back.Modality == "SR"
    assert back.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert back.SOPInstanceUID == derive_uid(src.SeriesInstanceUID, "medgru-svc", "1.2.0", "sr-instance",
                                             input_key([(s.SOPInstanceUID, 1) for s in sources]))
    assert back.SeriesInstanceUID == derive_uid(src.SeriesInstanceUID, "medgru-svc", "1.2.0", "sr-series")
    assert back.SeriesInstanceUID != src.SeriesInstanceUID
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED",
                                                                                 "PRELIMINARY")
    evidence = back.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == src.StudyInstanceUID
    ref_series = evidence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in ref_series] == [src.SeriesInstanceUID]
    assert {i.ReferencedSOPInstanceUID for i in ref_series[0].ReferencedSOPSequence} == {
        s.SOPInstanceUID for s in sources}


def test_invalid_source_values_are_cleaned(mr_series) -> None:
    # the Brainix source has PatientSex "0000" and NUL-padded strings; the SR must not copy them
    assert mr_series[-1].PatientSex not in ("M", "F", "O", "")
    sr = build_sr(mr_series, h.detection(_heat(len(mr_series))), h.card())
    assert sr.PatientSex == ""
    assert "\x00" not in str(sr.PatientID) and sr.PatientID == str(mr_series[-1].PatientID).rstrip("\x00 ")


def test_uids_deterministic_and_versioned(dx) -> None:
    det = h.detection(_heat(1))
    a, b = build_sr([dx], det, h.card()), build_sr([dx], det, h.card())
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    c = build_sr([dx], h.detection(_heat(1), c=h.card("1.3.0")), h.card("1.3.0"))
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    assert c.StudyInstanceUID == a.StudyInstanceUID == dx.StudyInstanceUID


def test_normal_verdict_without_cluster(cr, tmp_path: Path) -> None:
    det = h.detection(_heat(1), score=0.1, threshold=0.5, cluster=None)
    sr = build_sr([cr], det, h.card())
    path = tmp_path / "normal.dcm"
    sr.save_as(path, enforce_file_format=True)
    dump = h.dsrdump(path)
    assert f'"Impression")=({NORMAL.value},SCT,"Normal")' in dump
    assert ABNORMAL.value not in dump
    assert "Anomaly cluster" not in dump
    assert "CodingSchemeIdentificationSequence" not in sr
    errors, warnings = h.dciodvfy(path)
    assert errors == [] and warnings == []


def test_prior_study_frames_go_to_other_evidence(dx, tmp_path: Path) -> None:
    prior = copy.deepcopy(dx)
    prior.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    prior.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    prior.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    prior.StudyDate = "20190101"
    sr = build_sr([prior, dx], h.detection(_heat(2)), h.card())
    assert sr.StudyInstanceUID == dx.StudyInstanceUID
    assert sr.StudyDate == dx.StudyDate
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == dx.StudyInstanceUID
    assert sr.PertinentOtherEvidenceSequence[0].StudyInstanceUID == prior.StudyInstanceUID
    path = tmp_path / "prior.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == []


def test_bad_input_is_named(dx) -> None:
    det, card = h.detection(_heat(1)), h.card()
    with pytest.raises(ValueError, match="source_datasets is empty"):
        build_sr([], det, card)
    with pytest.raises(TypeError, match="source_datasets must be a sequence"):
        build_sr(dx, det, card)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"source_datasets\[1\] must be a pydicom Dataset"):
        build_sr([dx, "x"], det, card)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="detection must be"):
        build_sr([dx], {"score": 1}, card)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="card must be"):
        build_sr([dx], det, "card")  # type: ignore[arg-type]
    broken = copy.deepcopy(dx)
    del broken.StudyInstanceUID
    with pytest.raises(ValueError, match="lacks StudyInstanceUID"):
        build_sr([broken], det, card)
    broken = copy.deepcopy(dx)
    broken.SeriesInstanceUID = "1.2.x"
    with pytest.raises(ValueError, match="SeriesInstanceUID '1.2.x' is not a valid UID"):
        build_sr([broken], det, card)


def test_retired_sop_class_and_acr_nema_dates(dicom_corpus: Path) -> None:
    # retired US Image Storage (unknown to highdicom's IOD tables), study date/time in ACR-NEMA form
    src = pydicom.dcmread(dicom_corpus / "dwv/data/gdcm-US-RGB-8-esopecho.dcm", stop_before_pixels=True)
    assert src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6" and src.StudyDate == "1994.11.05"
    sr = build_sr([src], h.detection(_heat(1)), h.card())
    assert (sr.StudyDate, sr.StudyTime) == ("19941105", "112000")
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    item = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPClassUID == src.SOPClassUID


@pytest.mark.parametrize("vr,raw,clean", [("DA", "1995.07.20", "19950720"), ("TM", "11:22:07", "112207"),
                                          ("TM", "11:22", "1122"), ("DA", "20200125", "20200125"),
                                          ("TM", "104702.826", "104702.826")])
def test_legacy_date_time_forms(vr: str, raw: str, clean: str) -> None:
    from reporting._source import _modernise

    assert _modernise(vr, raw) == clean


def test_per_frame_scores_become_one_measurement_group_per_frame(mr_series, tmp_path: Path) -> None:
    """A T > 1 detection with frame scores: the series group first, then one group per frame with that
    frame's score and a reference to its own instance; still dciodvfy-clean."""
    t = len(mr_series)
    scores = tuple(round(0.01 * (i + 1), 4) for i in range(t))
    det = h.detection(_heat(t), frame_scores=scores)
    refs = [(str(ds.SOPInstanceUID), 1) for ds in mr_series]
    sr = build_sr(mr_series, det, h.card(), frame_refs=refs)
    path = tmp_path / "frames.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = h.dciodvfy(path)
    assert errors == [] and warnings == [], "\n".join(errors + warnings)
    dump = h.dsrdump(path)
    assert dump.count('"Measurement Group"') == t + 1
    assert '"Tracking Identifier")="Frame 1 of' in dump  # (dsrdump shortens long texts)
    assert '"Score")="0.8731"' in dump  # the series' score, in the first group
    back = h.strict_read(path)
    groups = [item for item in back.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    frames = groups.ContentSequence[1:]
    assert len(frames) == t
    for i, g in enumerate(frames):
        num = [c for c in g.ContentSequence if c.ValueType == "NUM"][0]
        assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(scores[i])
        text = [c.TextValue for c in g.ContentSequence if c.ValueType == "TEXT"
                and c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"]
        assert text == [f"Frame {i + 1} of {t} (scored alone) - NOT FOR DIAGNOSTIC USE"]
        img = [c for c in g.ContentSequence if c.ValueType == "IMAGE"]
        assert [c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in img] == [refs[i][0]]

    # without frame references, one instance per frame maps by index; a mismatch is refused
    by_index = build_sr(mr_series, det, h.card())
    assert len(by_index.ContentSequence[-1].ContentSequence) == t + 1
    with pytest.raises(ValueError, match="frame_refs"):
        build_sr(mr_series, det, h.card(), frame_refs=refs[:-1])
    with pytest.raises(ValueError, match="not among the source datasets"):
        build_sr(mr_series, det, h.card(), frame_refs=[("1.2.3.4", 1)] * t)
    # a single image (T = 1) gets no per-frame group
    assert len(build_sr(mr_series[:1], h.detection(_heat(1)), h.card()).ContentSequence[-1].ContentSequence) == 1


def test_a_series_report_says_what_its_score_and_threshold_stand_for(mr_series, tmp_path: Path) -> None:
    """A series (T > 1) with a prior's two leading frames and no cluster: the first group carries the
    frames judged, the false-positive bound and the ConvGRU's score of all frames (private codes, the
    scheme declared though no cluster is named); the prior's frame groups say they were not judged;
    still dciodvfy-clean."""
    from dataclasses import replace

    t = len(mr_series)
    det = replace(h.detection(_heat(t), cluster=None, frame_scores=tuple(0.01 * (i + 1) for i in range(t))),
                  extras={"series_fpr_bound": 0.0336, "sequence_score": 1.25, "svdd_decision": 0.1})
    sr = build_sr(mr_series, det, h.card(), frame_refs=[(str(ds.SOPInstanceUID), 1) for ds in mr_series],
                  context_frames=2)
    path = tmp_path / "series.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = h.dciodvfy(path)
    assert errors == [] and warnings == [], "\n".join(errors + warnings)
    back = h.strict_read(path)
    assert [i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence] == ["99MEDGRU"]
    groups = [item for item in back.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    first = {c.ConceptNameCodeSequence[0].CodeValue: float(c.MeasuredValueSequence[0].NumericValue)
             for c in groups.ContentSequence[0].ContentSequence if c.ValueType == "NUM"}
    assert first["FRAMESJUDGED"] == t - 2 and first["FPRBOUND"] == pytest.approx(0.0336)
    assert first["SEQSCORE"] == pytest.approx(1.25) and "svdd_decision" not in str(first)
    labels = [[c.TextValue for c in g.ContentSequence if c.ValueType == "TEXT"][0]
              for g in groups.ContentSequence[1:]]
    assert [("not judged" in text) for text in labels] == [True, True] + [False] * (t - 2)
    assert labels[0] == f"Frame 1 of {t} (prior study, scored alone, not judged) - NOT FOR DIAGNOSTIC USE"
    # a single image: none of the series' items, and no private scheme without a cluster
    single = build_sr(mr_series[:1], h.detection(_heat(1), cluster=None), h.card())
    assert "CodingSchemeIdentificationSequence" not in single
    assert "FRAMESJUDGED" not in str(single.ContentSequence[-1].ContentSequence[0].ContentSequence)


def test_per_frame_groups_of_a_multi_frame_instance_name_the_frame(dicom_corpus: Path, tmp_path: Path) -> None:
    """An enhanced (multi-frame) CT: each frame's group names its frame number. A single-frame SOP class
    that carries Number of Frames > 1 anyway (a non-conformant MR) is referenced as a whole instance."""
    ds = pydicom.dcmread(dicom_corpus / "pydicom-data/eCT_Supplemental.dcm", stop_before_pixels=True)
    n = int(ds.NumberOfFrames)
    assert n > 1
    det = h.detection(_heat(n), frame_scores=tuple(0.1 + 0.01 * i for i in range(n)))
    sr = build_sr([ds], det, h.card(), frame_refs=[(str(ds.SOPInstanceUID), i + 1) for i in range(n)])
    path = tmp_path / "mf.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == [], "\n".join(errors)
    frames = h.strict_read(path).ContentSequence[-1].ContentSequence[1:]
    numbers = [[c for c in g.ContentSequence if c.ValueType == "IMAGE"][0].ReferencedSOPSequence[0].ReferencedFrameNumber
               for g in frames]
    assert [int(x) for x in numbers] == list(range(1, n + 1))
    # without references a multi-frame instance cannot be split by index: no per-frame groups
    assert len(build_sr([ds], det, h.card()).ContentSequence[-1].ContentSequence) == 1

    odd = pydicom.dcmread(dicom_corpus / "dwv/data/multiframe-test1.dcm", stop_before_pixels=True)
    assert odd.SOPClassUID == pydicom.uid.MRImageStorage and int(odd.NumberOfFrames) > 1
    m = int(odd.NumberOfFrames)
    det = h.detection(_heat(m), frame_scores=tuple(0.1 for _ in range(m)))
    sr = build_sr([odd], det, h.card(), frame_refs=[(str(odd.SOPInstanceUID), i + 1) for i in range(m)])
    sr.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    errors, _ = h.dciodvfy(tmp_path / "odd.dcm")
    # this corpus file's own UIDs use the illegal root 999.999: the SR must reference them as they are
    assert [e for e in errors if not ("Illegal root for UID" in e and '"999.999.' in e)] == []
    for g in h.strict_read(tmp_path / "odd.dcm").ContentSequence[-1].ContentSequence[1:]:
        img = [c for c in g.ContentSequence if c.ValueType == "IMAGE"][0]
        assert "ReferencedFrameNumber" not in img.ReferencedSOPSequence[0]


def test_a_revised_report_names_its_predecessors_and_stays_valid(dx, tmp_path: Path) -> None:
    """A report made again from other frames (a late slice) lists the earlier ones in
    PredecessorDocumentsSequence (same study, the same result series); its own UID, a re-run's, is left out.
    dciodvfy passes it without errors or warnings."""
    det = h.detection(_heat(1))
    first = build_sr([dx], det, h.card())
    sr = build_sr([dx], det, h.card(), predecessors=["1.2.826.0.1.3680043.10.9.7", first.SOPInstanceUID,
                                                      "1.2.826.0.1.3680043.10.9.7"])
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (sr.StudyInstanceUID, sr.SeriesInstanceUID)
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence] == [
        (pydicom.uid.Comprehensive3DSRStorage, "1.2.826.0.1.3680043.10.9.7")]
    path = tmp_path / "revised.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = h.dciodvfy(path)
    assert errors == [] and warnings == [], "\n".join(errors + warnings)
    assert "PredecessorDocumentsSequence" not in build_sr([dx], det, h.card(), predecessors=[first.SOPInstanceUID])


# the source's Specific Character Set as a modality writes it, with a patient name it covers (the Japanese
# and Korean corpus files carry their own names; the DX image keeps its ASCII one)
@pytest.mark.parametrize("path,charset", [
    ("pydicom/charset_files/chrH31.dcm", None),  # "\ISO 2022 IR 87": value 1 empty, the usual Japanese form
    ("pydicom/charset_files/chrI2.dcm", None),  # "\ISO 2022 IR 149": Korean
    (h.DX_FILE, ["", "ISO 2022 IR 58"]),  # Simplified Chinese (GB 2312) with code extensions
    (h.DX_FILE, ["ISO 2022 IR 6", "ISO 2022 IR 87"]),  # value 1 spelt out
    (h.DX_FILE, "ISO_IR 6"),  # the default repertoire, declared (many modalities write it)
])
def test_legal_source_character_sets_give_a_report(path: str, charset, dicom_corpus: Path, tmp_path: Path) -> None:
    """A source whose character set highdicom does not list (an empty value 1, ISO 2022 IR 149, ISO_IR 6)
    still gets its report: build_sr raised ValueError ("'' is not a valid SpecificCharacterSetValues"), so
    every job of such a series failed. The report keeps the source's character set (the default one is
    declared by absence), passes dciodvfy, and its patient name reads back as the source's."""
    src = pydicom.dcmread(dicom_corpus / path, stop_before_pixels=True)
    if charset is not None:
        src.SpecificCharacterSet = charset
    declared = src.SpecificCharacterSet
    sr = build_sr([src], h.detection(_heat(1)), h.card())
    out = tmp_path / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    errors, unexpected = h.dciodvfy(out)
    assert errors == [], "\n".join(errors)
    assert unexpected == [], "\n".join(unexpected)
    back = pydicom.dcmread(out)
    assert str(back.PatientName) == str(src.PatientName)
    expected = None if declared == "ISO_IR 6" else declared
    assert back.get("SpecificCharacterSet") == expected
    assert "Impression" in h.dsrdump(out)


def test_the_report_series_has_a_date(dx) -> None:
    """The SR's series carries its date and time (those of its content), so that a PACS study list shows
    when the report was made beside the source series' date; it had none."""
    sr = build_sr([dx], h.detection(_heat(1)), h.card())
    assert sr.SeriesDate == sr.ContentDate and len(str(sr.SeriesDate)) == 8
    assert sr.SeriesTime == sr.ContentTime
