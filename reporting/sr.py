"""The anomaly report as a DICOM Structured Report: a TID 1500 Measurement Report.

Document: Comprehensive 3D SR (the SOP class highdicom and most viewers use for TID 1500), Explicit VR
Little Endian, in a series of its own in the SOURCE study (patient and study attributes copied from the
source, cleaned by :mod:`reporting._source`). ``CompletionFlag`` COMPLETE, ``VerificationFlag``
UNVERIFIED, ``PreliminaryFlag`` PRELIMINARY: a machine output no person has verified.

Content tree (codes chosen, see the module constants)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
      HAS CONCEPT MOD  Language of Content = English
      HAS OBS CONTEXT  Observer Type = (121007, DCM, "Device")         TID 1002/1004
                       Device Observer UID / Name (our AE title) / Manufacturer "MedGRU" / Model (name version)
      HAS CONCEPT MOD  Procedure Reported = (363679005, SCT, "Imaging procedure")
      CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
        CONTAINS CONTAINER (125007, DCM, "Measurement Group")          TID 1501
          Tracking Identifier "MedGRU anomaly assessment - NOT FOR DIAGNOSTIC USE" + Tracking UID
          Algorithm Name / Algorithm Version / Algorithm Manufacturer  TID 4019
          NUM (246262008, SCT, "Score") = <score>  unit (1, UCUM, "no units")   (+ TID 4019)
          NUM (122411, DCM, "Threshold Value") = <threshold>  unit (1, UCUM, "no units")
          CODE (121073, DCM, "Impression") = (263654008, SCT, "Abnormal") | (17621005, SCT, "Normal")
          NUM (FRAMESJUDGED, 99MEDGRU) = frames the verdict judged              only for T > 1
          NUM (FPRBOUND, 99MEDGRU) = bound on a normal series' false-positive rate   T > 1, when known
          NUM (SEQSCORE, 99MEDGRU) = the ConvGRU's score of all frames, not calibrated   T > 1, MedGRU-SVC
          CODE (CLUSTER, 99MEDGRU, "Anomaly cluster") = (<label>, 99MEDGRU, <label>)   only with a label
          IMAGE (260753009, SCT, "Source") -> each source instance
        CONTAINS CONTAINER (125007, DCM, "Measurement Group")          TID 1501, one per frame, only for T > 1
          Tracking Identifier "Frame k of T (scored alone) - NOT FOR DIAGNOSTIC USE" + Tracking UID
                              ("prior study, scored alone, not judged" for a prior study's leading frames)
          NUM (246262008, SCT, "Score") = <that frame's score>  (+ TID 4019)
          IMAGE (260753009, SCT, "Source") -> that frame's instance (and frame number, if multi-frame)

The per-frame groups carry ``Detection.frame_scores`` (each frame scored alone as a sequence of one), so a
reader can see which frames drive a series' verdict; the series' own score (for T > 1 the highest judged
frame's), threshold (for T > 1 the threshold for that many frames,
:meth:`inference.api.Detector.series_threshold`) and impression stay in the first group. They are written
only where each frame can be mapped to its instance.

Why these codes: "Normal"/"Abnormal" are the SNOMED CT qualifier values of CID 222 (Normality Codes), the
standard answer set for a normal/abnormal judgement; "Impression" (DCM 121073) is the DICOM concept for an
overall interpretation. The score is an abstract, unit-less number: SNOMED CT "Score" with the UCUM unit
"1" (CID 7181 "no units"). "Threshold Value" (DCM 122411) names the decision threshold. No standard code
exists for our cluster labels or for a series' measures (frames judged, the false-positive bound, the
ConvGRU's score of all frames), so they use the private coding scheme ``99MEDGRU`` (declared in the Coding
Scheme Identification Sequence whenever one of them is written).

UIDs come from :mod:`reporting.uids` (source series + model name + version + object kind), so a re-run of
the same model version on the same series replaces its earlier report.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from typing import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from inference.api import NOT_FOR_DIAGNOSTIC_USE, Detection, ModelCard
from reporting import _source
from reporting.uids import DEVICE_OBSERVER, SR_INSTANCE, SR_SERIES, derive_uid, input_key

log = logging.getLogger(__name__)

MANUFACTURER = "MedGRU"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = f"MedGRU anomaly report ({NOT_FOR_DIAGNOSTIC_USE})"
TRACKING_TEXT = f"MedGRU anomaly assessment - {NOT_FOR_DIAGNOSTIC_USE}"
PRIVATE_SCHEME = "99MEDGRU"

# --- codes (see the module docstring) -------------------------------------------------------------
SCORE_CONCEPT = CodedConcept(value="246262008", scheme_designator="SCT", meaning="Score")
THRESHOLD_CONCEPT = CodedConcept(value="122411", scheme_designator="DCM", meaning="Threshold Value")
NO_UNITS = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
IMPRESSION_CONCEPT = CodedConcept(value="121073", scheme_designator="DCM", meaning="Impression")
ABNORMAL = CodedConcept(value="263654008", scheme_designator="SCT", meaning="Abnormal")
NORMAL = CodedConcept(value="17621005", scheme_designator="SCT", meaning="Normal")
CLUSTER_CONCEPT = CodedConcept(value="CLUSTER", scheme_designator=PRIVATE_SCHEME, meaning="Anomaly cluster")
# a series of several frames (the series rule, inference.api.Detector.series_threshold): how many frames the
# verdict judged, the bound on a normal series' false-positive rate, the ConvGRU's score of all the frames
FRAMES_JUDGED_CONCEPT = CodedConcept(value="FRAMESJUDGED", scheme_designator=PRIVATE_SCHEME,
                                     meaning="Frames judged (each scored alone)")
FPR_BOUND_CONCEPT = CodedConcept(value="FPRBOUND", scheme_designator=PRIVATE_SCHEME,
                                 meaning="False-positive rate bound of the series threshold")
SEQUENCE_SCORE_CONCEPT = CodedConcept(value="SEQSCORE", scheme_designator=PRIVATE_SCHEME,
                                      meaning="Sequence score over all frames (not calibrated)")
IMAGING_PROCEDURE = CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging procedure")
DEVICE_OBSERVER_TYPE = CodedConcept(value="121007", scheme_designator="DCM", meaning="Device")

_CODE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")


class MedgruComprehensive3DSR(hd.sr.Comprehensive3DSR):
    """highdicom's Comprehensive 3D SR, minus its module-table driven copy of patient/study attributes.

    highdicom copies those by looking the source's SOP class up in its IOD tables, which fails
    (``KeyError``) for retired or private image SOP classes still found in archives (e.g. the retired US
    Image Storage). :func:`build_sr` writes the cleaned patient and study attributes itself
    (:meth:`reporting._source.SourceInfo.apply_to`), so the copy is not needed.
    """

    def copy_patient_and_study_information(self, dataset: Dataset) -> None:  # noqa: D102
        return None


def verdict_code(detection: Detection) -> CodedConcept:
    return ABNORMAL if detection.is_anomaly else NORMAL


def cluster_code(label: str) -> CodedConcept:
    """The private code for a cluster label: the label itself when it is a short token, else a hash."""
    label = label.strip()
    if not label:
        raise ValueError("cluster label is empty")
    value = label if _CODE_VALUE_RE.match(label) else "CL-" + hashlib.sha256(label.encode()).hexdigest()[:12]
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=label[:64])


def _check_inputs(source_datasets: Sequence[Dataset], detection: Detection, card: ModelCard) -> list[Dataset]:
    if isinstance(source_datasets, Dataset) or not isinstance(source_datasets, Sequence):
        raise TypeError(f"source_datasets must be a sequence of pydicom Datasets, "
                        f"not {type(source_datasets).__name__}")
    if len(source_datasets) == 0:
        raise ValueError("source_datasets is empty: an SR needs at least one source image")
    for i, ds in enumerate(source_datasets):
        _source.require_dataset(ds, f"source_datasets[{i}]")
    if not isinstance(detection, Detection):
        raise TypeError(f"detection must be an inference.api.Detection, not {type(detection).__name__}")
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be an inference.api.ModelCard, not {type(card).__name__}")
    for attr in ("name", "version"):
        if not str(getattr(card, attr)).strip():
            raise ValueError(f"card.{attr} is empty")
    return list(source_datasets)


def _evidence_header(ds: Dataset, info: _source.SourceInfo, current: _source.SourceInfo) -> Dataset:
    """A pixel-free copy of what highdicom reads from a source: UIDs, image size, cleaned patient/study."""
    header = Dataset()
    header.SOPClassUID = info.sop_class_uid
    header.SOPInstanceUID = info.sop_instance_uid
    header.StudyInstanceUID = info.study_instance_uid
    header.SeriesInstanceUID = info.series_instance_uid
    header.Modality = info.modality
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation", "NumberOfFrames"):
        if keyword in ds and ds[keyword].value not in (None, ""):
            setattr(header, keyword, ds[keyword].value)
    current.apply_to(header)
    header.StudyInstanceUID = info.study_instance_uid  # apply_to set the current study's; keep the real one
    # highdicom would take the document's character set from evidence[0] and check it against its own
    # list, which lacks legal source values: "ISO_IR 6" (the default repertoire, declared), an empty value 1
    # ("\ISO 2022 IR 87", the usual Japanese form), "ISO 2022 IR 149" (Korean). Each made build_sr raise and
    # the job fail. The character set is written on the finished document by ``current.apply_to(sr)``.
    if "SpecificCharacterSet" in header:
        del header.SpecificCharacterSet
    # names are set on the finished document (highdicom warns on single-component names like "BRAINIX")
    header.PatientName = ""
    header.ReferringPhysicianName = ""
    return header


def _frame_groups(detection: Detection, headers: Sequence[Dataset], datasets: Sequence[Dataset],
                  frame_refs: Sequence[tuple[str, int]], algorithm, series_uid: str, card: ModelCard,
                  context_frames: int = 0) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per frame with that frame's score, referencing its instance (and frame). The
    first ``context_frames`` (a prior study's) are labelled as read, not judged."""
    scores = tuple(detection.frame_scores)
    t = len(scores)
    if t < 2:
        return []
    if frame_refs:
        if len(frame_refs) != t:
            raise ValueError(f"frame_refs has {len(frame_refs)} entries for {t} frame scores")
        refs = [(str(uid), int(n)) for uid, n in frame_refs]
    elif len(datasets) == t:
        refs = [(str(ds.SOPInstanceUID), 1) for ds in datasets]
    else:
        log.warning("SR for series %s: %d frame scores but %d source instances and no frame references; "
                     "per-frame groups left out", series_uid, t, len(datasets))
        return []
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    groups = []
    for i, ((uid, number), score) in enumerate(zip(refs, scores)):
        header = by_uid.get(uid)
        if header is None:
            raise ValueError(f"frame_refs[{i}] names instance {uid}, which is not among the source datasets")
        multi = _source.referable_frames(header) > 0
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(series_uid, card.name, card.version, f"sr-frame-{i + 1}"),
                identifier=f"Frame {i + 1} of {t} ("
                           + ("prior study, scored alone, not judged" if i < context_frames else "scored alone")
                           + f") - {NOT_FOR_DIAGNOSTIC_USE}",
            ),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=SCORE_CONCEPT, value=float(score), unit=NO_UNITS,
                                            algorithm_id=algorithm)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=uid,
                referenced_frame_numbers=[number] if multi else None,
            )],
        ))
    return groups


