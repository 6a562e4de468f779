"""Fixtures of the worker tests: a tiny genuinely trained detector, a fresh database, series in a spool.

The detector is the real ``knn-effnet`` class with its ``SMALL_PARAMS``, fitted on real normal brain MRI
slices (``brain_mri/train/notumor``) through the Detector API and saved as a model folder whose card
covers MR of the BRAIN/HEAD. Series are real corpus files copied into the test's spool and recorded in
the database the way the listener and the assembler record them.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from sqlalchemy import create_engine, text

from inference.api import FrameSequence, ModelCard, Scope, get_detector_class, sha256_file
from storage.db import init_db, make_session_factory
from storage.models import Instance, Job, JobState, Patient, SequenceRecord, Series, SeriesState, Study

BRAINIX = "orthanc-tests/Brainix/Flair"
KNEE = "orthanc-tests/Knee/T1"
MODEL_NAME = "knn-effnet-test"
MODEL_VERSION = "0.0.1"
N_TRAIN = 16


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, data_root: Path) -> Path:
    """A knn-effnet model (SMALL_PARAMS) trained on real normal brain MRI slices; scope MR BRAIN/HEAD."""
    files = sorted((data_root / "brain_mri" / "train" / "notumor").glob("*.jpg"))[:N_TRAIN]
    assert len(files) == N_TRAIN, "brain_mri/train/notumor is missing from the data root"
    normals = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        normals.append(FrameSequence(frames=(img.astype(np.float32) / 255.0)[None], modality="MR",
                                     body_part="BRAIN", bits_stored=8))
    cls = get_detector_class("knn-effnet")
    det = cls(**cls.SMALL_PARAMS)
    det.fit(normals[:12], validation=normals[12:], seed=0)
    model_dir = tmp_path_factory.mktemp("models") / MODEL_NAME
    model_dir.mkdir()
    names = det.save(model_dir)
    card = ModelCard(
        name=MODEL_NAME, version=MODEL_VERSION, detector="knn-effnet",
        scope=Scope(modalities=("MR",), body_parts=("BRAIN", "HEAD"), description="test: brain MRI"),
        params=det.get_params(), files={n: sha256_file(model_dir / n) for n in names},
        training_data=f"{N_TRAIN} brain_mri/train/notumor slices (test fixture)",
    )
    card.write(model_dir)
    return model_dir


@pytest.fixture
def db_url(database_url: str) -> str:
    """``database_url`` with a database of this test's own (PostgreSQL: a fresh database, dropped after)."""
    if database_url.startswith("sqlite"):
        yield database_url
        return
    base, _name = database_url.rsplit("/", 1)
    name = f"medgru_worker_{uuid.uuid4().hex[:10]}"
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def session_factory(db_url: str):
    engine = init_db(db_url)
    yield make_session_factory(engine)
    engine.dispose()


def add_series(settings, session_factory, corpus: Path, rel_folder: str, *, body_part: str,
               modality: str | None = None, limit: int | None = None, calling_ae: str = "") -> int:
    """Copy a corpus series into the spool, record it (patient → instances → sequence) and a QUEUED job.

    Returns the job id. Frames are ordered by InstanceNumber; every instance gives its frame(s).
    """
    files = sorted(p for p in (corpus / rel_folder).iterdir() if p.is_file())
    headers = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in files]
    headers.sort(key=lambda hp: int(hp[0].get("InstanceNumber", 0) or 0))
    if limit:
        headers = headers[:limit]
    first = headers[0][0]
    with session_factory() as session:
        patient = Patient(patient_id=str(first.get("PatientID", "")), issuer="")
        study = Study(study_uid=str(first.StudyInstanceUID), patient=patient,
                      study_date=str(first.get("StudyDate", "")))
        series = Series(series_uid=str(first.SeriesInstanceUID), study=study,
                        modality=modality or str(first.Modality), body_part=body_part,
                        series_description=str(first.get("SeriesDescription", "")),
                        state=SeriesState.ASSEMBLED)
        session.add_all([patient, study, series])
        refs = []
        for ds, path in headers:
            uid = str(ds.SOPInstanceUID)
            rel = Path(str(series.series_uid)) / f"{uid}.dcm"
            dest = settings.spool_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            n = int(ds.get("NumberOfFrames", 1) or 1)
            session.add(Instance(sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID), series=series,
                                 transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                 instance_number=int(ds.get("InstanceNumber", 0) or 0), number_of_frames=n,
                                 has_pixels=True, path=str(rel), size_bytes=dest.stat().st_size,
                                 calling_ae=calling_ae, patient=patient))
            refs += [[uid, f] for f in range(1, n + 1)]
        seq = SequenceRecord(series=series, frame_refs=refs, n_frames=len(refs), order_key="instance_number")
        job = Job(sequence=seq, state=JobState.QUEUED)
        session.add_all([seq, job])
        session.commit()
        return job.id


@pytest.fixture
def worker_settings(make_settings, db_url, trained_model_dir):
    """Settings factory on this test's database and the trained test model."""

    def factory(**overrides):
        overrides.setdefault("database_url", db_url)
        overrides.setdefault("model", [trained_model_dir])
        overrides.setdefault("destination", "ORTHANC@127.0.0.1:4242")
        overrides.setdefault("job_max_retries", 2)
        overrides.setdefault("job_retry_backoff_s", 0.1)
        overrides.setdefault("device", "cpu")
        return make_settings(**overrides)

    return factory
