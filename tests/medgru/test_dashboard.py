"""The admin dashboard and Prometheus metrics, served for real over HTTP against a real database."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from medgru.dashboard import DashboardServer
from storage.db import init_db, make_session_factory
from storage.models import (
    Job,
    JobState,
    Patient,
    Result,
    SequenceRecord,
    Series,
    Study,
)
from worker.admin import cancel_job, retry_job
from worker.celery_app import make_celery


@pytest.fixture
def dash(make_settings):
    settings = make_settings(dashboard_port=0)
    sf = make_session_factory(init_db(settings.effective_database_url))
    with sf() as s:
        p = Patient(patient_id="P1")
        st = Study(study_uid="1.2.3", patient=p)
        se = Series(series_uid="1.2.3.4", study=st, modality="MR", body_part="BRAIN")
        seq = SequenceRecord(series=se, frame_refs=[["1.2.3.4.1", 1]], n_frames=1)
        ok = Job(sequence=seq, state=JobState.SUCCEEDED, model_name="medgru-svc-brain", model_version="1")
        s.add_all([ok, Job(sequence=seq, state=JobState.FAILED, last_error="decode error in 1.2.3.4.1"),
                   Job(sequence=seq, state=JobState.QUEUED)])
        s.add(Result(job=ok, score=1.5, threshold=1.0, is_anomaly=True, model_name="medgru-svc-brain",
                     model_version="1", inference_seconds=0.2))
        s.commit()
    app = make_celery(settings)
    server = DashboardServer(settings, sf, retry=lambda j: retry_job(sf, app, j),
                             cancel=lambda j: cancel_job(sf, j)).start()
    yield settings, sf, f"http://127.0.0.1:{server.port}"
    server.stop()


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def _post(url: str) -> int:
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_page_lists_jobs_with_states_and_actions(dash):
    _, _, base = dash
    status, ctype, body = _get(base + "/")
    assert status == 200 and ctype.startswith("text/html")
    assert "succeeded" in body and "failed" in body and "queued" in body
    assert "abnormal" in body and "medgru-svc-brain 1" in body
    assert 'action="/jobs/2/retry"' in body and 'action="/jobs/3/cancel"' in body
    assert "NOT FOR DIAGNOSTIC USE" in body


def test_api_and_metrics_agree_with_the_database(dash):
    _, _, base = dash
    _, ctype, body = _get(base + "/api/jobs")
    data = json.loads(body)
    assert ctype == "application/json"
    assert data["summary"]["jobs"]["failed"] == 1 and data["summary"]["results"] == 1
    assert [j["id"] for j in data["jobs"]] == [3, 2, 1]
    _, _, metrics = _get(base + "/metrics")
    assert 'medgru_jobs{state="failed"} 1.0' in metrics
    assert 'medgru_jobs{state="succeeded"} 1.0' in metrics
    assert "medgru_inference_seconds_mean 0.2" in metrics


def test_retry_requeues_on_the_broker_and_cancel_stops_a_queued_job(dash):
    settings, sf, base = dash
    assert _post(base + "/jobs/2/retry") in (200, 303)
    assert _post(base + "/jobs/3/cancel") in (200, 303)
    with sf() as s:
        assert s.get(Job, 2).state == JobState.QUEUED and s.get(Job, 2).last_error == ""
        assert s.get(Job, 3).state == JobState.CANCELLED
    # the retried job is a real message in the embedded broker's folder
    assert any(settings.broker_dir.rglob("*.msg"))
    # not allowed: retrying a succeeded job, cancelling a cancelled one, unknown job
    assert _post(base + "/jobs/1/retry") == 409
    assert _post(base + "/jobs/3/cancel") == 409
    assert _post(base + "/jobs/99/retry") == 409
