"""A real Celery worker runs a job on the GPU: the production path of a GPU host.

Marker ``cuda``: deselected unless asked for (``python -m pytest -m cuda``), and failing where torch sees
no GPU (see ``tests/inference/test_cuda.py``). The worker is the embedded one (kombu's filesystem
transport, SQLite): a child process that imports torch itself, as a GPU host's ``celery worker`` does, with
the settings' default device, ``auto``. It scores a Brainix FLAIR series with the bundled brain model and
writes the SR and the Secondary Capture to the outbox.
"""

from __future__ import annotations

import time
import uuid

import pydicom
import pytest
import torch
from sqlalchemy import select

from medgru.settings import BUNDLED_MODELS_DIR
from storage.models import Job, JobState, OutboxItem, Result
from tests.worker.conftest import BRAINIX, add_series
from worker.celery_app import make_celery
from worker.embedded import start_worker
from worker.tasks import enqueue_job

pytestmark = pytest.mark.cuda

WAIT_S = 300.0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_celery_worker_scores_a_series_on_the_gpu_and_writes_sr_and_sc(worker_settings, session_factory,
                                                                         dicom_corpus, tmp_path):
    assert torch.cuda.is_available(), f"-m cuda asked for, but torch {torch.__version__} sees no CUDA GPU"
    settings = worker_settings(model=[BUNDLED_MODELS_DIR / "brain-mr"], device="auto", broker_url=None)
    queue = f"medgru.test.{uuid.uuid4().hex[:8]}"
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=8)
    worker = start_worker(settings, queue=queue, log_path=tmp_path / "worker.log")
    try:
        enqueue_job(make_celery(settings, queue=queue), job_id)
        deadline = time.monotonic() + WAIT_S
        while True:
            with session_factory() as s:
                state = s.get(Job, job_id).state
            if state in (JobState.SUCCEEDED, JobState.FAILED) or time.monotonic() > deadline:
                break
            assert worker.is_alive(), worker.log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
    finally:
        worker.stop(timeout=60)
    log = worker.log_path.read_text(errors="replace")
    assert state is JobState.SUCCEEDED, log[-3000:]
    assert "medgru-svc-brain-mr" in log and " on cuda" in log, log[-3000:]
    with session_factory() as s:
        res = s.scalars(select(Result).where(Result.job_fk == job_id)).one()
        items = s.scalars(select(OutboxItem).where(OutboxItem.result_fk == res.id)).all()
    assert res.model_name == "medgru-svc-brain-mr" and res.is_anomaly == (res.score > res.threshold)
    assert {i.sop_instance_uid for i in items} == {res.sr_sop_instance_uid, res.sc_sop_instance_uid}
    for item in items:
        assert pydicom.dcmread(settings.outbox_dir / item.path).SOPInstanceUID == item.sop_instance_uid
