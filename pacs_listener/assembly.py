"""Assembly: complete series become ordered frame sequences, and each sequence one queued job.

A series is *complete* when no instance has arrived for ``settings.quiet_period_s`` seconds
(``Series.last_received_at``). :class:`Assembler` then claims it (RECEIVING → ASSEMBLED or IGNORED),
orders its frames, writes a :class:`~storage.models.SequenceRecord` and a QUEUED
:class:`~storage.models.Job` in the same transaction, commits, and only after the commit hands the job id
to ``enqueue`` (so a worker never sees a job that is not in the database yet).

Frame order (:func:`order_frames`)
----------------------------------
Only instances with pixel data take part; a multi-frame instance contributes its frames 1..NumberOfFrames
in order, as one block. The instances are ordered by the first key below that orders all of them; the key
used is returned and stored in ``SequenceRecord.order_key``:

1. ``instance_number`` -- every instance has an InstanceNumber and no two share one: ascending number.
2. ``position`` -- else, when every instance has ImagePositionPatient and ImageOrientationPatient, the
   slice normals (row × column of the orientation) are parallel, and no two positions project to the same
   point on the normal (1 µm tolerance): ascending projection of the position on the normal of the
   instance with the lowest SOP Instance UID (for an axial stack with the usual orientation, feet → head).
   This is a spatial order; its direction may be the reverse of the acquisition's InstanceNumber order
   (Brainix FLAIR is numbered head → feet).
3. ``time`` -- else, when every instance has an acquisition (date)time or, failing that, a content
   (date)time: ascending time; equal times are ordered by position on the normal (when all positions are
   known), then by SOP Instance UID. A 4-D series (the same positions repeated over time, e.g. fMRI) whose
   numbers are missing lands here and comes out volume by volume.
4. ``none`` -- else by SOP Instance UID: deterministic, but not a meaningful order.

In every case the SOP Instance UID is the last tie-break. A one-image radiograph is a sequence of length 1.

What never becomes a job
------------------------
A series is set IGNORED, with the reason in ``Series.state_reason``, when

* none of its instances is an image: every instance's SOP class is in :data:`NON_IMAGE_SOP_CLASSES`
  (structured reports, presentation states, key object selections, segmentations, encapsulated documents,
  RT objects, waveforms, raw data, registrations, measurements...) or carries no pixel data;
* it is our own output: its ``series_description`` starts with :data:`OUR_SERIES_PREFIX` ("MedGRU", the
  SeriesDescription the reporting package writes, whose Manufacturer is "MedGRU") and it holds Secondary
  Capture (:data:`SECONDARY_CAPTURE_SOP_CLASSES`) or non-image instances only.

Non-image instances inside an image series are left out of its sequence. So are the images that lie
outside the series' stack (:func:`off_stack`): where every image has an ImageOrientationPatient and one
slice orientation holds more images than any other, the images of another plane, more than 45° from it (a
localizer or scout stored in the series of the axial stack), are not frames to judge; the series'
``state_reason`` and a warning name them. Slices tilted less (a spine series' groups) are kept.

Prior study (only when ``settings.add_prior_study`` is true)
------------------------------------------------------------
The frames of the same patient's most recent *earlier* study are prepended, as earlier frames, and the
study's UID is stored in ``SequenceRecord.prior_study_uid``. The patient is the one every instance of the
series names (``Instance.patient_fk``, its own PatientID and issuer), not the one its study was first
recorded for; a series whose instances name several patients gets no prior. The prior is chosen among
ASSEMBLED series whose instances all name that patient, of the same modality and the same body part
(case-insensitive; an empty body part only matches an empty one), in other studies whose StudyDate is
non-empty and strictly before this study's StudyDate (a later or same-day study is never a prior); the
latest such study wins (StudyDate, then StudyTime), and within it the latest assembled series (last
received). The prior contributes its own frames, ordered by the rule above (not the prior's own prior).
There is no prior when this study has no StudyDate or the patient has an empty PatientID (anonymous studies
share one patient row). No prior found → the plain sequence.

Late instances
--------------
The listener (:mod:`pacs_listener.ingest`) puts an ASSEMBLED or IGNORED series back to RECEIVING when an
instance arrives for it, in the same transaction as the instance row. The next pass then builds a NEW
sequence and job covering all the series' instances; earlier jobs are left as they are.

Concurrency
-----------
Several assemblers may run at once (serve + a worker, two hosts on PostgreSQL). A series is claimed with a
conditional ``UPDATE series SET state='assembled' WHERE id=:id AND state='receiving' AND
last_received_at <= :cutoff``; only the assembler whose UPDATE changed the row builds the sequence. On
PostgreSQL the row is first selected ``FOR UPDATE SKIP LOCKED`` so a second assembler skips it instead of
waiting. One transaction per series: a failure on one series does not hold back the others.

Failures
--------
A database error while assembling a series rolls its transaction back: the series stays RECEIVING and
the next pass retries it. Any other error (something in the series' data we did not foresee) is logged
with the traceback and the series is set IGNORED with ``state_reason = "assembly failed: ..."``, so it is
visible to an admin instead of failing every second. ``enqueue`` raising is logged; the committed job
stays QUEUED until the service's sweep enqueues it again (``requeue_after_s``, :mod:`worker.tasks`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Protocol

import pydicom.uid as dicom_uid
from pydicom.uid import UID
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from medgru.settings import Settings
from storage.models import Instance, Job, JobState, Patient, SequenceRecord, Series, SeriesState, Study

log = logging.getLogger(__name__)

ORDER_INSTANCE_NUMBER = "instance_number"
ORDER_POSITION = "position"
ORDER_TIME = "time"
ORDER_NONE = "none"

#: SeriesDescription prefix of the objects we send back (reporting: SC and SR, Manufacturer "MedGRU").
OUR_SERIES_PREFIX = "MedGRU"

# --- SOP classes ----------------------------------------------------------------------------------------

STRUCTURED_REPORT_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.BasicTextSRStorage,
    dicom_uid.EnhancedSRStorage,
    dicom_uid.ComprehensiveSRStorage,
    dicom_uid.Comprehensive3DSRStorage,
    dicom_uid.ExtensibleSRStorage,
    dicom_uid.ProcedureLogStorage,
    dicom_uid.MammographyCADSRStorage,
    dicom_uid.ChestCADSRStorage,
    dicom_uid.ColonCADSRStorage,
    dicom_uid.XRayRadiationDoseSRStorage,
    dicom_uid.EnhancedXRayRadiationDoseSRStorage,
    dicom_uid.RadiopharmaceuticalRadiationDoseSRStorage,
    dicom_uid.PatientRadiationDoseSRStorage,
    dicom_uid.AcquisitionContextSRStorage,
    dicom_uid.SimplifiedAdultEchoSRStorage,
    dicom_uid.ImplantationPlanSRStorage,
    dicom_uid.PlannedImagingAgentAdministrationSRStorage,
    dicom_uid.PerformedImagingAgentAdministrationSRStorage,
    dicom_uid.WaveformAnnotationSRStorage,
    dicom_uid.MacularGridThicknessAndVolumeReportStorage,
})

KEY_OBJECT_SELECTION_SOP_CLASSES: frozenset[UID] = frozenset({dicom_uid.KeyObjectSelectionDocumentStorage})

PRESENTATION_STATE_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.GrayscaleSoftcopyPresentationStateStorage,
    dicom_uid.ColorSoftcopyPresentationStateStorage,
    dicom_uid.PseudoColorSoftcopyPresentationStateStorage,
    dicom_uid.BlendingSoftcopyPresentationStateStorage,
    dicom_uid.XAXRFGrayscaleSoftcopyPresentationStateStorage,
    dicom_uid.GrayscalePlanarMPRVolumetricPresentationStateStorage,
    dicom_uid.CompositingPlanarMPRVolumetricPresentationStateStorage,
    dicom_uid.AdvancedBlendingPresentationStateStorage,
    dicom_uid.VolumeRenderingVolumetricPresentationStateStorage,
    dicom_uid.SegmentedVolumeRenderingVolumetricPresentationStateStorage,
    dicom_uid.MultipleVolumeRenderingVolumetricPresentationStateStorage,
    dicom_uid.VariableModalityLUTSoftcopyPresentationStateStorage,
    dicom_uid.BasicStructuredDisplayStorage,
})

SEGMENTATION_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.SegmentationStorage,
    dicom_uid.SurfaceSegmentationStorage,
})

ENCAPSULATED_DOCUMENT_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.EncapsulatedPDFStorage,
    dicom_uid.EncapsulatedCDAStorage,
    dicom_uid.EncapsulatedSTLStorage,
    dicom_uid.EncapsulatedOBJStorage,
    dicom_uid.EncapsulatedMTLStorage,
})

#: Radiotherapy objects, RT Image included (a treatment-verification image, not diagnostic imaging).
RT_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.RTImageStorage,
    dicom_uid.RTDoseStorage,
    dicom_uid.RTStructureSetStorage,
    dicom_uid.RTPlanStorage,
    dicom_uid.RTIonPlanStorage,
    dicom_uid.RTBeamsTreatmentRecordStorage,
    dicom_uid.RTBrachyTreatmentRecordStorage,
    dicom_uid.RTTreatmentSummaryRecordStorage,
    dicom_uid.RTIonBeamsTreatmentRecordStorage,
    dicom_uid.RTPhysicianIntentStorage,
    dicom_uid.RTSegmentAnnotationStorage,
    dicom_uid.RTRadiationSetStorage,
    dicom_uid.RTRadiationRecordSetStorage,
    dicom_uid.RTRadiationSalvageRecordStorage,
    dicom_uid.RTRadiationSetDeliveryInstructionStorage,
    dicom_uid.RTTreatmentPreparationStorage,
    dicom_uid.RTPatientPositionAcquisitionInstructionStorage,
    dicom_uid.RTBeamsDeliveryInstructionStorage,
    dicom_uid.RTBrachyApplicationSetupDeliveryInstructionStorage,
    dicom_uid.CArmPhotonElectronRadiationRecordStorage,
    dicom_uid.TomotherapeuticRadiationRecordStorage,
    dicom_uid.RoboticRadiationRecordStorage,
})

WAVEFORM_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.TwelveLeadECGWaveformStorage,
    dicom_uid.GeneralECGWaveformStorage,
    dicom_uid.AmbulatoryECGWaveformStorage,
    dicom_uid.General32bitECGWaveformStorage,
    dicom_uid.HemodynamicWaveformStorage,
    dicom_uid.CardiacElectrophysiologyWaveformStorage,
    dicom_uid.BasicVoiceAudioWaveformStorage,
    dicom_uid.GeneralAudioWaveformStorage,
    dicom_uid.ArterialPulseWaveformStorage,
    dicom_uid.RespiratoryWaveformStorage,
    dicom_uid.MultichannelRespiratoryWaveformStorage,
    dicom_uid.RoutineScalpElectroencephalogramWaveformStorage,
    dicom_uid.ElectromyogramWaveformStorage,
    dicom_uid.ElectrooculogramWaveformStorage,
    dicom_uid.SleepElectroencephalogramWaveformStorage,
    dicom_uid.BodyPositionWaveformStorage,
})

#: Other objects without a viewable image: raw data, registrations, fiducials, measurements, templates...
OTHER_NON_IMAGE_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.RawDataStorage,
    dicom_uid.SpatialRegistrationStorage,
    dicom_uid.DeformableSpatialRegistrationStorage,
    dicom_uid.SpatialFiducialsStorage,
    dicom_uid.RealWorldValueMappingStorage,
    dicom_uid.StereometricRelationshipStorage,
    dicom_uid.TractographyResultsStorage,
    dicom_uid.SurfaceScanMeshStorage,
    dicom_uid.SurfaceScanPointCloudStorage,
    dicom_uid.MRSpectroscopyStorage,
    dicom_uid.MicroscopyBulkSimpleAnnotationsStorage,
    dicom_uid.HangingProtocolStorage,
    dicom_uid.ColorPaletteStorage,
    dicom_uid.GenericImplantTemplateStorage,
    dicom_uid.ImplantAssemblyTemplateStorage,
    dicom_uid.ImplantTemplateGroupStorage,
    dicom_uid.CTDefinedProcedureProtocolStorage,
    dicom_uid.CTPerformedProcedureProtocolStorage,
    dicom_uid.XADefinedProcedureProtocolStorage,
    dicom_uid.XAPerformedProcedureProtocolStorage,
    dicom_uid.ProtocolApprovalStorage,
    dicom_uid.LensometryMeasurementsStorage,
    dicom_uid.AutorefractionMeasurementsStorage,
    dicom_uid.KeratometryMeasurementsStorage,
    dicom_uid.SubjectiveRefractionMeasurementsStorage,
    dicom_uid.VisualAcuityMeasurementsStorage,
    dicom_uid.SpectaclePrescriptionReportStorage,
    dicom_uid.OphthalmicAxialMeasurementsStorage,
    dicom_uid.OphthalmicVisualFieldStaticPerimetryMeasurementsStorage,
})

#: Every SOP class that is never an image to score.
NON_IMAGE_SOP_CLASSES: frozenset[UID] = (
    STRUCTURED_REPORT_SOP_CLASSES
    | KEY_OBJECT_SELECTION_SOP_CLASSES
    | PRESENTATION_STATE_SOP_CLASSES
    | SEGMENTATION_SOP_CLASSES
    | ENCAPSULATED_DOCUMENT_SOP_CLASSES
    | RT_SOP_CLASSES
    | WAVEFORM_SOP_CLASSES
    | OTHER_NON_IMAGE_SOP_CLASSES
)

#: Secondary Capture classes: images, except when the series is our own output (see module docstring).
SECONDARY_CAPTURE_SOP_CLASSES: frozenset[UID] = frozenset({
    dicom_uid.SecondaryCaptureImageStorage,
    dicom_uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    dicom_uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    dicom_uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    dicom_uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
})


def sop_class_name(uid: str) -> str:
    """Readable name of a SOP class UID ("Comprehensive SR Storage"), the UID itself when unknown."""
    name = UID(uid).name if uid else ""
    return name or uid or "(no SOP class)"


# --- ordering -------------------------------------------------------------------------------------------


class InstanceLike(Protocol):
    """What :func:`order_frames` reads; :class:`storage.models.Instance` is one."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def instance_number(self) -> int | None: ...
    @property
    def number_of_frames(self) -> int: ...
    @property
    def image_position(self) -> Sequence[float] | None: ...
    @property
    def image_orientation(self) -> Sequence[float] | None: ...
    @property
    def acquisition_time(self) -> str: ...
    @property
    def content_time(self) -> str: ...
    @property
    def has_pixels(self) -> bool: ...


