"""Retention on SQLite and PostgreSQL: which files go, which stay, rows kept, and what a purged instance
means for a job, a late instance and a resend."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text

import storage.retention
from pacs_listener.assembly import Assembler, is_image_instance
from storage.db import init_db, make_session_factory
from storage.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Patient,
    QuarantineItem,
    SequenceRecord,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from storage.retention import prune, run_forever
from tests.storage.dbutil import isolated_url
from worker.loading import sequence_instances
from worker.pixels import FrameLoadError

MR = "1.2.840.10008.5.1.4.1.1.4"
NOW = utcnow()
OLD, RECENT = NOW - timedelta(days=30), NOW - timedelta(days=1)


@pytest.fixture
def world(database_url, make_settings):
    """Series A-F with files in the spool, outbox and quarantine items, under 7-day retention."""
    with isolated_url(database_url) as url:
        settings = make_settings(retention_days=7, quarantine_retention_days=30, database_url=url)
        engine = init_db(url)
        sf = make_session_factory(engine)
        files: dict[str, object] = {}

        def put(root, rel: str, size: int) -> str:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
            files[rel] = path
            return rel

        with sf() as s:
            study = Study(study_uid="1.9", patient=Patient(patient_id="P1"))

            def series(name: str, state: SeriesState, last, job_state: JobState | None, n: int = 2,
                       extra_refs: list | None = None) -> Series:
                se = Series(series_uid=f"1.9.{ord(name)}", study=study, modality="MR", state=state,
                            last_received_at=last)
                refs = []
                for k in range(n):
                    uid = f"1.9.{ord(name)}.{k + 1}"
                    rel = put(settings.spool_dir, f"1.9/{se.series_uid}/{uid}.dcm", 100 + k)
                    s.add(Instance(sop_instance_uid=uid, sop_class_uid=MR, series=se, path=rel, has_pixels=True,
                                   size_bytes=100 + k))
                    refs.append([uid, 1])
                if job_state is not None:
                    seq = SequenceRecord(series=se, frame_refs=(extra_refs or []) + refs,
                                         n_frames=len(refs) + len(extra_refs or []))
                    s.add(Job(sequence=seq, state=job_state))
                return se

            series("A", SeriesState.ASSEMBLED, OLD, JobState.SUCCEEDED)  # old and done: purged
            series("B", SeriesState.ASSEMBLED, OLD, JobState.FAILED)  # an admin may retry it: kept
            series("C", SeriesState.RECEIVING, OLD, None)  # not assembled yet: kept
            series("D", SeriesState.ASSEMBLED, RECENT, JobState.SUCCEEDED)  # too young: kept
            series("E", SeriesState.ASSEMBLED, OLD, JobState.SUCCEEDED)  # old, but the prior of F's queued job
            series("F", SeriesState.ASSEMBLED, RECENT, JobState.QUEUED, n=1,
                   extra_refs=[["1.9.69.1", 1], ["1.9.69.2", 1]])
            for k, (state, sent) in enumerate([(OutboxState.SENT, OLD), (OutboxState.SENT, RECENT),
                                               (OutboxState.FAILED, None), (OutboxState.PENDING, None)]):
                rel = put(settings.outbox_dir, f"2.{k}.dcm", 1000)
                s.add(OutboxItem(path=rel, sop_instance_uid=f"2.{k}", sop_class_uid=MR, destination="P@h:1",
                                 state=state, sent_at=sent, created_at=OLD))
            for k, received in enumerate([NOW - timedelta(days=40), NOW - timedelta(days=10)]):
                rel = put(settings.quarantine_dir, f"2026-01-0{k + 1}/q{k}.dcm", 50)
                put(settings.quarantine_dir, f"2026-01-0{k + 1}/q{k}.reason.json", 10)
                s.add(QuarantineItem(path=rel, reason="r", sop_instance_uid=f"3.{k}", calling_ae="X",
                                     status_code=0xA900, received_at=received))
            s.commit()
        yield settings, sf, files
        engine.dispose()


def _purged_instances(sf) -> set[str]:
    with sf() as s:
        return set(s.scalars(select(Instance.sop_instance_uid).where(Instance.purged_at.is_not(None))))


def test_prune_removes_only_what_no_one_needs(world):
    settings, sf, files = world
    before = {rel for rel, p in files.items() if p.exists()}

    dry = prune(settings, sf, now=NOW, dry_run=True)
    assert (dry.instances, dry.results, dry.quarantined) == (2, 1, 1)
    assert {rel for rel, p in files.items() if p.exists()} == before and _purged_instances(sf) == set()

    report = prune(settings, sf, now=NOW)
    assert (report.instances, report.results, report.quarantined) == (2, 1, 1) and not report.errors
    assert report.bytes == dry.bytes == 100 + 101 + 1000 + 50 + 10
    gone = before - {rel for rel, p in files.items() if p.exists()}
    assert gone == {"1.9/1.9.65/1.9.65.1.dcm", "1.9/1.9.65/1.9.65.2.dcm", "2.0.dcm",
                    "2026-01-01/q0.dcm", "2026-01-01/q0.reason.json"}
    assert not (settings.spool_dir / "1.9" / "1.9.65").exists()  # the emptied series folder too
    assert (settings.spool_dir / "1.9").is_dir()
    assert _purged_instances(sf) == {"1.9.65.1", "1.9.65.2"}
    with sf() as s:  # every row stays
        assert len(s.scalars(select(Instance)).all()) == 11
        assert [i.sop_instance_uid for i in s.scalars(select(OutboxItem).where(OutboxItem.purged_at.is_not(None)))] \
            == ["2.0"]
        assert [q.reason for q in s.scalars(select(QuarantineItem).where(QuarantineItem.purged_at.is_not(None)))] \
            == ["r"]
    assert prune(settings, sf, now=NOW).files == 0  # a second pass finds nothing new

    # once F's job is done, its prior E goes too
    with sf() as s:
        s.scalars(select(Job).where(Job.state == JobState.QUEUED)).one().state = JobState.SUCCEEDED
        s.commit()
    assert prune(settings, sf, now=NOW).instances == 2
    assert _purged_instances(sf) == {"1.9.65.1", "1.9.65.2", "1.9.69.1", "1.9.69.2"}


def test_a_purged_instance_counts_for_nothing_and_its_job_says_why(world):
    settings, sf, _ = world
    prune(settings, sf, now=NOW)
    with sf() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == "1.9.65.1")).one()
        assert not is_image_instance(inst)  # a late instance re-opening series A is assembled alone
        seq = s.scalars(select(SequenceRecord).join(Series).where(Series.series_uid == "1.9.65")).one()
        with pytest.raises(FrameLoadError, match="removed from the spool by retention.*retry the job"):
            sequence_instances(s, seq)


def test_retention_off_removes_nothing(world):
    settings, sf, files = world
    off = settings.model_copy(update={"retention_days": 0.0, "quarantine_retention_days": 0.0})
    assert prune(off, sf, now=NOW).files == 0
    assert all(p.exists() for p in files.values())


def test_the_service_loop_applies_retention(world):
    settings, sf, files = world
    stop = threading.Event()
    t = threading.Thread(target=run_forever, args=(settings, sf, stop), daemon=True)
    t.start()
    try:
        for _ in range(200):
            if not files["2.0.dcm"].exists():
                break
            stop.wait(0.05)
    finally:
        stop.set()
        t.join(10)
    assert not files["2.0.dcm"].exists() and not t.is_alive()


def test_medgru_prune_command(world, cli_env, capsys):
    from medgru.cli import main

    settings, sf, files = world
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    cli_env.setenv("MEDGRU_DATABASE_URL", settings.database_url)
    assert main(["prune"]) == 0
    assert "retention is off" in capsys.readouterr().out and all(p.exists() for p in files.values())
    cli_env.setenv("MEDGRU_RETENTION_DAYS", "7")
    cli_env.setenv("MEDGRU_QUARANTINE_RETENTION_DAYS", "30")
    assert main(["prune", "--dry-run"]) == 0
    assert ("retention would remove 2 instance file(s), 1 sent result file(s), 1 quarantined file(s)"
            in capsys.readouterr().out)
    assert main(["prune"]) == 0
    assert "retention removed 2 instance file(s)" in capsys.readouterr().out
    assert not files["2.0.dcm"].exists() and _purged_instances(sf) == {"1.9.65.1", "1.9.65.2"}


@pytest.fixture
def prior_world(database_url, make_settings):
    """Patient P7: an old study whose series is assembled and its job done (retention may take its files),
    and a new, quiet study of the same modality the assembler is about to turn into a job with the old one
    as its prior study."""
    with isolated_url(database_url) as url:
        settings = make_settings(retention_days=7, add_prior_study=True, quiet_period_s=0, database_url=url)
        engine = init_db(url)
        sf = make_session_factory(engine)
        with sf() as s:
            patient = Patient(patient_id="P7")

            def series(uid: str, date: str, state: SeriesState, last, n: int) -> tuple[Series, list[list]]:
                se = Series(series_uid=uid, study=Study(study_uid=f"{uid}.0", study_date=date, patient=patient),
                            modality="MR", state=state, last_received_at=last)
                refs = []
                for k in range(n):
                    rel = f"{uid}/{uid}.{k + 1}.dcm"
                    (settings.spool_dir / uid).mkdir(parents=True, exist_ok=True)
                    (settings.spool_dir / rel).write_bytes(b"x" * 10)
                    s.add(Instance(sop_instance_uid=f"{uid}.{k + 1}", sop_class_uid=MR, series=se, path=rel,
                                   has_pixels=True, instance_number=k + 1, size_bytes=10, patient=patient))
                    refs.append([f"{uid}.{k + 1}", 1])
                return se, refs

            old, refs = series("1.7.1", "20230101", SeriesState.ASSEMBLED, OLD, 2)
            s.add(Job(sequence=SequenceRecord(series=old, frame_refs=refs, n_frames=2), state=JobState.SUCCEEDED))
            series("1.7.2", "20240101", SeriesState.RECEIVING, RECENT, 1)
            s.commit()
        yield settings, sf
        engine.dispose()


def _missing_files_of_queued_jobs(settings, sf) -> dict[int, list[str]]:
    """Each queued job: the instances it reads whose file is gone or whose row is marked purged."""
    with sf() as s:
        insts = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        out = {}
        for job in s.scalars(select(Job).where(Job.state == JobState.QUEUED)):
            out[job.id] = [uid for uid, _frame in job.sequence.frame_refs
                           if insts[uid].purged_at is not None or not (settings.spool_dir / insts[uid].path).exists()]
        return out


def test_a_job_assembled_while_retention_runs_keeps_its_prior_study(prior_world, monkeypatch):
    """The assembler queues a job prepending the old study's frames after retention listed what no job
    reads and before it marks: retention re-checks when marking and leaves those files (and rows) alone."""
    settings, sf = prior_world
    assembled: list[int] = []
    listed = storage.retention._protected_uids

    def assembler_runs_after_the_listing(session):
        uids = listed(session)
        if not assembled:  # only between the listing and the mark, as in the service's threads
            assembled.extend(Assembler(settings, sf, enqueue=lambda _job_id: None).run_once(now=NOW))
        return uids

    monkeypatch.setattr(storage.retention, "_protected_uids", assembler_runs_after_the_listing)
    report = prune(settings, sf, now=NOW)
    assert len(assembled) == 1
    with sf() as s:
        assert s.get(Job, assembled[0]).sequence.frame_refs == [["1.7.1.1", 1], ["1.7.1.2", 1], ["1.7.2.1", 1]]
    assert _missing_files_of_queued_jobs(settings, sf) == {assembled[0]: []}
    assert report.instances == 0 and _purged_instances(sf) == set()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_retention_waits_for_an_assembler_that_already_read_the_prior_study(prior_world, monkeypatch):
    """PostgreSQL only (on SQLite the assembler's claim takes the database's single write lock before it reads
    the prior study, so it and retention's mark cannot overlap): an assembler has read the old study's
    instances but not yet committed its job when retention marks them; retention must wait for that job and
    keep the files, not remove them from under it."""
    settings, sf = prior_world
    read_prior, go_on = threading.Event(), threading.Event()
    prior = Assembler._prior

    def prior_then_pause(self, session, series):
        found = prior(self, session, series)
        read_prior.set()
        go_on.wait(60)
        return found

    monkeypatch.setattr(Assembler, "_prior", prior_then_pause)
    assembled: list[int] = []
    assembler = threading.Thread(target=lambda: assembled.extend(
        Assembler(settings, sf, enqueue=lambda _job_id: None).run_once(now=NOW)), daemon=True)
    assembler.start()
    assert read_prior.wait(60)
    reports = []
    pruner = threading.Thread(target=lambda: reports.append(prune(settings, sf, now=NOW)), daemon=True)
    pruner.start()

    def pruner_waits_for_a_lock() -> bool:
        with sf() as s:  # a new transaction each time: PostgreSQL keeps a transaction's pg_stat_activity
            return bool(s.scalar(text("SELECT count(*) FROM pg_stat_activity "
                                      "WHERE wait_event_type = 'Lock' AND datname = current_database()")))

    while pruner.is_alive() and not pruner_waits_for_a_lock():  # then let the assembler commit
        go_on.wait(0.01)
    go_on.set()
    assembler.join(60)
    pruner.join(60)
    assert not assembler.is_alive() and not pruner.is_alive() and len(assembled) == 1
    assert _missing_files_of_queued_jobs(settings, sf) == {assembled[0]: []}
    assert reports[0].instances == 0 and _purged_instances(sf) == set()
