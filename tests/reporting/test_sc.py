"""The Grad-CAM overlay SC built from real corpus images: valid, RGB, coloured where hot, captioned."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from reporting.overlay import MIN_SHORT_SIDE, output_size, render_overlay
from reporting.sc import build_overlay_sc, patient_orientation, pick_frame
from reporting.uids import derive_uid, input_key
from tests.reporting import helpers as h

CASES = {"mr": "orthanc-tests/Brainix/Flair/IM-0001-0010.dcm", "dx": h.DX_FILE, "cr": h.CR_FILE}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, dicom_corpus: Path) -> tuple[str, pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(dicom_corpus / CASES[request.param])
    return request.param, ds, h.windowed(ds)


def _image_area(sc: pydicom.Dataset, src_shape: tuple[int, int]) -> tuple[int, int, int]:
    """(top row, height, width) of the image area inside the SC (the caption band is above it)."""
    ih, iw = output_size(*src_shape)
    return sc.Rows - ih, ih, iw


def test_sc_is_valid_rgb_with_colour_and_caption(case, tmp_path: Path) -> None:
    name, ds, frame = case
    heat = h.blob(frame.shape, cy=0.4, cx=0.6)
    det = h.detection(heat[None])
    sc = build_overlay_sc(ds, frame, heat, det, h.card())
    path = tmp_path / f"{name}.dcm"
    sc.save_as(path, enforce_file_format=True)

    errors, warnings = h.dciodvfy(path)
    assert errors == [], "\n".join(errors)
    assert warnings == [], "\n".join(warnings)

    back = h.strict_read(path)
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3 and back.BitsAllocated == 8
    assert back.BurnedInAnnotation == "YES"
    assert back.Manufacturer == "MedGRU"
    assert back.SeriesDescription.startswith("MedGRU Grad-CAM overlay")
    assert "NOT FOR DIAGNOSTIC USE" in back.ImageComments
    assert back.StudyInstanceUID == ds.StudyInstanceUID
    assert back.PatientID == str(ds.get("PatientID", "") or "").rstrip("\x00 ")
    assert str(back.PatientName) == str(ds.PatientName).rstrip("\x00 ")
    assert back.AccessionNumber == str(ds.AccessionNumber).rstrip("\x00 ")
    assert back.SOPInstanceUID == derive_uid(ds.SeriesInstanceUID, "medgru-svc", "1.2.0", "sc-instance",
                                             input_key([(ds.SOPInstanceUID, 1)]))
    assert back.SeriesInstanceUID == derive_uid(ds.SeriesInstanceUID, "medgru-svc", "1.2.0", "sc-series")
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID
    assert min(back.Rows, back.Columns) >= MIN_SHORT_SIDE

    px = back.pixel_array.astype(np.int16)
    assert px.shape == (back.Rows, back.Columns, 3)
    top, ih, iw = _image_area(back, frame.shape)
    # hot spot: clearly coloured (channels differ); far from it: grey (channels equal)
    hot = px[top + int(0.4 * ih) - 2: top + int(0.4 * ih) + 3, int(0.6 * iw) - 2: int(0.6 * iw) + 3]
    assert (hot.max(axis=2) - hot.min(axis=2)).min() > 50  # jet red, 60 % opaque
    cold = px[top + 2: top + ih // 10, 2: iw // 10]
    assert (cold.max(axis=2) - cold.min(axis=2)).max() == 0
    # caption band: text pixels, the first line yellow (the warning)
    band = px[:top]
    assert top >= 60
    assert (band.max(axis=2) > 128).sum() > 500
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 80)
    assert yellow[: top // 3].sum() > 100


def test_sc_uids_deterministic_and_versioned(dicom_corpus: Path) -> None:
    ds = pydicom.dcmread(dicom_corpus / h.DX_FILE)
    frame = h.windowed(ds)
    heat = h.blob(frame.shape)
    a = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card())
    b = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card())
    c = build_overlay_sc(ds, frame, heat, h.detection(heat[None], c=h.card("2.0")), h.card("2.0"))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
    assert np.array_equal(a.pixel_array, b.pixel_array)


def test_normal_caption_and_low_heat_stays_grey(dicom_corpus: Path) -> None:
    ds = pydicom.dcmread(dicom_corpus / h.CR_FILE)
    frame = h.windowed(ds)
    heat = np.full(frame.shape, 0.1, np.float32)
    det = h.detection(heat[None], score=0.2, threshold=0.5, cluster=None)
    sc = build_overlay_sc(ds, frame, heat, det, h.card())
    px = sc.pixel_array.astype(np.int16)
    top, ih, iw = _image_area(sc, frame.shape)
    area = px[top: top + ih, :iw]
    assert (area.max(axis=2) - area.min(axis=2)).max() == 0  # no colour at all below the heat floor
    assert "NORMAL" in sc.ImageComments


def test_pick_frame() -> None:
    heat = np.zeros((4, 8, 8), np.float32)
    heat[2, 3, 3] = 0.9
    heat[1, 0, 0] = 0.5
    assert pick_frame(heat) == 2
    tie = np.zeros((3, 4, 4), np.float32)
    tie[0, 0, 0] = tie[1, 0, 0] = 1.0
    tie[1, 1, 1] = 0.5  # same peak, larger mean
    assert pick_frame(tie) == 1
    assert pick_frame(np.zeros((3, 4, 4), np.float32)) == 0
    with pytest.raises(ValueError, match="shape"):
        pick_frame(np.zeros((4, 4), np.float32))


def test_mr_sequence_uses_hottest_frame(dicom_corpus: Path, tmp_path: Path) -> None:
    files = sorted(dicom_corpus.glob(h.MR_SERIES_GLOB))[:5]
    datasets = [pydicom.dcmread(f) for f in files]
    frames = np.stack([h.windowed(d) for d in datasets])
    heat = np.stack([h.blob(frames.shape[1:], sigma=0.05 + 0.02 * i) * (0.5 + 0.1 * i) for i in range(5)])
    heat[3] = np.clip(heat[3] * 2.0, 0, 1)
    t = pick_frame(heat)
    assert t == 3
    det = h.detection(heat.astype(np.float32))
    sc = build_overlay_sc(datasets[t], frames[t], heat[t], det, h.card(), frame_index=t)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == datasets[t].SOPInstanceUID
    path = tmp_path / "mr_seq.dcm"
    sc.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == []


def test_patient_orientation_from_source(dicom_corpus: Path) -> None:
    dx = pydicom.dcmread(dicom_corpus / h.DX_FILE, stop_before_pixels=True)
    assert patient_orientation(dx) == ("L", "F")
    mr = pydicom.dcmread(sorted(dicom_corpus.glob(h.MR_SERIES_GLOB))[0], stop_before_pixels=True)
    assert patient_orientation(mr) == ("L", "P")  # axial: rows run to the left, columns posterior
    cr = pydicom.dcmread(dicom_corpus / h.CR_FILE, stop_before_pixels=True)
    assert patient_orientation(cr) is None


def test_bad_input_is_named(dicom_corpus: Path) -> None:
    ds = pydicom.dcmread(dicom_corpus / h.DX_FILE)
    frame = h.windowed(ds)
    heat = h.blob(frame.shape)
    det = h.detection(heat[None])
    with pytest.raises(ValueError, match="frame .* and heatmap .* differ"):
        build_overlay_sc(ds, frame, heat[:-1], det, h.card())
    with pytest.raises(ValueError, match=r"heatmap must lie in \[0, 1\]"):
        build_overlay_sc(ds, frame, heat * 2, det, h.card())
    with pytest.raises(TypeError, match="frame must be a float array"):
        build_overlay_sc(ds, (frame * 255).astype(np.uint8), heat, det, h.card())
    with pytest.raises(ValueError, match="frame_index 3 is outside"):
        build_overlay_sc(ds, frame, heat, det, h.card(), frame_index=3)
    with pytest.raises(TypeError, match="source_dataset must be a pydicom Dataset"):
        build_overlay_sc("x", frame, heat, det, h.card())  # type: ignore[arg-type]
    broken = copy.deepcopy(ds)
    del broken.SOPInstanceUID
    with pytest.raises(ValueError, match="lacks SOPInstanceUID"):
        build_overlay_sc(broken, frame, heat, det, h.card())
    with pytest.raises(ValueError, match="shape"):
        render_overlay(frame[None], heat[None], [])


def test_frame_number_only_for_multi_frame_sop_classes(dicom_corpus: Path, tmp_path: Path) -> None:
    """A single-frame SOP class (MR Image Storage) that carries Number of Frames > 1 anyway is referenced as a
    whole instance: a Referenced Frame Number to it would be a dciodvfy error."""
    ds = pydicom.dcmread(dicom_corpus / "dwv/data/multiframe-test1.dcm")
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and int(ds.NumberOfFrames) > 1
    frame = h.windowed(ds)[3]
    heat = h.blob(frame.shape)
    sc = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card(), frame_index=3, n_frames=16,
                          source_frame_number=4)
    assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]
    path = tmp_path / "odd.dcm"
    sc.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    # this corpus file's own UIDs use the illegal root 999.999: the SC must reference them as they are
    assert [e for e in errors if not ("Illegal root for UID" in e and '"999.999.' in e)] == []


def test_frame_score_line_for_a_frame_explained_alone(dicom_corpus: Path, tmp_path: Path) -> None:
    """The worker's overlay of a multi-frame series shows one frame explained alone: a fourth caption line
    gives that frame's own score, red above the threshold; the SC stays valid."""
    from reporting.overlay import ABNORMAL_COLOUR, NORMAL_COLOUR
    from reporting.sc import caption_lines

    ds = pydicom.dcmread(dicom_corpus / CASES["mr"])
    frame = h.windowed(ds)
    heat = h.blob(frame.shape)
    det = h.detection(np.stack([heat] * 22), score=707.3, threshold=429.1)
    lines = caption_lines(det, h.card(), frame_index=0, n_frames=22, frame_score=825.9)
    assert lines[1][0].endswith("frame 1 of 22")
    assert lines[3] == ("this frame alone: score 825.9 (the highest of 22)", ABNORMAL_COLOUR)
    assert caption_lines(det, h.card(), frame_index=5, n_frames=22, frame_score=300.0)[3][1] == NORMAL_COLOUR
    assert len(caption_lines(det, h.card(), frame_index=0, n_frames=22)) == 3
    # a prior study's 2 frames lead the sequence and were not candidates: the highest of this study's 20
    assert caption_lines(det, h.card(), frame_index=4, n_frames=22, frame_score=300.0, frame_score_among=20)[3][0] \
        == "this frame alone: score 300 (the highest of 20 frames of this study)"

    plain = build_overlay_sc(ds, frame, heat, det, h.card(), frame_index=0, n_frames=22)
    scored = build_overlay_sc(ds, frame, heat, det, h.card(), frame_index=0, n_frames=22, frame_score=825.9)
    assert scored.Rows > plain.Rows and scored.Columns == plain.Columns  # one more caption line
    assert scored.ImageComments == plain.ImageComments  # the series' result, as before
    path = tmp_path / "scored.dcm"
    scored.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == [], "\n".join(errors)