_POSITION_TOLERANCE_MM = 1e-3
_PARALLEL_COS = 0.999  # slice normals within ~2.5° are the same stack
#: an image whose slice normal is more than 45° from the stack's lies in another plane (a localizer); slices
#: angled less than that (a spine series' slice groups, each tilted to its disc) are the series' own images
_OTHER_PLANE_COS = math.cos(math.radians(45.0))
_TIME_RE = re.compile(r"^(\d+)(?:\.(\d+))?$")


def parse_dicom_time(text: str) -> tuple[int, float] | None:
    """``(YYYYMMDD or 0, seconds of day)`` of a DICOM DT or TM text; None when empty or unreadable.

    Accepts ``HHMMSS.ffffff`` (and its shorter forms ``HH``, ``HHMM``), ``YYYYMMDD[HHMMSS.ffffff]`` with
    an optional ``+ZZXX`` offset (ignored: one series comes from one clock), and ACR-NEMA ``HH:MM:SS``.
    """
    t = (text or "").strip().replace(":", "")
    t = re.split(r"[+-]", t, maxsplit=1)[0].strip()
    m = _TIME_RE.match(t)
    if not m:
        return None
    digits, frac = m.group(1), m.group(2) or ""
    date = 0
    if len(digits) > 6:  # DT: the date comes first
        if len(digits) < 8:
            return None
        date, digits = int(digits[:8]), digits[8:]
        if digits == "":
            return date, 0.0
    if len(digits) % 2 or len(digits) > 6:
        return None
    parts = [int(digits[i : i + 2]) for i in range(0, len(digits), 2)] + [0, 0]
    hours, minutes, seconds = parts[0], parts[1], parts[2]
    return date, hours * 3600 + minutes * 60 + seconds + (float("0." + frac) if frac else 0.0)


