"""SQLAlchemy 2 models: patients → studies → series → instances; sequences → jobs → results; outbox.

Patient names are never stored: logs and tables carry UIDs and IDs only. The DICOM files themselves
live in the spool (``Instance.path`` is relative to ``settings.spool_dir``); result objects waiting to
be sent live in the outbox folder (``OutboxItem.path`` relative to ``settings.outbox_dir``).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


UID = String(64)


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that round-trips timezone-aware datetimes on SQLite too.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones and SQLAlchemy would silently drop the
    offset (12:00+02:00 came back as a naive 12:00). Values are converted to UTC before binding (a naive
    value is taken to be UTC already) and come back aware, in UTC, on both databases, so comparisons
    such as ``last_received_at < cutoff`` are correct on SQLite as well.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class SeriesState(str, enum.Enum):
    RECEIVING = "receiving"  # instances still arriving (quiet period not over)
    ASSEMBLED = "assembled"  # quiet period over, sequence(s) built
    IGNORED = "ignored"  # no image content (SR, PR, KOS, SEG, our own outputs...): never a job


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # retries exhausted; kept, shown, can be retried by an admin
    NOT_PROCESSED = "not_processed"  # no model covers the sequence; reason recorded, no results
    CANCELLED = "cancelled"


class OutboxState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # gave up after max attempts; kept for an admin


def _enum(e: type[enum.Enum]) -> Enum:
    return Enum(e, native_enum=False, length=32, values_callable=lambda x: [m.value for m in x])


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)  # DICOM PatientID (may be "")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    studies: Mapped[list["Study"]] = relationship(back_populates="patient")
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")  # DICOM DA, "" if absent
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")  # resolved (BodyPartExamined or description)
    series_description: Mapped[str] = mapped_column(String(128), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING, index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")
    sequences: Mapped[list["SequenceRecord"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    image_position: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    image_orientation: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    acquisition_time: Mapped[str] = mapped_column(String(32), default="")  # DICOM DT/TM text, sortable
    content_time: Mapped[str] = mapped_column(String(32), default="")
    has_pixels: Mapped[bool] = mapped_column(Boolean, default=False)
    path: Mapped[str] = mapped_column(Text)  # relative to spool_dir
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # files of 2 GiB and more exist (WSI)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: when retention removed the spool file (the row stays: what was received, and from whom)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: the patient this instance names (its own PatientID and issuer), which may differ from the patient its
    #: study was first recorded for (a Study Instance UID reused for another patient, a corrected PatientID);
    #: a prior study is added only where every instance of both series names the same patient
    patient_fk: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True, index=True)
    series: Mapped[Series] = relationship(back_populates="instances")
    patient: Mapped[Patient | None] = relationship()


class QuarantineItem(Base):
    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to quarantine_dir
    reason: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    status_code: Mapped[int] = mapped_column(Integer)  # the DIMSE status we answered
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: when retention removed the file and its sidecar (the row keeps the reason)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: when an admin's retry stored the kept file after all (``medgru quarantine retry``)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SequenceRecord(Base):
    """An ordered list of frames that becomes one inference job."""

    __tablename__ = "sequences"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    # [[sop_instance_uid, frame_number(1-based)], ...] in temporal/spatial order
    frame_refs: Mapped[list[Any]] = mapped_column(JSON)
    n_frames: Mapped[int] = mapped_column(Integer)
    order_key: Mapped[str] = mapped_column(String(32), default="")  # instance_number | position | time | none
    prior_study_uid: Mapped[str] = mapped_column(UID, default="")  # set when a prior study's frames lead
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    series: Mapped[Series] = relationship(back_populates="sequences")
    jobs: Mapped[list["Job"]] = relationship(back_populates="sequence")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    sequence_fk: Mapped[int] = mapped_column(ForeignKey("sequences.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    reason: Mapped[str] = mapped_column(Text, default="")  # why not processed / cancelled
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    celery_task_id: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: a RETRYING job is not claimed before this time (the failed attempt's back-off), whichever message
    #: delivers it; None = no back-off pending
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: when the job was last put on the queue: created, retried by an admin, re-queued after an interrupted
    #: run (None for rows from before migration 0007: read created_at). The oldest waiting job's age.
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, default=utcnow)
    #: the last sign of life of the worker running the job (stamped at the claim, then every
    #: ``settings.job_heartbeat_s``); a RUNNING job without one for ``settings.job_stale_after_s`` is orphaned
    #: (None for rows from before migration 0009: read started_at)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sequence: Mapped[SequenceRecord] = relationship(back_populates="jobs")
    results: Mapped[list["Result"]] = relationship(back_populates="job")


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    is_anomaly: Mapped[bool] = mapped_column(Boolean)
    cluster_label: Mapped[str] = mapped_column(Text, default="")  # a detector's label has no length limit
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    sc_sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    inference_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    #: each frame scored alone, in sequence order (as in the SR's per-frame groups); None: one frame
    frame_scores: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    job: Mapped[Job] = relationship(back_populates="results")


class OutboxItem(Base):
    """A DICOM object waiting to be C-STORE'd to the destination PACS."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(primary_key=True)
    result_fk: Mapped[int | None] = mapped_column(ForeignKey("results.id"), nullable=True, index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to outbox_dir
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    destination: Mapped[str] = mapped_column(String(128))  # AET@host:port
    state: Mapped[OutboxState] = mapped_column(_enum(OutboxState), default=OutboxState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: the peer's permanent refusals since the item was (re)queued: it goes FAILED at the sender's
    #: ``max_attempts`` of these; attempts while the peer was unreachable do not count
    refusals: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: when retention removed the sent object's file
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