@pytest.mark.parametrize("keyword,value,aspect", [
    ("ImagerPixelSpacing", [0.2, 0.1], 2.0),  # rows 0.2 mm apart, columns 0.1 mm: pixels twice as tall
    ("PixelSpacing", [0.5, 1.0], 0.5),  # twice as wide
    ("PixelAspectRatio", [4, 3], 4 / 3),  # vertical \ horizontal (ultrasound, secondary captures)
])
def test_non_square_pixels_are_shown_in_proportion(keyword: str, value, aspect: float, dicom_corpus: Path,
                                                   tmp_path: Path) -> None:
    """A viewer shows the source with its pixel spacing and the SC (which has none) with square pixels, so
    the SC resamples non-square pixels: its image area has the source's physical proportions and the heat
    stays on the same anatomy. It was drawn pixel for pixel, stretched against the image beside it."""
    ds = pydicom.dcmread(dicom_corpus / h.CR_FILE)
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        if kw in ds:
            delattr(ds, kw)
    setattr(ds, keyword, value)
    frame = h.windowed(ds)
    heat = h.blob(frame.shape, cy=0.3, cx=0.7, sigma=0.06)
    sc = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card())
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == [], "\n".join(errors)

    rows, cols = frame.shape
    shown = (rows * aspect, cols) if aspect > 1 else (rows, cols / aspect)
    ih, iw = output_size(round(shown[0]), round(shown[1]))
    assert (ih / iw) == pytest.approx(shown[0] / shown[1], rel=0.02)
    px = sc.pixel_array.astype(np.int16)
    top = sc.Rows - ih
    area = px[top:, :iw]
    # the image area ends where the colour bar panel begins: its last column is image, grey or coloured
    assert area.shape[:2] == (ih, iw)
    colour = area.max(axis=2) - area.min(axis=2)
    ys, xs = np.nonzero(colour > 60)
    assert len(ys) > 0
    assert ys.mean() / ih == pytest.approx(0.3, abs=0.05)
    assert xs.mean() / iw == pytest.approx(0.7, abs=0.05)


