"""The Grad-CAM overlay as a DICOM Secondary Capture image.

One single-frame RGB 8-bit SC per result: the frame the worker chooses (the frame with the highest own
score, explained alone, where a detector scores frames; else the frame where the heat map peaks,
:func:`pick_frame`), windowed grey with the heat map blended in, a colour bar with its 0..1 scale and a
burnt-in caption: "NOT FOR DIAGNOSTIC USE", model name and version, score / threshold / verdict (see
:mod:`reporting.overlay`). One frame and not a multi-frame SC because every PACS viewer shows a
single-frame RGB SC, while multi-frame SC (true colour) support is patchy, and the SR already carries the
full result; the caption says which frame of how many is shown.

``BurnedInAnnotation`` is YES (the caption and scale are in the pixels). Patient and study attributes are
copied from the source (cleaned by :mod:`reporting._source`), so the SC lands in the source study; it
references the source image in ``SourceImageSequence`` and ``ReferencedSeriesSequence``. UIDs come from
:mod:`reporting.uids` (source series + model name + version + "sc-series"/"sc-instance", and for the
instance the frames the result was computed from).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.api import NOT_FOR_DIAGNOSTIC_USE, Detection, ModelCard
from reporting import _source
from reporting.overlay import (
    ABNORMAL_COLOUR,
    CAPTION_COLOUR,
    NORMAL_COLOUR,
    TEXT_COLOUR,
    check_unit_image,
    pick_frame,
    render_overlay,
    square_pixels,
)
from reporting.uids import SC_INSTANCE, SC_SERIES, derive_uid, input_key

__all__ = ["build_overlay_sc", "pick_frame", "caption_lines", "patient_orientation", "pixel_aspect",
           "shown_aspect"]

log = logging.getLogger(__name__)

MANUFACTURER = "MedGRU"
SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = f"MedGRU Grad-CAM overlay ({NOT_FOR_DIAGNOSTIC_USE})"
DERIVATION_DESCRIPTION = "Grad-CAM heat map (jet colours) blended on the windowed source image; caption burnt in"
# CID 7202 Source Image Purposes of Reference
SOURCE_PURPOSE = hd.sr.CodedConcept(
    value="121322", scheme_designator="DCM", meaning="Source image for image processing operation"
)
_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # DICOM patient axes: +x left, +y posterior, +z head


def caption_lines(detection: Detection, card: ModelCard, *, frame_index: int = 0, n_frames: int = 1,
                  frame_score: float | None = None, frame_score_among: int | None = None
                  ) -> list[tuple[str, tuple[int, int, int]]]:
    """The burnt-in caption: warning, model (with the shown frame), the series' result (with cluster label)
    and, where ``frame_score`` is given, a fourth line with the shown frame's own score: the highest of the
    sequence, or of the ``frame_score_among`` frames of the current study where a prior study's frames,
    not shown, lead the sequence."""
    verdict = detection.verdict.upper()
    result = f"score {detection.score:.4g} / threshold {detection.threshold:.4g}: {verdict}"
    if detection.cluster_label:
        result += f" ({detection.cluster_label})"
    model = f"{card.name} v{card.version}"
    if n_frames > 1:
        model += f" - frame {frame_index + 1} of {n_frames}"
    lines = [
        (NOT_FOR_DIAGNOSTIC_USE, CAPTION_COLOUR),
        (model, TEXT_COLOUR),
        (result, ABNORMAL_COLOUR if detection.is_anomaly else NORMAL_COLOUR),
    ]
    if frame_score is not None:
        above = frame_score > detection.threshold
        if frame_score_among is None:
            among = f"the highest of {n_frames}"
        else:
            frames = "frame" if frame_score_among == 1 else "frames"
            among = f"the highest of {frame_score_among} {frames} of this study"
        lines.append((f"this frame alone: score {frame_score:.4g} ({among})",
                      ABNORMAL_COLOUR if above else NORMAL_COLOUR))
    return lines


def _letters(vector: np.ndarray) -> str:
    """Patient orientation letters of a direction cosine, strongest axis first (components >= 0.25)."""
    order = np.argsort(-np.abs(vector))
    out = ""
    for axis in order:
        c = float(vector[axis])
        if abs(c) >= 0.25:
            out += _AXES[axis][0] if c > 0 else _AXES[axis][1]
    return out


def _pair(value) -> tuple[float, float] | None:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (a, b) if a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b) else None


def pixel_aspect(ds: Dataset) -> float | None:
    """How many times taller than wide the source's pixels are shown (row spacing / column spacing): from
    Pixel Spacing, else Imager Pixel Spacing, else the enhanced multi-frame Pixel Measures (shared, then
    the first frame's), else Pixel Aspect Ratio (vertical \\ horizontal). ``None`` if unknown."""
    candidates = [ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")]
    for groups_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_kw)
        measures = groups[0].get("PixelMeasuresSequence") if groups else None
        if measures:
            candidates.append(measures[0].get("PixelSpacing"))
    for value in candidates:
        if value is not None and (pair := _pair(value)) is not None:
            return pair[0] / pair[1]
    ratio = ds.get("PixelAspectRatio")
    if ratio is not None and (pair := _pair(ratio)) is not None:
        return pair[0] / pair[1]
    return None


def shown_aspect(ds: Dataset, shape: tuple[int, int]) -> float | None:
    """The aspect (:func:`pixel_aspect`) of the pixels of a frame of ``shape`` that shows the whole of
    source ``ds``: a sequence resizes its frames to its first frame's size (a prior study's image leads, a
    series of mixed sizes), so a frame may have other pixels than its source (Rows x Columns) has."""
    aspect = pixel_aspect(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return aspect
    if rows <= 0 or cols <= 0 or tuple(shape) == (rows, cols):
        return aspect
    return (1.0 if aspect is None else aspect) * (rows / shape[0]) / (cols / shape[1])


def patient_orientation(ds: Dataset, frame: int = 1) -> tuple[str, str] | None:
    """The source's (row, column) Patient Orientation, from PatientOrientation or ImageOrientationPatient
    (of an enhanced multi-frame image: its Plane Orientation, shared or of 1-based ``frame``).

    Scaling and padding keep the in-plane directions, so the SC inherits them. ``None`` if unknown.
    """
    po = ds.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(str(v) and set(str(v)) <= set("LRAPHF") for v in po):
        return str(po[0]), str(po[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is None:  # an enhanced multi-frame image: the Plane Orientation functional group
        for groups_kw, i in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", frame - 1)):
            groups = ds.get(groups_kw)
            plane = groups[i].get("PlaneOrientationSequence") if groups is not None and 0 <= i < len(groups) else None
            if plane:
                iop = plane[0].get("ImageOrientationPatient")
                break
    if iop is not None and len(iop) == 6:
        try:
            cos = np.asarray([float(v) for v in iop], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        row, col = _letters(cos[:3]), _letters(cos[3:])
        if row and col:
            return row, col
    return None


def build_overlay_sc(
    source_dataset: Dataset,
    frame: np.ndarray,
    heatmap: np.ndarray,
    detection: Detection,
    card: ModelCard,
    *,
    frame_index: int = 0,
    n_frames: int | None = None,
    source_frame_number: int | None = None,
    series_uid: str | None = None,
    frame_score: float | None = None,
    frame_score_among: int | None = None,
    institution_name: str | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str | None = None,
    frame_refs: Sequence[tuple[str, int]] = (),
) -> hd.sc.SCImage:
    """Build the overlay SC for one frame.

    ``frame``: the windowed grey image, float (H, W) in [0, 1] (a FrameSequence frame); ``heatmap``: the
    detection's heat map of that frame, same shape. ``frame_index`` (0-based) is the frame's place in
    the sequence and ``n_frames`` its length (default ``detection.heatmaps.shape[0]``), both shown in the
    caption. ``source_frame_number`` (1-based) is referenced when ``source_dataset`` has frames to name
    (:func:`reporting._source.referable_frames`); otherwise it is ignored.
    ``series_uid`` is the source series the UIDs derive from; default the source dataset's series, which
    is right unless the sequence mixes series (then pass the one the SR used).
    ``frame_score``: the shown frame's own score, when ``heatmap`` explains that frame alone (a fourth
    caption line; :func:`worker.pipeline.overlay_frame`), the highest of the sequence's frames or, given
    ``frame_score_among``, of that many frames of the current study (a prior study's frames lead the
    sequence and were not candidates).
    ``frame_refs``: the whole sequence's (SOP Instance UID, frame number) per frame, which the SOP Instance
    UID derives from (:func:`reporting.uids.input_key`); default the shown frame alone.
    """
    _source.require_dataset(source_dataset, "source_dataset")
    if not isinstance(detection, Detection):
        raise TypeError(f"detection must be an inference.api.Detection, not {type(detection).__name__}")
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be an inference.api.ModelCard, not {type(card).__name__}")
    frame = check_unit_image("frame", frame)
    heatmap = check_unit_image("heatmap", heatmap)
    if frame.shape != heatmap.shape:
        raise ValueError(f"frame {frame.shape} and heatmap {heatmap.shape} differ in shape")
    n_frames = int(detection.heatmaps.shape[0]) if n_frames is None else int(n_frames)
    if not 0 <= frame_index < max(n_frames, 1):
        raise ValueError(f"frame_index {frame_index} is outside the sequence of {n_frames} frames")
    info = _source.source_info(source_dataset, "source_dataset")
    series_uid = series_uid or info.series_instance_uid
    key = input_key(frame_refs or [(str(source_dataset.SOPInstanceUID), int(source_frame_number or 1))])

    # the SC has no pixel spacing, so a viewer shows its pixels square: resample non-square source pixels
    frame, heatmap = square_pixels(frame, heatmap, shown_aspect(source_dataset, frame.shape))
    pixels = render_overlay(frame, heatmap, caption_lines(detection, card, frame_index=frame_index,
                                                          n_frames=n_frames, frame_score=frame_score,
                                                          frame_score_among=frame_score_among))
    orientation = patient_orientation(source_dataset, int(source_frame_number or frame_index + 1))
    attrs = info.attributes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=info.study_instance_uid,
            series_instance_uid=derive_uid(series_uid, card.name, card.version, SC_SERIES),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=derive_uid(series_uid, card.name, card.version, SC_INSTANCE, key),
            instance_number=1,
            manufacturer=manufacturer,
            patient_id=attrs["PatientID"],
            patient_birth_date=attrs["PatientBirthDate"],
            patient_sex=attrs["PatientSex"],
            accession_number=attrs["AccessionNumber"],
            study_id=attrs["StudyID"],
            study_date=attrs["StudyDate"] or None,
            study_time=attrs["StudyTime"] or None,
            # a placeholder (highdicom requires one and takes single letters only); the source's own
            # value, which may combine letters for an oblique plane ("PH"), is set below
            patient_orientation=("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=SC_SERIES_DESCRIPTION,
            manufacturer_model_name=card.name[:64],
            software_versions=software_version or card.version,
            institution_name=institution_name,
        )
    info.apply_to(sc)  # exact (cleaned) names, dates and character set
    # Type 2C: present, empty = unknown
    sc.PatientOrientation = list(orientation) if orientation is not None else None
    laterality = str(source_dataset.get("Laterality", "") or "").strip("\x00 ").upper()
    sc.Laterality = laterality if laterality in ("R", "L") else None  # Type 2C in the SC IOD: empty = unpaired/unknown
    sc.ConversionType = "WSD"  # workstation: made by software from another image
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}. {caption_lines(detection, card)[2][0]}"[:10240]
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    sc.LossyImageCompression = "00"
    # a study list shows each series' date: without one our series had none beside the source's (Type 3)
    sc.SeriesDate, sc.SeriesTime = sc.ContentDate, sc.ContentTime

    ref = Dataset()
    ref.ReferencedSOPClassUID = info.sop_class_uid
    ref.ReferencedSOPInstanceUID = info.sop_instance_uid
    frames_in_source = _source.referable_frames(source_dataset)
    if frames_in_source:
        number = source_frame_number if source_frame_number is not None else frame_index + 1
        if not 1 <= number <= frames_in_source:
            raise ValueError(f"source_frame_number {number} is outside 1..{frames_in_source} of source "
                             f"{info.sop_instance_uid}")
        ref.ReferencedFrameNumber = number
    ref.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    sc.SourceImageSequence = [ref]
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = info.series_instance_uid
    instance_ref = Dataset()
    instance_ref.ReferencedSOPClassUID = info.sop_class_uid
    instance_ref.ReferencedSOPInstanceUID = info.sop_instance_uid
    series_ref.ReferencedInstanceSequence = [instance_ref]
    sc.ReferencedSeriesSequence = [series_ref]
    log.info("built SC %s (series %s) from source %s frame %d, model %s %s",
             sc.SOPInstanceUID, sc.SeriesInstanceUID, info.sop_instance_uid, frame_index + 1,
             card.name, card.version)
    return sc
