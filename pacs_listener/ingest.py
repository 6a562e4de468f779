"""Record a spooled instance in the database: patient → study → series → instance.

Patient names are never read or stored. :func:`record_instance` only flushes; the caller commits (the
listener answers Success only after its commit).

Resent instances: a SOP Instance UID is stored once. Receiving it again is answered Success and
*replaces nothing* (first copy wins: neither the row nor the spooled file changes, so a reader or an
assembled sequence never sees an instance change under it). Late instances: an instance arriving for a
series that is ASSEMBLED (or IGNORED) puts the series back to RECEIVING, so that the assembler builds a
new sequence once the quiet period is over again. The series row is written (locked) before its state is
read, so an assembler's claim is either committed before (and reopened here) or comes after our commit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_listener.anatomy import resolve_body_part
from pacs_listener.status import StoreStatus
from pacs_listener.validate import InvalidDataset
from storage.models import Instance, Patient, Series, SeriesState, Study, utcnow

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class InstanceMeta:
    """What we keep of a received data set (never the patient's name)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    number_of_frames: int = 1
    image_position: list[float] | None = None
    image_orientation: list[float] | None = None
    acquisition_time: str = ""
    content_time: str = ""
    has_pixels: bool = False


class SeriesInOtherStudy(InvalidDataset):
    """The instance names a series recorded in another study: a Series Instance UID belongs to one study,
    so the data are inconsistent (a UID reused by a broken anonymizer or modality). Merging would score
    another study's (another patient's) slices in this series' sequence and file the report in the first
    study: refused with 0xA900, quarantined with both study UIDs."""

    def __init__(self, series_uid: str, recorded_study_uid: str, study_uid: str):
        super().__init__(f"SeriesInstanceUID {series_uid} is recorded in study {recorded_study_uid}; this "
                         f"instance names study {study_uid}", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)


@dataclass(frozen=True)
class IngestResult:
    instance_id: int
    series_uid: str
    created: bool  # False: this SOP Instance UID was already stored (resend)
    reopened: bool  # True: the series was ASSEMBLED/IGNORED and is RECEIVING again (late instance)
    path: str  # the stored instance's path relative to the spool (the first copy's on a resend)


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """The value as text without NUL characters: some modalities pad or separate values with NUL, which
    PostgreSQL text cannot hold (the commit would fail) and which mean nothing in a description or an ID."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional element: treat as absent
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).replace("\x00", "").strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if -_INT32_MAX <= number <= _INT32_MAX else None


def _floats(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(numbers) != n or not all(math.isfinite(x) for x in numbers):
        return None
    return numbers


def _date_time(ds: Dataset, dt_keyword: str | None, date_keyword: str, time_keyword: str) -> str:
    """Sortable ``YYYYMMDDHHMMSS.ffffff`` text: the DT attribute, else date + time, else time."""
    dt = _text(ds, dt_keyword, 32) if dt_keyword else ""
    if dt:
        return dt
    return (_text(ds, date_keyword, 8) + _text(ds, time_keyword, 16))[:32]


def extract_meta(ds: Dataset, transfer_syntax_uid: str) -> InstanceMeta:
    """The fields we keep, from a validated data set."""
    frames = _int(ds, "NumberOfFrames")
    return InstanceMeta(
        sop_instance_uid=_text(ds, "SOPInstanceUID", 64),
        sop_class_uid=_text(ds, "SOPClassUID", 64),
        study_uid=_text(ds, "StudyInstanceUID", 64),
        series_uid=_text(ds, "SeriesInstanceUID", 64),
        transfer_syntax_uid=str(transfer_syntax_uid)[:64],
        patient_id=_text(ds, "PatientID", 64),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        modality=_text(ds, "Modality", 16),
        body_part=resolve_body_part(
            _text(ds, "BodyPartExamined", 64),
            (_text(ds, "SeriesDescription", 128), _text(ds, "StudyDescription", 128), _text(ds, "ProtocolName", 128)),
        )[:64],
        series_description=_text(ds, "SeriesDescription", 128),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        number_of_frames=frames if frames and frames > 0 else 1,
        image_position=_floats(ds, "ImagePositionPatient", 3),
        image_orientation=_floats(ds, "ImageOrientationPatient", 6),
        acquisition_time=_date_time(ds, "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime"),
        content_time=_date_time(ds, None, "ContentDate", "ContentTime"),
        has_pixels=any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
    )


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def _patient(session: Session, meta: InstanceMeta) -> Patient:
    patient = session.scalar(
        select(Patient).where(Patient.patient_id == meta.patient_id, Patient.issuer == meta.issuer_of_patient_id)
    )
    if patient is None:
        patient = Patient(patient_id=meta.patient_id, issuer=meta.issuer_of_patient_id)
        session.add(patient)
        session.flush()
    return patient


def _study(session: Session, meta: InstanceMeta) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == meta.study_uid))
    if study is None:
        study = Study(
            study_uid=meta.study_uid,
            patient_fk=_patient(session, meta).id,
            study_date=meta.study_date,
            study_time=meta.study_time,
            accession_number=meta.accession_number,
        )
        session.add(study)
        session.flush()
    return study


def _lock_series(session: Session, series: Series, now: datetime) -> None:
    """Write ``last_received_at`` of an existing series, then reload the series, before reading its state.

    The assembler claims a series with a conditional UPDATE (RECEIVING → ASSEMBLED). Had we decided on the
    state read by a plain SELECT, an assembler could claim the series between that read and our commit: the
    instance would be committed and answered Success while the series stayed ASSEMBLED, in no sequence, for
    good. The UPDATE takes the row's lock on PostgreSQL (a claim then skips the row, or waits for our
    commit) and the database's write lock on SQLite, both held until our commit; a claim committed before
    that is what the reload reads, and the caller then reopens the series.
    """
    session.execute(
        update(Series)
        .where(Series.id == series.id)
        .values(last_received_at=now)
        .execution_options(synchronize_session=False)
    )
    session.refresh(series)


def record_instance(
    session: Session,
    meta: InstanceMeta,
    rel_path: str,
    *,
    size_bytes: int,
    sha256: str,
    calling_ae: str = "",
    now: datetime | None = None,
) -> IngestResult:
    """Upsert patient/study/series and add the instance (idempotent on SOP Instance UID).

    Flushes but does not commit. Concurrent first inserts of the same study/series/instance make the
    flush or commit raise ``IntegrityError``: roll back and call again (the listener does).
    """
    now = now or utcnow()
    existing = find_instance(session, meta.sop_instance_uid)
    if existing is not None:
        series_uid = session.scalar(select(Series.series_uid).where(Series.id == existing.series_fk)) or ""
        return IngestResult(existing.id, series_uid, created=False, reopened=False, path=existing.path)

    series = session.scalar(select(Series).where(Series.series_uid == meta.series_uid))
    if series is not None:
        recorded_study_uid = session.scalar(select(Study.study_uid).where(Study.id == series.study_fk))
        if recorded_study_uid != meta.study_uid:
            raise SeriesInOtherStudy(meta.series_uid, str(recorded_study_uid), meta.study_uid)
    study = _study(session, meta)
    reopened = False
    if series is None:
        series = Series(
            series_uid=meta.series_uid,
            study_fk=study.id,
            modality=meta.modality,
            body_part=meta.body_part,
            series_description=meta.series_description,
            series_number=meta.series_number,
            state=SeriesState.RECEIVING,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        session.flush()
    else:
        _lock_series(session, series, now)
        if series.state in (SeriesState.ASSEMBLED, SeriesState.IGNORED):
            series.state_reason = (
                f"late instance {meta.sop_instance_uid} received while {series.state.value}; receiving again"
            )
            series.state = SeriesState.RECEIVING
            reopened = True
        if not series.body_part and meta.body_part:
            series.body_part = meta.body_part

    instance = Instance(
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        series_fk=series.id,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        instance_number=meta.instance_number,
        number_of_frames=meta.number_of_frames,
        image_position=meta.image_position,
        image_orientation=meta.image_orientation,
        acquisition_time=meta.acquisition_time,
        content_time=meta.content_time,
        has_pixels=meta.has_pixels,
        path=rel_path,
        size_bytes=size_bytes,
        sha256=sha256,
        calling_ae=calling_ae[:16],
        received_at=now,
        patient_fk=_patient(session, meta).id,  # its own: the study's may be another's (assembly's prior)
    )
    session.add(instance)
    session.flush()
    return IngestResult(instance.id, series.series_uid, created=True, reopened=reopened, path=rel_path)
