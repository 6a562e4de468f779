"""Server-free checks: Celery configuration, retry backoff, the model registry, claims, orphan recovery."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from inference.api import ModelCard
from storage.models import Job, JobState
from tests.worker.conftest import BRAINIX, MODEL_NAME, add_series
from worker.celery_app import DEFAULT_QUEUE, make_celery
from worker.embedded import INTERRUPTED_NOTE, recover_orphans, worker_command
from worker.models import ModelRegistry, resolve_device
from worker.pipeline import claim_job, process_job
from worker.tasks import RUN_JOB, StalledJobSweeper, enqueue_job, retry_delay


def _queued_messages(settings) -> list[dict]:
    out = []
    for p in sorted((settings.broker_dir / "queue").glob("*.msg")):
        out.append(json.loads(p.read_text()))
    return out


def _queued_job_ids(settings) -> list[int]:
    import base64

    return sorted(json.loads(base64.b64decode(m["body"]))[1]["job_id"] for m in _queued_messages(settings))


def test_embedded_broker_connects_without_a_hostname_warning(make_settings, caplog):
    app = make_celery(make_settings())
    with caplog.at_level(logging.WARNING, logger="kombu"):
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            assert conn.connected
            assert conn.as_uri().startswith("filesystem://")  # what Celery logs the broker as
    assert not [r for r in caplog.records if "hostname" in r.getMessage()]


def test_celery_app_configuration(make_settings):
    s = make_settings()
    app = make_celery(s)
    c = app.conf
    assert c.broker_url == "filesystem://localhost//" and s.uses_embedded_broker
    assert c.task_acks_late is True and c.task_reject_on_worker_lost is True
    assert c.worker_prefetch_multiplier == 1
    assert c.task_serializer == "json" and list(c.accept_content) == ["json"]
    assert c.task_default_queue == DEFAULT_QUEUE and not c.result_backend
    opts = c.broker_transport_options
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(s.broker_dir / "queue")
    assert opts["processed_folder"].startswith(str(s.broker_dir))
    assert (s.broker_dir / "queue").is_dir() and (s.broker_dir / "control").is_dir()
    assert RUN_JOB in app.tasks

    r = make_celery(make_settings(broker_url="redis://127.0.0.1:6379/7"), queue="other")
    assert r.conf.broker_url == "redis://127.0.0.1:6379/7" and r.conf.task_default_queue == "other"
    assert r.conf.broker_transport_options["visibility_timeout"] > 3600


def test_retry_delay_is_exponential_and_capped(make_settings):
    s = make_settings(job_retry_backoff_s=5.0)
    assert [retry_delay(s, a) for a in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert retry_delay(s, 40) == 3600.0


def test_enqueue_writes_an_id_only_message_on_the_embedded_broker(make_settings):
    s = make_settings()
    app = make_celery(s, queue="medgru.unit")
    task_id = enqueue_job(app, 42)
    msgs = _queued_messages(s)
    assert len(msgs) == 1
    msg = msgs[0]
    assert msg["headers"]["task"] == RUN_JOB and msg["headers"]["id"] == task_id
    assert msg["properties"]["delivery_info"]["routing_key"] == "medgru.unit"
    import base64

    args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
    assert args == [] and kwargs == {"job_id": 42}


def test_worker_command_uses_solo_pool_and_queue(make_settings):
    cmd = worker_command(make_settings(), "q1")
    assert cmd[1:5] == ["-m", "celery", "-A", "worker.celery_app"]
    assert "--pool" in cmd and cmd[cmd.index("--pool") + 1] == "solo"
    assert cmd[cmd.index("-Q") + 1] == "q1" and cmd[cmd.index("--concurrency") + 1] == "1"
    assert cmd[cmd.index("--loglevel") + 1] == "INFO"
    cmd = worker_command(make_settings(log_level="warn"), "q1")
    assert cmd[cmd.index("--loglevel") + 1] == "WARNING"


def test_model_registry_discovers_selects_caches_and_skips_bad_cards(trained_model_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(trained_model_dir, models / "a-good")
    broken = models / "b-broken"
    broken.mkdir()
    (broken / "card.json").write_text("{not json")
    registry = ModelRegistry([models], device="cpu")
    cards = registry.cards
    assert [c.name for _, c in cards] == [MODEL_NAME]
    assert broken in registry.errors
    assert registry.select("MR", "brain")[1].name == MODEL_NAME
    assert registry.select("MR", "KNEE") is None and registry.select("CT", "BRAIN") is None
    det = registry.get(models / "a-good")
    assert det is registry.get(models / "a-good")  # loaded once
    assert det.card.name == MODEL_NAME and det.threshold > 0
    # a tampered model file is refused (checksums in the card)
    tampered = tmp_path / "tampered"
    shutil.copytree(trained_model_dir, tampered)
    card = ModelCard.read(tampered)
    victim = tampered / next(iter(card.files))
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(ValueError, match="checksum"):
        ModelRegistry([tampered]).get(tampered)


def test_resolve_device(monkeypatch):
    import torch

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("") == "cpu"
    with pytest.raises(ValueError, match="sees no CUDA GPU"):  # said at model load, not at the first tensor
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("CUDA:1") == "cuda:1"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_claim_is_exclusive(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    assert claim_job(session_factory, job_id, task_id="t1") == (True, JobState.RUNNING)
    # another delivery (other task id) must not run it too; the same task (broker re-delivery) may
    assert claim_job(session_factory, job_id, task_id="t2") == (False, JobState.RUNNING)
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings),
                       task_id="t2") is JobState.RUNNING
    assert claim_job(session_factory, job_id, task_id="t1") == (True, JobState.RUNNING)
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2 and job.celery_task_id == "t1"
    assert claim_job(session_factory, 9999) == (False, None)
    with pytest.raises(LookupError):
        process_job(settings, session_factory, 9999, ModelRegistry.from_settings(settings))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_redelivered_job_that_killed_every_worker_fails(worker_settings, session_factory, dicom_corpus):
    """Each time its worker dies the broker re-delivers the message (acks_late); once the job has used
    all its attempts that way it fails with the reason instead of killing the next worker too."""
    settings = worker_settings(job_max_retries=1)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    assert claim_job(session_factory, job_id, task_id="t1", max_retries=1) == (True, JobState.RUNNING)
    # the worker dies; the re-delivery may run it once more (attempt 2 of 1 + 1 retry)
    assert claim_job(session_factory, job_id, task_id="t1", max_retries=1) == (True, JobState.RUNNING)
    # it dies again: the next re-delivery fails the job instead of running it a third time
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings),
                       task_id="t1") is JobState.FAILED
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2 and job.last_error.startswith("the worker stopped during each of its 2 attempts")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_recover_orphans_requeues_unfinished_jobs(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    ids = [add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)]
    with session_factory() as s:
        seq_fk = s.get(Job, ids[0]).sequence_fk
        for state in (JobState.RUNNING, JobState.RETRYING, JobState.SUCCEEDED, JobState.FAILED,
                      JobState.CANCELLED, JobState.NOT_PROCESSED):
            job = Job(sequence_fk=seq_fk, state=state, celery_task_id="old")
            s.add(job)
            s.flush()
            ids.append(job.id)
        s.commit()
    app = make_celery(settings, queue="medgru.recover")
    recovered = recover_orphans(session_factory, app)
    assert recovered == ids[:3]  # QUEUED, RUNNING, RETRYING; terminal ones stay as they are
    with session_factory() as s:
        running = s.get(Job, ids[1])
        assert running.state is JobState.QUEUED and running.last_error == INTERRUPTED_NOTE
        assert running.celery_task_id == ""
        assert [s.get(Job, j).state for j in ids[3:]] == [JobState.SUCCEEDED, JobState.FAILED,
                                                         JobState.CANCELLED, JobState.NOT_PROCESSED]
    import base64

    sent = sorted(json.loads(base64.b64decode(m["body"]))[1]["job_id"] for m in _queued_messages(settings))
    assert sent == sorted(ids[:3])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_that_kills_its_worker_every_time_fails_instead_of_looping(worker_settings, session_factory,
                                                                          dicom_corpus):
    settings = worker_settings(job_max_retries=2)
    first = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with session_factory() as s:  # two orphans: one with attempts left, one that used them all
        s.get(Job, first).state, s.get(Job, first).attempts = JobState.RUNNING, 2
        poison = Job(sequence_fk=s.get(Job, first).sequence_fk, state=JobState.RUNNING, attempts=3)
        s.add(poison)
        s.commit()
        poison_id = poison.id
    app = make_celery(settings, queue="medgru.poison")
    assert recover_orphans(session_factory, app, max_retries=settings.job_max_retries) == [first]
    with session_factory() as s:
        job = s.get(Job, poison_id)
        assert job.state is JobState.FAILED and job.finished_at is not None
        assert job.last_error.startswith("the worker stopped during each of its 3 attempts")
        assert s.get(Job, first).state is JobState.QUEUED


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_early_delivery_of_a_retrying_job_is_rescheduled_for_the_rest_of_its_back_off(
        worker_settings, session_factory, dicom_corpus, monkeypatch):
    """The task does not run a RETRYING job before ``retry_at``: it re-schedules itself for what is left."""
    from datetime import timedelta

    from storage.models import utcnow

    settings = worker_settings(job_max_retries=3, job_retry_backoff_s=30.0)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with session_factory() as s:
        job = s.get(Job, job_id)
        job.state, job.attempts, job.retry_at = JobState.RETRYING, 1, utcnow() + timedelta(seconds=20)
        s.commit()
    app = make_celery(settings, queue="medgru.early")
    task = app.tasks[RUN_JOB]
    countdowns: list[float] = []

    class Rescheduled(Exception):
        pass

    def fake_retry(*, countdown, **_kw):
        countdowns.append(countdown)
        return Rescheduled()

    monkeypatch.setattr(task, "retry", fake_retry)
    task.push_request(id="duplicate-message", retries=0)
    try:
        with pytest.raises(Rescheduled):
            task.run(job_id=job_id)
    finally:
        task.pop_request()
    assert len(countdowns) == 1 and 15.0 < countdowns[0] <= 20.0
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert job.state is JobState.RETRYING and job.attempts == 1  # not run


def test_the_sweep_enqueues_again_a_job_left_waiting_without_a_message(worker_settings, session_factory,
                                                                       dicom_corpus, monkeypatch):
    """A job committed while the broker was away stays QUEUED with no message (a RETRYING one whose
    re-scheduled message was lost, likewise); with external workers nothing else would ever enqueue it."""
    from datetime import timedelta

    import worker.tasks as tasks
    from storage.models import utcnow

    settings = worker_settings(requeue_after_s=300.0)
    t0 = utcnow()
    stuck = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with session_factory() as s:  # add_series enqueues nothing: `stuck` has no message
        seq_fk = s.get(Job, stuck).sequence_fk
        overdue = Job(sequence_fk=seq_fk, state=JobState.RETRYING, attempts=1, retry_at=t0 - timedelta(seconds=5))
        backing_off = Job(sequence_fk=seq_fk, state=JobState.RETRYING, attempts=1, retry_at=t0 + timedelta(hours=1))
        done = Job(sequence_fk=seq_fk, state=JobState.SUCCEEDED)
        s.add_all([overdue, backing_off, done])
        s.commit()
        overdue, backing_off = overdue.id, backing_off.id
    sweeper = StalledJobSweeper(settings, session_factory, make_celery(settings, queue="medgru.sweep"))
    assert sweeper.sweep(now=t0) == []  # waiting, not yet for the grace period: its message may be in flight
    with session_factory() as s:
        fresh = Job(sequence_fk=seq_fk, state=JobState.QUEUED, queued_at=t0 + timedelta(seconds=299))
        s.add(fresh)
        s.commit()
        fresh = fresh.id
    assert sweeper.sweep(now=t0 + timedelta(seconds=299)) == []
    assert _queued_job_ids(settings) == []

    def broker_away(app, job_id):
        raise ConnectionError("broker away")

    with monkeypatch.context() as m:
        m.setattr(tasks, "enqueue_job", broker_away)
        assert sweeper.sweep(now=t0 + timedelta(seconds=300)) == []  # broker still away: tried at the next sweep
    assert sweeper.sweep(now=t0 + timedelta(seconds=301)) == [stuck, overdue]
    assert _queued_job_ids(settings) == sorted([stuck, overdue])  # one message each; none for fresh, backing_off
    assert sweeper.sweep(now=t0 + timedelta(seconds=302)) == []  # not doubled at every sweep

    with session_factory() as s:  # a worker took it meanwhile: no longer waiting
        s.get(Job, stuck).state = JobState.RUNNING
        s.commit()
    assert sweeper.sweep(now=t0 + timedelta(seconds=601)) == [overdue, fresh]


def test_a_restarted_sweeper_counts_the_wait_from_when_the_job_was_queued(worker_settings, session_factory,
                                                                         dicom_corpus):
    """The wait was counted from when this sweeper first saw a job: each restart of `medgru serve` started
    it again (a review saw a job without a message wait from 23:30 to 23:40 across two restarts). A sweeper
    that has just started enqueues at once a job queued more than requeue_after_s ago, and one queued
    less long ago only when that much time has passed since its queueing."""
    from datetime import timedelta

    from storage.models import utcnow

    settings = worker_settings(requeue_after_s=300.0)
    t0 = utcnow()
    old = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with session_factory() as s:
        s.get(Job, old).queued_at = t0 - timedelta(seconds=400)
        recent = Job(sequence_fk=s.get(Job, old).sequence_fk, state=JobState.QUEUED,
                     queued_at=t0 - timedelta(seconds=100))
        s.add(recent)
        s.commit()
        recent = recent.id
    restarted = StalledJobSweeper(settings, session_factory, make_celery(settings, queue="medgru.restart"))
    assert restarted.sweep(now=t0) == [old]
    assert restarted.sweep(now=t0 + timedelta(seconds=199)) == []
    assert restarted.sweep(now=t0 + timedelta(seconds=200)) == [recent]


def test_a_result_file_is_written_durably_folder_included(tmp_path, monkeypatch):
    """write_atomically fsync'ed the result's bytes and renamed them onto their name, but not the folder: the
    outbox row naming the file is committed right after, so a power loss could keep the row and lose the
    rename, and the result would never reach the PACS ("file missing from the outbox"). The spool's writes
    fsync the folder after the rename; the outbox's now do too."""
    import os
    import stat

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from worker.pipeline import write_atomically

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    path = tmp_path / "outbox" / f"{ds.SOPInstanceUID}.dcm"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append("folder" if stat.S_ISDIR(mode) else "file" if path.is_file() else "temp")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomically(ds, path)
    assert path.is_file() and not list(path.parent.glob(".tmp-*"))
    assert synced == ["temp", "folder"]  # the bytes before the rename, the folder after it