def test_patient_orientation_of_an_enhanced_multi_frame_source(dicom_corpus: Path) -> None:
    """An enhanced multi-frame image keeps its orientation in the Plane Orientation functional group, not
    at the top level: the SC of one of its frames has that frame's Patient Orientation (it was empty)."""
    ct = pydicom.dcmread(dicom_corpus / "pydicom-data/eCT_Supplemental.dcm")  # shared: [-1, 0, 0, 0, 1, 0]
    assert "ImageOrientationPatient" not in ct
    frames = h.windowed(ct)
    heat = h.blob(frames.shape[1:])
    sc = build_overlay_sc(ct, frames[1], heat, h.detection(np.stack([heat, heat])), h.card(), frame_index=1,
                          source_frame_number=2)
    assert list(sc.PatientOrientation) == ["R", "P"]

    mr = pydicom.dcmread(dicom_corpus / "pydicom-data/emri_small.dcm", stop_before_pixels=True)
    assert patient_orientation(mr, 3) is None  # no orientation anywhere: unknown
    sagittal = pydicom.Dataset()
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    mr.PerFrameFunctionalGroupsSequence = [pydicom.Dataset() for _ in range(int(mr.NumberOfFrames))]
    mr.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence = [sagittal]
    assert patient_orientation(mr, 3) == ("P", "F")  # frame 3's own
    assert patient_orientation(mr, 2) is None