def _instance_time(inst: InstanceLike) -> tuple[int, float] | None:
    return parse_dicom_time(inst.acquisition_time) or parse_dicom_time(inst.content_time)


def _projections(instances: Sequence[InstanceLike]) -> list[float] | None:
    """Position of each instance along the reference slice normal; None if not all usable.

    The reference is the normal of the instance with the lowest SOP Instance UID, not of whichever comes
    first: the database returns rows in no set order, and a stack whose normals are antiparallel (an
    orientation flipped within the series) would otherwise be ordered one way or the other by chance."""
    positions: list[tuple[list[float], list[float]]] = []
    for inst in instances:
        pos, ori = inst.image_position, inst.image_orientation
        if not pos or not ori or len(pos) != 3 or len(ori) != 6:
            return None
        try:
            p = [float(v) for v in pos]
            o = [float(v) for v in ori]
        except (TypeError, ValueError):
            return None
        r, c = o[:3], o[3:]
        n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
        norm = math.sqrt(sum(v * v for v in n))
        if not all(math.isfinite(v) for v in p + n) or norm < 1e-6:
            return None
        positions.append((p, [v / norm for v in n]))
    if not positions:
        return []
    reference = min(range(len(instances)), key=lambda k: instances[k].sop_instance_uid)
    normal = positions[reference][1]
    if any(abs(sum(a * b for a, b in zip(n, normal))) < _PARALLEL_COS for _p, n in positions):
        return None  # not one stack (e.g. a localizer with three orientations)
    return [sum(a * b for a, b in zip(p, normal)) for p, _n in positions]