def test_the_registry_warns_of_a_model_that_an_earlier_one_hides(tmp_path, caplog):
    """The README's `medgru calibrate --model models/chest-cxr ... --out models/chest-cxr-site`, then
    MEDGRU_MODEL=models: both folders were found in name order, every chest series went to the uncalibrated
    chest-cxr, and the log's "models available" named both as if the calibrated one were in use."""
    from medgru.settings import BUNDLED_MODELS_DIR

    models = tmp_path / "models"
    card = json.loads((BUNDLED_MODELS_DIR / "chest-cxr" / "card.json").read_text())
    for name, version in (("chest-cxr", card["version"]), ("chest-cxr-site", card["version"] + "+cal.1")):
        (models / name).mkdir(parents=True)
        (models / name / "card.json").write_text(json.dumps({**card, "version": version}))
    with caplog.at_level(logging.WARNING, logger="worker.models"):
        registry = ModelRegistry([models, BUNDLED_MODELS_DIR / "brain-mr"], device="cpu")
        assert registry.select("CR", "CHEST")[0] == models / "chest-cxr"
    hidden = [r.getMessage() for r in caplog.records if "never used" in r.getMessage()]
    assert len(hidden) == 1, hidden
    assert f"+cal.1 ({models / 'chest-cxr-site'}) is never used" in hidden[0]
    assert f"{card['version']} ({models / 'chest-cxr'})" in hidden[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.models"):
        ModelRegistry([models / "chest-cxr-site", BUNDLED_MODELS_DIR], device="cpu").cards
    assert [r.getMessage() for r in caplog.records if "never used" in r.getMessage()] == [
        f"model {card['name']} {card['version']} ({BUNDLED_MODELS_DIR / 'chest-cxr'}) is never used: "
        f"{card['name']} {card['version']}+cal.1 ({models / 'chest-cxr-site'}), before it in MEDGRU_MODEL "
        "(folders of models in name order), covers its whole scope; list the model to serve first"]