def build_sr(
    source_datasets: Sequence[Dataset],
    detection: Detection,
    card: ModelCard,
    *,
    ae_title: str = "MEDGRU",
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str | None = None,
    frame_refs: Sequence[tuple[str, int]] = (),
    context_frames: int = 0,
    predecessors: Sequence[str] = (),
) -> MedgruComprehensive3DSR:
    """Build the TID 1500 Measurement Report for ``detection`` on ``source_datasets``.

    ``source_datasets`` are the instances whose frames were scored (headers suffice; pixel data is not
    read). The report lands in the study of the LAST source dataset (a prior study's frames, when added,
    lead the sequence) and takes its UIDs from that dataset's series. ``frame_refs`` (SOP Instance UID,
    1-based frame number) per frame, as :class:`~inference.api.FrameSequence` has them, place the
    per-frame scores; without them a frame maps to the source dataset of the same index when there is
    one dataset per frame. ``context_frames``: how many leading frames are a prior study's, read but not
    judged (:attr:`inference.api.FrameSequence.context_frames`); their groups say so. ``predecessors``:
    the SOP Instance UIDs of earlier reports on this series by the same model and version, made from other
    frames (a late slice re-scored the series); they are listed in PredecessorDocumentsSequence, so that
    a viewer shows this report as their revision (this report's own UID, a re-run's, is left out). Raises
    ``TypeError`` or ``ValueError`` naming the argument or attribute that is wrong.
    """
    datasets = _check_inputs(source_datasets, detection, card)
    infos = [_source.source_info(ds, f"source_datasets[{i}]", patient_study=False)
             for i, ds in enumerate(datasets[:-1])]
    current = _source.source_info(datasets[-1], f"source_datasets[{len(datasets) - 1}]")
    infos.append(current)
    series_uid = current.series_instance_uid
    headers = [_evidence_header(ds, info, current) for ds, info in zip(datasets, infos)]
    # highdicom takes patient/study from evidence[0]: put a current-study instance first
    headers.sort(key=lambda h: h.StudyInstanceUID != current.study_instance_uid)

    algorithm = hd.sr.AlgorithmIdentification(name=card.name, version=card.version, manufacturer=manufacturer)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(ae_title, card.name, card.version, DEVICE_OBSERVER),
        name=ae_title,
        manufacturer_name=manufacturer,
        model_name=f"{card.name} {card.version}"[:64],
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=DEVICE_OBSERVER_TYPE, observer_identifying_attributes=device
        )
    )
    measurements = [
        hd.sr.Measurement(name=SCORE_CONCEPT, value=float(detection.score), unit=NO_UNITS, algorithm_id=algorithm),
        hd.sr.Measurement(name=THRESHOLD_CONCEPT, value=float(detection.threshold), unit=NO_UNITS),
    ]
    private_codes = bool(detection.cluster_label)
    if len(detection.frame_scores) > 1:  # a series: what its score and threshold stand for
        measurements.append(hd.sr.Measurement(name=FRAMES_JUDGED_CONCEPT, unit=NO_UNITS,
                                              value=float(len(detection.frame_scores) - int(context_frames))))
        for concept, key in ((FPR_BOUND_CONCEPT, "series_fpr_bound"), (SEQUENCE_SCORE_CONCEPT, "sequence_score")):
            if key in detection.extras:
                measurements.append(hd.sr.Measurement(name=concept, value=float(detection.extras[key]),
                                                      unit=NO_UNITS))
        private_codes = True
    evaluations = [hd.sr.QualitativeEvaluation(name=IMPRESSION_CONCEPT, value=verdict_code(detection))]
    if detection.cluster_label:
        evaluations.append(hd.sr.QualitativeEvaluation(name=CLUSTER_CONCEPT, value=cluster_code(detection.cluster_label)))
    seen: set[str] = set()
    source_images = []
    for header in headers:
        if header.SOPInstanceUID in seen:
            continue
        seen.add(header.SOPInstanceUID)
        source_images.append(hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
        ))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(series_uid, card.name, card.version, "sr-tracking"), identifier=TRACKING_TEXT
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=source_images,
    )
    frame_groups = _frame_groups(detection, headers, datasets, frame_refs, algorithm, series_uid, card,
                                 context_frames)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group, *frame_groups],
        title=codes.DCM.ImagingMeasurementReport,
    )
    coding_schemes = [CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="MedGRU anomaly cluster labels and series measures",
        responsible_organization=manufacturer
    )] if private_codes else None
    sr_series_uid = derive_uid(series_uid, card.name, card.version, SR_SERIES)
    sr_uid = derive_uid(series_uid, card.name, card.version, SR_INSTANCE,
                        input_key(frame_refs or [(str(ds.SOPInstanceUID), 1) for ds in datasets]))
    earlier = []
    for uid in dict.fromkeys(str(u) for u in predecessors if str(u) != sr_uid):
        ref = Dataset()  # what highdicom reads of a previous version: its study, series, class and instance
        ref.StudyInstanceUID, ref.SeriesInstanceUID = current.study_instance_uid, sr_series_uid
        ref.SOPClassUID, ref.SOPInstanceUID = Comprehensive3DSRStorage, uid
        earlier.append(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empty placeholder names, set just below
        sr = MedgruComprehensive3DSR(
            evidence=headers,
            content=report[0],
            series_instance_uid=sr_series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sr_uid,
            previous_versions=earlier or None,
            instance_number=1,
            manufacturer=manufacturer,
            institution_name=institution_name,
            institutional_department_name=institutional_department_name,
            is_complete=True,
            is_final=False,
            is_verified=False,
            record_evidence=True,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=SR_SERIES_DESCRIPTION,
            manufacturer_model_name=card.name[:64],
            software_versions=software_version or card.version,
            coding_schemes=coding_schemes,
        )
    current.apply_to(sr)
    # a study list shows each series' date: without one our series had none beside the source's (Type 3)
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    log.info("built SR %s (series %s) for source series %s, model %s %s: %s",
             sr.SOPInstanceUID, sr.SeriesInstanceUID, series_uid, card.name, card.version, detection.verdict)
    return sr