def _normal(inst: InstanceLike) -> list[float] | None:
    """The unit slice normal (row × column direction cosines) of an instance, or None."""
    ori = inst.image_orientation
    if not ori or len(ori) != 6:
        return None
    try:
        r, c = [float(v) for v in ori[:3]], [float(v) for v in ori[3:]]
    except (TypeError, ValueError):
        return None
    n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
    norm = math.sqrt(sum(v * v for v in n))
    if not all(math.isfinite(v) for v in n) or norm < 1e-6:
        return None
    return [v / norm for v in n]


def off_stack(instances: Sequence[InstanceLike]) -> list[InstanceLike]:
    """The images outside the series' stack: those whose slice plane is another than the stack's, more than
    45° from the orientation (within ~2.5°, either direction) that more images have than any other. A
    localizer or scout stored in the series of an axial stack has another plane; judged as a frame, it would
    decide the series' verdict and be resized with the stack. Slices angled less than that (the groups of a
    spine series, each tilted to its disc) are kept: they are the series' own images. Nothing is left out where an image has no usable
    orientation (radiographs, enhanced multi-frame objects) or no orientation has more images than every
    other (a three-plane localizer of equal parts): ``[]``."""
    groups: list[tuple[list[float], list[InstanceLike]]] = []
    for inst in sorted(instances, key=lambda i: i.sop_instance_uid):
        n = _normal(inst)
        if n is None:
            return []
        for normal, members in groups:
            if abs(sum(a * b for a, b in zip(n, normal))) >= _PARALLEL_COS:
                members.append(inst)
                break
        else:
            groups.append((n, [inst]))
    if len(groups) < 2:
        return []
    sizes = sorted((len(members) for _n, members in groups), reverse=True)
    if sizes[0] == sizes[1]:
        return []
    normal = max(groups, key=lambda g: len(g[1]))[0]
    other_plane = {id(i) for n, members in groups for i in members
                   if abs(sum(a * b for a, b in zip(n, normal))) < _OTHER_PLANE_COS}
    return [i for i in instances if id(i) in other_plane]