def test_the_overlay_series_has_a_date(dicom_corpus: Path) -> None:
    """The SC's series carries its date and time (those of its content) for the PACS study list; it had none."""
    ds = pydicom.dcmread(dicom_corpus / h.DX_FILE)
    frame = h.windowed(ds)
    heat = h.blob(frame.shape)
    sc = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card())
    assert sc.SeriesDate == sc.ContentDate and len(str(sc.SeriesDate)) == 8
    assert sc.SeriesTime == sc.ContentTime


def test_a_frame_resized_to_the_sequence_s_first_frame_is_shown_in_the_source_s_proportions(
        dicom_corpus: Path) -> None:
    """A sequence's frames are resized to its first frame's size (a prior study's radiograph leads, a series
    of mixed sizes), so the frame the SC shows may have another shape than its source. Only the source's
    pixel spacing was corrected for: a landscape source squeezed into a square first frame stayed square
    in the SC, stretched against the image a viewer shows beside it."""
    import cv2

    ds = pydicom.dcmread(dicom_corpus / h.DX_FILE)  # 169 x 211, square pixels (1.2 mm)
    native = h.windowed(ds)
    rows, cols = native.shape
    assert abs(rows / cols - 1.0) > 0.1  # the source is not square
    side = min(rows, cols)
    frame = np.clip(cv2.resize(native, (side, side), interpolation=cv2.INTER_AREA), 0.0, 1.0)  # the sequence's
    heat = h.blob(frame.shape, cy=0.3, cx=0.7, sigma=0.06)
    sc = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card())
    px = sc.pixel_array.astype(np.int16)
    ih, iw = output_size(rows, cols)  # the source's proportions
    area = px[sc.Rows - ih:, :iw]
    colour = area.max(axis=2) - area.min(axis=2)
    ys, xs = np.nonzero(colour > 60)
    assert len(ys) > 0
    assert ys.mean() / ih == pytest.approx(0.3, abs=0.05)
    assert xs.mean() / iw == pytest.approx(0.7, abs=0.05)
    assert area[:, -1].any()  # the image fills the area to its last column: not narrower (square)


def test_an_oblique_source_gets_its_combined_patient_orientation(dicom_corpus: Path, tmp_path: Path) -> None:
    """An oblique slice (a brain MR along the AC-PC line) has direction cosines that need two letters, such
    as "PH". highdicom takes single letters only, so the SC of such a source raised ValueError ('PH' is
    not a valid PatientOrientationValuesBiped) and every job of an oblique series failed after its
    retries; the SC now carries the combined letters."""
    import math

    ds = pydicom.dcmread(sorted(dicom_corpus.glob(h.MR_SERIES_GLOB))[0])
    c, s = math.cos(0.3), math.sin(0.3)
    ds.ImageOrientationPatient = [1, 0, 0, 0, c, s]  # rows to the left; columns posterior and to the head
    assert patient_orientation(ds) == ("L", "PH")
    frame = h.windowed(ds)
    heat = h.blob(frame.shape)
    sc = build_overlay_sc(ds, frame, heat, h.detection(heat[None]), h.card())
    assert list(sc.PatientOrientation) == ["L", "PH"]
    path = tmp_path / "oblique.dcm"
    sc.save_as(path, enforce_file_format=True)
    errors, _ = h.dciodvfy(path)
    assert errors == []