def _distinct(values: list[float]) -> bool:
    s = sorted(values)
    return all(b - a > _POSITION_TOLERANCE_MM for a, b in zip(s, s[1:]))


def order_frames(instances: Sequence[InstanceLike]) -> tuple[list[tuple[str, int]], str]:
    """Frame references ``[(sop_instance_uid, frame_number_1_based), ...]`` in order, and the order key.

    The rule is in the module docstring. Instances without pixels contribute nothing; with none left the
    answer is ``([], "none")``.
    """
    images = [i for i in instances if i.has_pixels]
    if not images:
        return [], ORDER_NONE
    numbers = [i.instance_number for i in images]
    projections = _projections(images)
    if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        key = ORDER_INSTANCE_NUMBER
        ranked = sorted(images, key=lambda i: (i.instance_number, i.sop_instance_uid))
    elif projections is not None and _distinct(projections):
        key = ORDER_POSITION
        by_uid = {id(i): p for i, p in zip(images, projections)}
        ranked = sorted(images, key=lambda i: (by_uid[id(i)], i.sop_instance_uid))
    else:
        times = [_instance_time(i) for i in images]
        proj = projections if projections is not None else [0.0] * len(images)
        if all(t is not None for t in times):
            key = ORDER_TIME
            order = sorted(range(len(images)), key=lambda k: (times[k], proj[k], images[k].sop_instance_uid))
        else:
            key = ORDER_NONE
            order = sorted(range(len(images)), key=lambda k: images[k].sop_instance_uid)
        ranked = [images[k] for k in order]
    refs = [
        (inst.sop_instance_uid, frame)
        for inst in ranked
        for frame in range(1, max(int(inst.number_of_frames or 1), 1) + 1)
    ]
    return refs, key


# --- series classification ------------------------------------------------------------------------------


def is_image_instance(inst: Instance) -> bool:
    """An instance with pixels to score whose file is still in the spool (retention removes old files:
    :mod:`storage.retention`)."""
    return (bool(inst.has_pixels) and inst.sop_class_uid not in NON_IMAGE_SOP_CLASSES
            and inst.purged_at is None)


def ignore_reason(series: Series, instances: Sequence[Instance]) -> str | None:
    """Why this series never becomes a job, or None when it holds images to score."""
    if not instances:
        return "series has no instances"
    classes = Counter(i.sop_class_uid for i in instances)
    listing = ", ".join(f"{sop_class_name(uid)} x{n}" for uid, n in sorted(classes.items()))
    if (series.series_description or "").casefold().startswith(OUR_SERIES_PREFIX.casefold()) and all(
        uid in SECONDARY_CAPTURE_SOP_CLASSES or uid in NON_IMAGE_SOP_CLASSES for uid in classes
    ):
        return f"our own output (series description {series.series_description!r}; {listing})"
    if not any(is_image_instance(i) for i in instances):
        if all(uid in NON_IMAGE_SOP_CLASSES for uid in classes):
            return f"no image content: {listing}"
        return f"no pixel data in any instance: {listing}"
    return None


# --- the assembler --------------------------------------------------------------------------------------


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)


#: how often a series whose assembly the database keeps refusing is logged again (its traceback once)
DB_ERROR_LOG_EVERY_S = 600.0


class Assembler:
    """Turns quiet RECEIVING series into sequences and QUEUED jobs; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        enqueue: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.enqueue = enqueue
        self._db_failed: dict[int, float] = {}  # series the database refused to assemble: when last logged

    # one pass ---------------------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> list[int]:
        """Assemble every series quiet since ``settings.quiet_period_s``; return the new job ids.

        Each job is committed before ``enqueue(job_id)`` is called. An ``enqueue`` that raises is logged;
        the job stays QUEUED in the database until the service's sweep enqueues it again.
        """
        cutoff = _aware(now) - timedelta(seconds=self.settings.quiet_period_s)
        with self.session_factory() as session:
            candidates = session.scalars(
                select(Series.id)
                .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
                .order_by(Series.last_received_at, Series.id)
            ).all()
        job_ids: list[int] = []
        for series_id in candidates:
            try:
                job_id = self._assemble_series(series_id, cutoff)
            except SQLAlchemyError as exc:
                # rolled back: this series stays RECEIVING for the next pass; the others must not wait behind
                # it (a sequence the database refuses, say too large, would otherwise block every pass). The
                # traceback once per series, then a line every DB_ERROR_LOG_EVERY_S: it repeats every pass
                last = self._db_failed.get(series_id)
                if last is None:
                    log.exception("series id %d: database error while assembling; retried next pass", series_id)
                elif time.monotonic() - last >= DB_ERROR_LOG_EVERY_S:
                    log.warning("series id %d: database error while assembling again (%s); still retried every "
                                "pass", series_id, type(exc).__name__)
                else:
                    continue
                self._db_failed[series_id] = time.monotonic()
                continue
            self._db_failed.pop(series_id, None)
            if job_id is None:
                continue
            job_ids.append(job_id)
            try:
                self.enqueue(job_id)
            except ConnectionError as exc:  # the broker away (worker.tasks.BrokerUnavailable): one line
                log.error("job %d: committed but could not be enqueued (%s); it stays QUEUED until the "
                          "service's sweeper enqueues it again", job_id, exc)
            except Exception:
                log.exception("job %d: committed but could not be enqueued; it stays QUEUED", job_id)
        return job_ids

    def run_forever(self, stop_event: threading.Event, interval_s: float = 1.0) -> None:
        """Call :meth:`run_once` every ``interval_s`` until ``stop_event`` is set."""
        from storage.db import PassLog

        passes = PassLog(log, "assembly pass")
        while not stop_event.is_set():
            try:
                self.run_once()
            except Exception as exc:  # keep the loop alive: a database outage must not end assembly for good
                passes.failed(exc, interval_s)
            else:
                passes.succeeded()
            stop_event.wait(interval_s)

    # one series -------------------------------------------------------------------------------------
    def _claim(self, session: Session, series_id: int, cutoff: datetime) -> bool:
        quiet = (
            Series.id == series_id,
            Series.state == SeriesState.RECEIVING,
            Series.last_received_at <= cutoff,
        )
        if session.get_bind().dialect.name == "postgresql":
            locked = session.scalar(select(Series.id).where(*quiet).with_for_update(skip_locked=True))
            if locked is None:
                return False  # another assembler holds it, or it changed since we listed it
        result = session.execute(
            update(Series)
            .where(*quiet)
            .values(state=SeriesState.ASSEMBLED, state_reason="")
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1

    def _assemble_series(self, series_id: int, cutoff: datetime) -> int | None:
        try:
            with self.session_factory() as session, session.begin():
                if not self._claim(session, series_id, cutoff):
                    return None
                return self._build(session, series_id)
        except SQLAlchemyError:
            raise  # the database failed: nothing was committed, the series stays RECEIVING, next pass retries
        except Exception as exc:
            log.exception("series id %d: assembly failed on its data; marking it IGNORED", series_id)
            self._mark_failed(series_id, cutoff, f"assembly failed: {type(exc).__name__}: {exc}")
            return None

    def _mark_failed(self, series_id: int, cutoff: datetime, reason: str) -> None:
        with self.session_factory() as session, session.begin():
            session.execute(
                update(Series)
                .where(Series.id == series_id, Series.state == SeriesState.RECEIVING,
                       Series.last_received_at <= cutoff)
                .values(state=SeriesState.IGNORED, state_reason=reason[:2000])
                .execution_options(synchronize_session=False)
            )

    def _build(self, session: Session, series_id: int) -> int | None:
        series = session.get(Series, series_id, populate_existing=True)
        assert series is not None
        instances = session.scalars(select(Instance).where(Instance.series_fk == series_id)).all()
        reason = ignore_reason(series, instances)
        if reason is not None:
            series.state = SeriesState.IGNORED
            series.state_reason = reason
            log.info("series %s ignored: %s", series.series_uid, reason)
            return None
        images = [i for i in instances if is_image_instance(i)]
        outside = off_stack(images)
        if outside:
            left_out = {id(i) for i in outside}
            images = [i for i in images if id(i) not in left_out]
            uids = sorted(i.sop_instance_uid for i in outside)
            log.warning("series %s: %d image(s) left out, their slice orientation is not the stack's (a "
                        "localizer?): %s", series.series_uid, len(uids), ", ".join(uids))
        refs, key = order_frames(images)
        frame_refs: list[list[str | int]] = [[uid, frame] for uid, frame in refs]
        prior_uid = ""
        n_prior = 0
        if self.settings.add_prior_study:
            prior = self._prior(session, series)
            if prior is not None:
                prior_uid, prior_refs = prior
                n_prior = len(prior_refs)
                frame_refs = [[uid, frame] for uid, frame in prior_refs] + frame_refs
        seq = SequenceRecord(
            series_fk=series.id,
            frame_refs=frame_refs,
            n_frames=len(frame_refs),
            order_key=key,
            prior_study_uid=prior_uid,
        )
        job = Job(sequence=seq, state=JobState.QUEUED)
        session.add_all([seq, job])
        series.state_reason = f"{len(refs)} frames ordered by {key}" + (
            f"; {n_prior} frames of prior study {prior_uid} prepended" if prior_uid else ""
        ) + (
            f"; {len(outside)} image(s) left out, their slice orientation not the stack's (a localizer?): "
            + ", ".join(sorted(i.sop_instance_uid for i in outside)) if outside else ""
        )
        session.flush()
        log.info(
            "series %s assembled: sequence %d, %d frames by %s%s, job %d",
            series.series_uid, seq.id, seq.n_frames, key,
            f" (prior study {prior_uid})" if prior_uid else "", job.id,
        )
        return job.id

    def _prior(self, session: Session, series: Series) -> tuple[str, list[tuple[str, int]]] | None:
        study = session.get(Study, series.study_fk)
        if study is None or not study.study_date:
            return None
        # the patient is the one every instance of the series names, not the one the study was first
        # recorded for: a Study Instance UID reused for another patient (or a corrected PatientID) would
        # otherwise put that patient's prior frames into this patient's score and report
        named = set(session.scalars(select(Instance.patient_fk).where(Instance.series_fk == series.id).distinct()))
        if len(named) != 1 or None in named:
            log.warning("series %s: its instances name %d patients; no prior study is added", series.series_uid,
                        len(named - {None}))
            return None
        (patient_fk,) = named
        patient = session.get(Patient, patient_fk)
        if patient is None or not patient.patient_id:
            return None
        has_sequence = exists().where(SequenceRecord.series_fk == Series.id)
        # the series of the patient's instances, found through ix_instances_patient_fk: as a correlated
        # EXISTS, SQLite scanned every series and probed its instances (0.5 s a series at 100,000 series)
        of_patient = Series.id.in_(select(Instance.series_fk).where(Instance.patient_fk == patient_fk))
        of_another = exists().where(Instance.series_fk == Series.id,
                                    or_(Instance.patient_fk != patient_fk, Instance.patient_fk.is_(None)))
        row = session.execute(
            select(Series.id, Study.study_uid)
            .join(Study, Series.study_fk == Study.id)
            .where(
                of_patient,
                ~of_another,
                Study.id != study.id,
                Study.study_date != "",
                Study.study_date < study.study_date,
                Series.modality == series.modality,
                func.lower(Series.body_part) == (series.body_part or "").lower(),
                Series.state == SeriesState.ASSEMBLED,
                has_sequence,
            )
            .order_by(
                Study.study_date.desc(), Study.study_time.desc(), Series.last_received_at.desc(),
                Series.id.desc(),
            )
            .limit(1)
        ).first()
        if row is None:
            return None
        prior_series_id, prior_study_uid = row
        prior_instances = session.scalars(select(Instance).where(Instance.series_fk == prior_series_id)).all()
        prior_images = [i for i in prior_instances if is_image_instance(i)]
        outside = {id(i) for i in off_stack(prior_images)}  # as in the prior's own sequence
        refs, _key = order_frames([i for i in prior_images if id(i) not in outside])
        if not refs:
            return None
        return prior_study_uid, refs
