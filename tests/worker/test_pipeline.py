"""process_job on SQLite and PostgreSQL with a genuinely trained detector and real corpus series."""

from __future__ import annotations

from datetime import timedelta

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage
from sqlalchemy import select, update

from storage.models import Instance, Job, JobState, OutboxItem, OutboxState, Result, utcnow
from tests.reporting import helpers as rh
from tests.worker.conftest import BRAINIX, KNEE, MODEL_NAME, MODEL_VERSION, add_series
from worker.models import ModelRegistry
from worker.pipeline import NO_DESTINATION, process_job, seconds_until_retry

pytestmark = pytest.mark.integration  # PostgreSQL is a real peer

N_SLICES = 6  # a short Brainix sequence keeps the test quick


def _job(sf, job_id) -> Job:
    with sf() as s:
        return s.get(Job, job_id)


def _results(sf, job_id):
    with sf() as s:
        res = s.scalars(select(Result).where(Result.job_fk == job_id)).all()
        items = s.scalars(select(OutboxItem).order_by(OutboxItem.id)).all()
        return res, items


def test_covered_sequence_succeeds_with_sr_sc_and_outbox(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=N_SLICES)
    registry = ModelRegistry.from_settings(settings)

    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED

    job = _job(session_factory, job_id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1 and job.last_error == ""
    assert job.started_at is not None and job.finished_at is not None and job.finished_at >= job.started_at
    assert (job.model_name, job.model_version) == (MODEL_NAME, MODEL_VERSION)
    results, items = _results(session_factory, job_id)
    assert len(results) == 1
    res = results[0]
    assert res.model_name == MODEL_NAME and res.inference_seconds > 0
    assert res.is_anomaly == (res.score > res.threshold)
    assert res.sr_sop_instance_uid and res.sc_sop_instance_uid and res.sr_sop_instance_uid != res.sc_sop_instance_uid
    assert {i.sop_instance_uid for i in items} == {res.sr_sop_instance_uid, res.sc_sop_instance_uid}
    for item in items:
        assert item.result_fk == res.id and item.state is OutboxState.PENDING
        assert item.destination == "ORTHANC@127.0.0.1:4242" and item.last_error == ""
        ds = pydicom.dcmread(settings.outbox_dir / item.path)
        assert ds.SOPInstanceUID == item.sop_instance_uid and ds.SOPClassUID == item.sop_class_uid
    sr = pydicom.dcmread(settings.outbox_dir / next(i.path for i in items if i.sop_instance_uid == res.sr_sop_instance_uid))
    sc = pydicom.dcmread(settings.outbox_dir / next(i.path for i in items if i.sop_instance_uid == res.sc_sop_instance_uid))
    source = pydicom.dcmread(dicom_corpus / BRAINIX / "IM-0001-0001.dcm", stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SamplesPerPixel == 3
    assert not any(p.name.startswith(".tmp-") for p in settings.outbox_dir.iterdir())
    # each frame's own score is kept with the result, the same numbers as the SR's per-frame groups
    assert res.frame_scores is not None and len(res.frame_scores) == N_SLICES
    sr_numbers = _sr_numbers(sr)
    assert all(any(abs(v - n) <= 1e-6 * max(1.0, abs(v)) for n in sr_numbers) for v in res.frame_scores)
    # the overlay shows the frame with the highest own score, and references that frame's instance
    with session_factory() as s:
        refs = s.get(Job, job_id).sequence.frame_refs
    top = max(range(N_SLICES), key=res.frame_scores.__getitem__)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == refs[top][0]


def _sr_numbers(ds) -> list[float]:
    """Every NUM content item's value in an SR, at any depth."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item and item.MeasuredValueSequence:
            out.append(float(item.MeasuredValueSequence[0].NumericValue))
        out += _sr_numbers(item)
    return out


def test_uncovered_sequence_is_not_processed_without_outputs(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, KNEE, body_part="KNEE", limit=3)

    state = process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings))

    assert state is JobState.NOT_PROCESSED
    job = _job(session_factory, job_id)
    assert job.state is JobState.NOT_PROCESSED
    assert job.reason == "no model covers modality MR, body part KNEE"
    assert job.finished_at is not None
    results, items = _results(session_factory, job_id)
    assert results == [] and items == []
    assert list(settings.outbox_dir.iterdir()) == []


def test_failing_job_is_retried_then_failed_with_last_error(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings(job_max_retries=2, job_retry_backoff_s=0.0)  # back-off: the test below
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    victim = sorted((settings.spool_dir).rglob("*.dcm"))[1]
    victim_uid = victim.stem
    victim.write_bytes(victim.read_bytes()[:400])  # a real failure: the spool file is truncated
    registry = ModelRegistry.from_settings(settings)

    states = [process_job(settings, session_factory, job_id, registry) for _ in range(3)]

    assert states == [JobState.RETRYING, JobState.RETRYING, JobState.FAILED]
    job = _job(session_factory, job_id)
    assert job.state is JobState.FAILED and job.attempts == 3 and job.finished_at is not None
    assert victim_uid in job.last_error and "FrameLoadError" in job.last_error
    # a FAILED job is kept, and a late duplicate delivery changes nothing
    assert process_job(settings, session_factory, job_id, registry) is JobState.FAILED
    assert _job(session_factory, job_id).attempts == 3
    results, items = _results(session_factory, job_id)
    assert results == [] and items == []


def test_a_gpu_configured_where_there_is_none_fails_the_job_with_the_reason(worker_settings, session_factory,
                                                                           dicom_corpus, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = worker_settings(device="cuda", job_max_retries=0)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2)
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings)) is JobState.FAILED
    job = _job(session_factory, job_id)
    assert "sees no CUDA GPU" in job.last_error and _results(session_factory, job_id) == ([], [])


def test_rerun_is_idempotent_and_replaces_results(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=4)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED
    first, first_items = _results(session_factory, job_id)

    # a duplicate delivery of a finished job is a no-op
    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED
    assert _job(session_factory, job_id).attempts == 1

    # an admin re-run: same UIDs, the earlier Result and outbox rows are replaced, not duplicated
    with session_factory() as s:
        s.get(Job, job_id).state = JobState.QUEUED
        s.commit()
    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED
    second, second_items = _results(session_factory, job_id)
    assert len(second) == 1 and second[0].created_at >= first[0].created_at
    assert (second[0].sr_sop_instance_uid, second[0].sc_sop_instance_uid) == (
        first[0].sr_sop_instance_uid, first[0].sc_sop_instance_uid)
    assert second[0].score == pytest.approx(first[0].score, rel=1e-5)
    assert sorted(i.sop_instance_uid for i in second_items) == sorted(i.sop_instance_uid for i in first_items)
    assert all(i.result_fk == second[0].id for i in second_items)
    assert len([p for p in settings.outbox_dir.iterdir()]) == 2


def _as_made_before_input_key(settings, session_factory, job_id: int) -> tuple[str, str]:
    """Turn a job's result into one the release before migration 0008 made: its SR's and SC's SOP Instance
    UIDs derived from the series, model and version alone (no input_key), in files of those names."""
    from reporting.uids import SC_INSTANCE, SR_INSTANCE, derive_uid

    with session_factory() as s:
        result = s.scalars(select(Result).where(Result.job_fk == job_id)).one()
        series_uid = s.get(Job, job_id).sequence.series.series_uid
        old = {result.sr_sop_instance_uid: derive_uid(series_uid, result.model_name, result.model_version, SR_INSTANCE),
               result.sc_sop_instance_uid: derive_uid(series_uid, result.model_name, result.model_version, SC_INSTANCE)}
        for item in s.scalars(select(OutboxItem).where(OutboxItem.result_fk == result.id)):
            ds = pydicom.dcmread(settings.outbox_dir / item.path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = old[item.sop_instance_uid]
            (settings.outbox_dir / item.path).unlink()
            item.sop_instance_uid, item.path = old[item.sop_instance_uid], f"{old[item.sop_instance_uid]}.dcm"
            ds.save_as(settings.outbox_dir / item.path)
            item.state, item.sent_at = OutboxState.SENT, utcnow()
        result.sr_sop_instance_uid, result.sc_sop_instance_uid = (old[result.sr_sop_instance_uid],
                                                                  old[result.sc_sop_instance_uid])
        s.get(Job, job_id).state = JobState.QUEUED  # medgru jobs retry --rerun
        s.commit()
        return result.sr_sop_instance_uid, result.sc_sop_instance_uid


def test_a_rerun_of_a_result_made_before_the_upgrade_revises_it(worker_settings, session_factory, dicom_corpus):
    """After the upgrade that added input_key to the UIDs, `medgru jobs retry --rerun` of an older job (same
    frames, model and version) makes an SR and SC with other UIDs. The PACS then held two reports of the same
    frames side by side: the new SR did not name the old one (the job's own result was left out of the
    predecessors), no rejection note listed it, and the old objects' outbox files stayed behind with no row
    (retention never removed them). Found upgrading a live 9230aa7 service."""
    settings = worker_settings(reject_revised_results=True)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED
    old_sr, old_sc = _as_made_before_input_key(settings, session_factory, job_id)

    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED
    (new,), items = _results(session_factory, job_id)
    assert new.sr_sop_instance_uid != old_sr and new.sc_sop_instance_uid != old_sc
    by_uid = {i.sop_instance_uid: pydicom.dcmread(settings.outbox_dir / i.path) for i in items}
    sr = by_uid[new.sr_sop_instance_uid]
    assert [str(i.ReferencedSOPInstanceUID) for i in sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
            .ReferencedSOPSequence] == [old_sr]
    (note,) = [ds for ds in by_uid.values() if ds.SOPClassUID == KeyObjectSelectionDocumentStorage]
    assert {str(i.ReferencedSOPInstanceUID) for s in note.CurrentRequestedProcedureEvidenceSequence
            for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence} == {old_sr, old_sc}
    # no file is left in the outbox without an outbox row
    assert sorted(p.name for p in settings.outbox_dir.iterdir()) == sorted(i.path for i in items)


def _late_slice_job(settings, session_factory, corpus, job_id: int) -> int:
    """What the assembler does when a late slice completes a series it had already queued: the slice is
    stored, and a new sequence of the series (one frame more) gets a new job."""
    import shutil
    from pathlib import Path

    from storage.models import SequenceRecord

    with session_factory() as s:
        seq = s.get(Job, job_id).sequence
        series, refs = seq.series, list(seq.frame_refs)
        files = sorted(p for p in (corpus / BRAINIX).iterdir() if p.is_file())
        headers = sorted(((pydicom.dcmread(p, stop_before_pixels=True), p) for p in files),
                         key=lambda hp: int(hp[0].InstanceNumber))
        ds, path = headers[len(refs)]
        uid = str(ds.SOPInstanceUID)
        rel = Path(series.series_uid) / f"{uid}.dcm"
        shutil.copyfile(path, settings.spool_dir / rel)
        s.add(Instance(sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID), series=series,
                       transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), instance_number=int(ds.InstanceNumber),
                       number_of_frames=1, has_pixels=True, path=str(rel), size_bytes=(settings.spool_dir / rel).stat().st_size))
        late = SequenceRecord(series=series, frame_refs=refs + [[uid, 1]], n_frames=len(refs) + 1,
                              order_key="instance_number")
        job = Job(sequence=late, state=JobState.QUEUED)
        s.add_all([late, job])
        s.commit()
        return job.id


def test_a_result_from_other_frames_is_a_new_instance_beside_the_old_one(worker_settings, session_factory,
                                                                          dicom_corpus):
    """A late slice re-scores the series: the new SR and SC hold other content, so they are new instances.
    They reused the first result's UIDs: the PACS kept the first (Orthanc's default), while the outbox said
    the new one was stored, and the first job lost its outbox rows to the second (a review helper's case)."""
    settings = worker_settings()
    first_job = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, first_job, registry) is JobState.SUCCEEDED
    late_job = _late_slice_job(settings, session_factory, dicom_corpus, first_job)
    assert process_job(settings, session_factory, late_job, registry) is JobState.SUCCEEDED
    (first,), _ = _results(session_factory, first_job)
    (late,), items = _results(session_factory, late_job)
    assert first.sr_sop_instance_uid != late.sr_sop_instance_uid
    assert first.sc_sop_instance_uid != late.sc_sop_instance_uid
    assert sorted((i.result_fk, i.sop_instance_uid) for i in items) == sorted(
        [(first.id, first.sr_sop_instance_uid), (first.id, first.sc_sop_instance_uid),
         (late.id, late.sr_sop_instance_uid), (late.id, late.sc_sop_instance_uid)])
    srs = {i.sop_instance_uid: pydicom.dcmread(settings.outbox_dir / i.path) for i in items
           if i.sop_instance_uid in (first.sr_sop_instance_uid, late.sr_sop_instance_uid)}
    assert srs[first.sr_sop_instance_uid].SeriesInstanceUID == srs[late.sr_sop_instance_uid].SeriesInstanceUID
    # the new report names the one it revises, so a viewer showing both tells which is current
    assert "PredecessorDocumentsSequence" not in srs[first.sr_sop_instance_uid]
    (study,) = srs[late.sr_sop_instance_uid].PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert study.StudyInstanceUID == srs[first.sr_sop_instance_uid].StudyInstanceUID
    assert series.SeriesInstanceUID == srs[first.sr_sop_instance_uid].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == [first.sr_sop_instance_uid]
    with session_factory() as s:  # a re-run of the late job keeps its UID and names the first report only
        s.get(Job, late_job).state = JobState.QUEUED
        s.commit()
    assert process_job(settings, session_factory, late_job, registry) is JobState.SUCCEEDED
    (rerun,), items = _results(session_factory, late_job)
    assert rerun.sr_sop_instance_uid == late.sr_sop_instance_uid
    sr = pydicom.dcmread(settings.outbox_dir / next(i.path for i in items
                                                    if i.sop_instance_uid == rerun.sr_sop_instance_uid))
    assert [i.ReferencedSOPInstanceUID for i in sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
            .ReferencedSOPSequence] == [first.sr_sop_instance_uid]


@pytest.mark.parametrize("reject", [True, False])
def test_a_revision_sends_a_rejection_note_of_the_results_it_replaces(worker_settings, session_factory, dicom_corpus,
                                                                      reject, tmp_path):
    """With reject_revised_results on, the late slice's job also queues an IOCM rejection note listing the
    first job's SR and SC (a PACS with IOCM then hides them); a re-run of the same frames sends the same
    note and never rejects its own objects. Off (the default), no note is made."""
    settings = worker_settings(reject_revised_results=reject)
    first_job = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, first_job, registry) is JobState.SUCCEEDED
    (first,), items = _results(session_factory, first_job)
    assert {i.sop_class_uid for i in items} == {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}
    late_job = _late_slice_job(settings, session_factory, dicom_corpus, first_job)
    for _ in range(2):  # the late job, then a re-run of it
        assert process_job(settings, session_factory, late_job, registry) is JobState.SUCCEEDED
        (late,), items = _results(session_factory, late_job)
        notes = [i for i in items if i.sop_class_uid == KeyObjectSelectionDocumentStorage]
        if not reject:
            assert notes == []
            break
        (note_item,) = notes
        assert note_item.result_fk == late.id and note_item.destination == str(settings.destination)
        note = pydicom.dcmread(settings.outbox_dir / note_item.path)
        assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
        rejected = {str(i.ReferencedSOPInstanceUID) for s in note.CurrentRequestedProcedureEvidenceSequence
                    for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        assert rejected == {first.sr_sop_instance_uid, first.sc_sop_instance_uid}
        assert note.StudyInstanceUID == pydicom.dcmread(settings.outbox_dir / items[0].path).StudyInstanceUID
        errors, warnings = rh.dciodvfy(settings.outbox_dir / note_item.path)
        assert errors == [] and warnings == [], "\n".join(errors + warnings)
        with session_factory() as s:
            s.get(Job, late_job).state = JobState.QUEUED
            s.commit()


def test_cancelled_job_is_left_alone(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2)
    with session_factory() as s:
        s.get(Job, job_id).state = JobState.CANCELLED
        s.commit()
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings)) is JobState.CANCELLED
    job = _job(session_factory, job_id)
    assert job.attempts == 0 and job.started_at is None
    assert list(settings.outbox_dir.iterdir()) == []


def test_without_destination_items_wait_in_outbox(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings(destination=None)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2)
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings)) is JobState.SUCCEEDED
    _, items = _results(session_factory, job_id)
    assert len(items) == 2
    assert all(i.destination == "" and i.state is OutboxState.PENDING and i.last_error == NO_DESTINATION
               for i in items)
    assert all((settings.outbox_dir / i.path).is_file() for i in items)


def test_retrying_job_is_not_run_before_its_back_off_ends(worker_settings, session_factory, dicom_corpus):
    """A message that delivers a RETRYING job early (a duplicate, the start-up re-enqueue) does not run it."""
    settings = worker_settings(job_max_retries=3, job_retry_backoff_s=30.0)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    victim = sorted((settings.spool_dir).rglob("*.dcm"))[1]
    good = victim.read_bytes()
    victim.write_bytes(good[:400])
    registry = ModelRegistry.from_settings(settings)

    before = utcnow()
    assert process_job(settings, session_factory, job_id, registry) is JobState.RETRYING
    job = _job(session_factory, job_id)
    assert job.attempts == 1
    assert before + timedelta(seconds=30) <= job.retry_at <= utcnow() + timedelta(seconds=30)
    assert seconds_until_retry(job) > 25

    # an early delivery: not claimed, attempts and back-off unchanged
    assert process_job(settings, session_factory, job_id, registry) is JobState.RETRYING
    early = _job(session_factory, job_id)
    assert early.attempts == 1 and early.retry_at == job.retry_at and early.state is JobState.RETRYING

    # once the back-off has passed, the next delivery runs it (the file was repaired meanwhile)
    victim.write_bytes(good)
    with session_factory() as s:
        s.get(Job, job_id).retry_at = utcnow() - timedelta(seconds=1)
        s.commit()
    assert process_job(settings, session_factory, job_id, registry) is JobState.SUCCEEDED
    done = _job(session_factory, job_id)
    assert done.attempts == 2 and done.retry_at is None


def test_second_failure_doubles_the_back_off(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings(job_max_retries=3, job_retry_backoff_s=10.0)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2)
    victim = sorted((settings.spool_dir).rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:400])
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, job_id, registry) is JobState.RETRYING
    with session_factory() as s:
        s.get(Job, job_id).retry_at = utcnow() - timedelta(seconds=1)
        s.commit()
    t0 = utcnow()
    assert process_job(settings, session_factory, job_id, registry) is JobState.RETRYING
    job = _job(session_factory, job_id)
    assert job.attempts == 2
    assert t0 + timedelta(seconds=20) <= job.retry_at <= utcnow() + timedelta(seconds=20)


def test_overlay_explains_the_highest_scoring_frame_alone(dicom_corpus):
    """With the bundled MedGRU-SVC brain model on the Brainix FLAIR series: the series' score is its highest
    slice scored alone, and its heat map is that slice's Grad-CAM (the other slices blank); the overlay
    shows that slice, with a heat map of that slice scored alone, whose score is the slice's frame score."""
    import numpy as np

    from inference.api import FrameSequence, load_model
    from medgru.settings import BUNDLED_MODELS_DIR
    from worker.pipeline import overlay_frame
    from worker.pixels import load_frames

    files = sorted((dicom_corpus / BRAINIX).glob("*.dcm"),
                   key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    refs = [(f, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), 1) for f in files]
    frames, bits = load_frames(refs)
    sequence = FrameSequence(frames=frames, modality="MR", body_part="BRAIN", bits_stored=bits)
    detector = load_model(BUNDLED_MODELS_DIR / "brain-mr")
    detection = detector.detect(sequence, explain=True)
    mean_heat = detection.heatmaps.reshape(sequence.length, -1).mean(axis=1)
    top = int(np.argmax(detection.frame_scores))
    assert detection.score == detection.frame_scores[top] and top != sequence.length - 1
    assert np.flatnonzero(mean_heat).tolist() == [top]  # not the ConvGRU's last slice: the verdict's slice

    overlay = overlay_frame(detector, sequence, detection)
    assert overlay.index == top and overlay.frame_score == detection.frame_scores[top]
    assert overlay.heatmap.shape == sequence.frames.shape[1:] and overlay.heatmap.max() == 1.0
    alone = detector.detect(FrameSequence(frames=frames[top:top + 1], modality="MR", body_part="BRAIN",
                                          bits_stored=bits), explain=True)
    assert abs(alone.score - overlay.frame_score) <= 1e-4 * abs(overlay.frame_score)
    assert np.allclose(alone.heatmaps[0], overlay.heatmap, atol=1e-5)
    assert np.allclose(detection.heatmaps[top], overlay.heatmap, atol=1e-5)


def test_a_series_longer_than_the_calibration_covers_is_judged_at_the_largest_score_and_logged(dicom_corpus, caplog):
    """The bundled brain model's 118 calibration normals cover a series of up to 5 frames at 5 %: the
    22-slice Brainix series is compared with their largest score, and the worker warns with the bound
    22 / 119 and how many normal frames would restore the target; 2 of its slices are covered."""
    import logging

    import numpy as np

    from inference.api import FrameSequence, load_model
    from medgru.settings import BUNDLED_MODELS_DIR
    from worker.pipeline import warn_uncovered_series
    from worker.pixels import load_frames

    files = sorted((dicom_corpus / BRAINIX).glob("*.dcm"),
                   key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    frames, bits = load_frames([(f, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), 1)
                                for f in files])
    detector = load_model(BUNDLED_MODELS_DIR / "brain-mr")
    cal = detector.calibration_scores
    assert cal is not None and cal.size == 118 and detector.calibration_alpha == 0.05
    whole = detector.detect(FrameSequence(frames=frames, modality="MR", body_part="BRAIN", bits_stored=bits),
                            explain=False)
    assert len(whole.frame_scores) == 22 and whole.score == max(whole.frame_scores)
    assert whole.threshold == cal[-1] > detector.threshold
    assert whole.extras["series_fpr_bound"] == pytest.approx(22 / 119)
    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        assert warn_uncovered_series(7, "1.2.3", detector, whole, 22)
    assert "bounded by 0.185, not 0.05" in caplog.text and "at least 439 normal frames" in caplog.text
    part = detector.detect(FrameSequence(frames=np.ascontiguousarray(frames[8:10]), modality="MR",
                                         body_part="BRAIN", bits_stored=bits), explain=False)
    assert part.threshold == detector.series_threshold(2) == cal[-2]  # rank ceil(119 * 0.975) = 117
    assert part.extras["series_fpr_bound"] == pytest.approx(2 * 2 / 119)
    assert not warn_uncovered_series(8, "1.2.3", detector, part, 2)

    caplog.clear()
    detector.set_threshold(detector.threshold)  # as a folder from before the scores were kept: none
    bare = detector.detect(FrameSequence(frames=np.ascontiguousarray(frames[8:10]), modality="MR",
                                         body_part="BRAIN", bits_stored=bits), explain=False)
    assert bare.threshold == detector.threshold and "series_fpr_bound" not in bare.extras
    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        assert warn_uncovered_series(9, "1.2.3", detector, bare, 2)
        assert not warn_uncovered_series(9, "1.2.3", detector, bare, 1)
    assert "keeps no calibration scores" in caplog.text and caplog.text.count("job 9") == 1


def test_a_bound_just_above_the_target_is_not_shown_as_the_target(caplog):
    """6 slices with the bundled brain model's 118 calibration normals: the bound is 6 / 119 = 0.0504,
    just above the 0.05 target. Both were shown to 3 decimals, so the job's note and the log said "the
    false-positive rate is bounded by 0.050, not 0.050" (seen live on a 6-slice MR series)."""
    import logging
    from types import SimpleNamespace

    from worker.pipeline import warn_uncovered_series

    detector = SimpleNamespace(card=SimpleNamespace(name="brain"), calibration_alpha=0.05)
    detection = SimpleNamespace(extras={"series_fpr_bound": 6 / 119})
    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        note = warn_uncovered_series(3, "1.2.3", detector, detection, 6)
    assert "bounded by 0.0504, not 0.05;" in note


def test_a_series_beyond_the_calibration_says_so_in_the_jobs_note(worker_settings, session_factory, dicom_corpus):
    """Brainix's 22 slices with the bundled brain model: the verdict's false-positive bound is 0.185, not
    0.05. That was in the worker's log only; an admin reads it in the job's note (the dashboard's list and
    job page, ``medgru jobs``). A series the calibration covers has no note."""
    from medgru.settings import BUNDLED_MODELS_DIR
    from worker.admin import job_fields, job_rows

    settings = worker_settings(model=[BUNDLED_MODELS_DIR / "brain-mr"])
    whole = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN")
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, whole, registry) is JobState.SUCCEEDED
    with session_factory() as s:
        (row,) = [r for r in job_rows(s) if r["id"] == whole]
        fields = dict(job_fields(s, whole))
    assert "22 frames judged" in row["note"] and "bounded by 0.185, not 0.05" in row["note"]
    assert "at least 439 normal frames" in fields["reason"]
    with session_factory() as s:  # the same series cut to 2 slices: covered, no note
        job = s.get(Job, whole)
        job.sequence.frame_refs = job.sequence.frame_refs[:2]
        job.sequence.n_frames = 2
        job.state = JobState.QUEUED
        s.commit()
    assert process_job(settings, session_factory, whole, registry) is JobState.SUCCEEDED
    assert _job(session_factory, whole).reason == ""


def test_results_go_back_where_the_series_came_from(worker_settings, session_factory, dicom_corpus):
    """settings.routes by calling AE: a routed sender's results go to its route, anyone else's to the
    default destination; without a default, an unrouted series' results wait in the outbox."""
    settings = worker_settings(routes="SITE_A=PACS_A@10.0.0.1:104,SITE_B=PACS_B@10.0.0.2:11112")
    routed = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2,
                        calling_ae="SITE_B")
    assert process_job(settings, session_factory, routed, ModelRegistry.from_settings(settings)) is JobState.SUCCEEDED
    _, items = _results(session_factory, routed)
    assert [i.destination for i in items] == ["PACS_B@10.0.0.2:11112"] * 2

    other = worker_settings(routes="SITE_A=PACS_A@10.0.0.1:104")
    with session_factory() as s:  # the same series re-run, now from an AE without a route: the default
        s.execute(update(Instance).values(calling_ae="SITE_C"))
        s.get(Job, routed).state = JobState.QUEUED
        s.commit()
    assert process_job(other, session_factory, routed, ModelRegistry.from_settings(other)) is JobState.SUCCEEDED
    _, items = _results(session_factory, routed)
    assert [i.destination for i in items] == ["ORTHANC@127.0.0.1:4242"] * 2


PATIENT_WITH_2_STUDIES = "orthanc-tests/PatientWith2studies"


def _prior_led_sequence(dicom_corpus):
    """A sequence as the assembler builds it with ``settings.add_prior_study``: the prior study's frame
    first, then the current study's (one CT each, same patient), with a detection whose heat map peaks on
    the prior frame and whose frame scores rank the prior frame highest."""
    import numpy as np

    from inference.api import FrameSequence
    from tests.reporting import helpers as rh

    folder = dicom_corpus / PATIENT_WITH_2_STUDIES
    prior = pydicom.dcmread(folder / "TEST_1_study_1234.dcm", stop_before_pixels=True)
    current = pydicom.dcmread(folder / "TEST_1_study_2345.dcm", stop_before_pixels=True)
    assert prior.PatientID == current.PatientID and prior.StudyInstanceUID != current.StudyInstanceUID
    assert prior.AccessionNumber != current.AccessionNumber
    shape = (64, 64)
    sequence = FrameSequence(frames=np.full((2, *shape), 0.5, np.float32), modality="CT",
                             frame_refs=((str(prior.SOPInstanceUID), 1), (str(current.SOPInstanceUID), 1)))
    heat = np.stack([rh.blob(shape), rh.blob(shape) * 0.2])
    detection = rh.detection(heat, frame_scores=(0.95, 0.30))
    return prior, current, sequence, detection


def _assert_in_current_study(sc, sr, current) -> None:
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == current.StudyInstanceUID
    for keyword in ("AccessionNumber", "StudyDate", "StudyID", "PatientID"):
        assert sc.get(keyword) == sr.get(keyword) == current.get(keyword), keyword
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == current.SOPInstanceUID
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == current.SeriesInstanceUID


def test_a_job_led_by_a_prior_series_judges_the_current_series_frames(worker_settings, session_factory,
                                                                      dicom_corpus, caplog):
    """End to end, a sequence whose first instance belongs to another series (as a prior study's frames
    lead it with ``settings.add_prior_study``): the job succeeds, the verdict is the highest of the
    current series' frames, the SR labels the prior's frame as not judged, and ``medgru jobs show``
    does not count it. Before, the overlay's one-frame copy kept ``context_frames`` and every such job
    failed with a ValueError."""
    import logging

    from storage.models import SequenceRecord, Series, SeriesState
    from worker.admin import job_fields

    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=4)
    with session_factory() as s:
        seq = s.scalars(select(SequenceRecord)).one()
        prior = Series(series_uid="1.2.826.0.1.3680043.8.498.11", study=seq.series.study, modality="MR",
                       body_part="BRAIN", state=SeriesState.ASSEMBLED)
        s.add(prior)
        s.flush()
        s.execute(update(Instance).where(Instance.sop_instance_uid == seq.frame_refs[0][0])
                  .values(series_fk=prior.id))
        seq.prior_study_uid = "1.2.826.0.1.3680043.8.498.12"
        s.commit()
    with caplog.at_level(logging.INFO, logger="worker.pipeline"):
        assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings)) is JobState.SUCCEEDED
    (res,), items = _results(session_factory, job_id)
    assert len(res.frame_scores) == 4 and res.score == max(res.frame_scores[1:])
    assert "highest of 3 frames scored alone" in caplog.text
    sr = pydicom.dcmread(settings.outbox_dir / next(i.path for i in items if i.sop_class_uid.endswith(".88.34")))
    texts = [str(c.TextValue) for g in sr.ContentSequence[-1].ContentSequence for c in g.ContentSequence
             if c.ValueType == "TEXT"]
    assert sum("prior study, scored alone, not judged" in t for t in texts) == 1
    assert sum("Frame " in t for t in texts) == 4
    with session_factory() as s:
        shown = dict(job_fields(s, job_id))["frame scores"]
    assert "1: " in shown and " (prior)" in shown and "of 3 judged frames above the threshold" in shown


def test_overlay_sc_of_a_prior_led_sequence_lands_in_the_current_study(dicom_corpus, tmp_path):
    """The SC shows a frame of the current study, whatever the prior study's frames score: it lands in the
    current study with the SR. Before, the SC showed the prior's frame and took the prior's Study Instance
    UID and accession number, while its own UIDs derive from the current series: one SC UID in two
    studies across re-runs. A prior frame passed explicitly is refused."""
    from types import SimpleNamespace

    from tests.reporting import helpers as rh
    from worker.pipeline import OverlayFrame, build_result_objects

    prior, current, sequence, detection = _prior_led_sequence(dicom_corpus)
    settings = SimpleNamespace(ae_title="MEDGRU")
    objects = dict(build_result_objects([prior, current], sequence, detection, rh.card(), settings))
    _assert_in_current_study(objects["sc"], objects["sr"], current)
    path = tmp_path / "sc.dcm"
    objects["sc"].save_as(path, enforce_file_format=True)
    errors, _ = rh.dciodvfy(path)
    assert errors == [], "\n".join(errors)

    with pytest.raises(ValueError, match="prior study"):
        build_result_objects([prior, current], sequence, detection, rh.card(), settings,
                             OverlayFrame(0, detection.heatmaps[0], 0.95))


def test_overlay_frame_is_chosen_among_the_current_study_frames(dicom_corpus, monkeypatch):
    """The worker's choice (``_run``): the frame with the highest own score among the current study's
    frames, explained alone; the caption says the score is the highest of that study's frames, not of the
    whole sequence (a prior frame scored higher)."""
    from types import SimpleNamespace

    import reporting.sc
    from tests.reporting import helpers as rh
    from worker.pipeline import OverlayFrame, build_result_objects, current_study_frames, overlay_frame

    prior, current, sequence, detection = _prior_led_sequence(dicom_corpus)
    assert current_study_frames([prior, current], sequence) == (1,)

    explained = []

    class FrameAlone:
        """Scores the one frame it is given, as MedGRU-SVC's detect of a frame alone does."""

        def detect(self, frames, explain=False):
            explained.append(frames.frame_refs)
            return rh.detection(detection.heatmaps[1:2], score=0.30)

    overlay = overlay_frame(FrameAlone(), sequence, detection, current_study_frames([prior, current], sequence))
    assert (overlay.index, overlay.frame_score, overlay.among) == (1, 0.30, 1)
    assert explained == [((str(current.SOPInstanceUID), 1),)]
    assert OverlayFrame.at_peak(detection, (1,)).index == 1

    captions = []
    real_caption_lines = reporting.sc.caption_lines

    def caption_lines(*args, **kwargs):
        captions.append(real_caption_lines(*args, **kwargs))
        return captions[-1]

    monkeypatch.setattr(reporting.sc, "caption_lines", caption_lines)
    objects = dict(build_result_objects([prior, current], sequence, detection, rh.card(),
                                        SimpleNamespace(ae_title="MEDGRU"), overlay))
    _assert_in_current_study(objects["sc"], objects["sr"], current)
    assert captions[0][1][0].endswith("frame 2 of 2")
    assert captions[0][3][0] == "this frame alone: score 0.3 (the highest of 1 frame of this study)"


def test_a_running_job_is_stamped_by_its_worker_while_it_runs(worker_settings, session_factory, dicom_corpus,
                                                              monkeypatch):
    """The claim stamps heartbeat_at, and the worker stamps it again while the job runs, so the service's
    sweeper does not take a long job of a live worker for an orphan; a stamp stops once the job is no longer
    this task's claim (queued again as orphaned, cancelled)."""
    import threading

    import worker.pipeline as pipeline

    settings = worker_settings(job_heartbeat_s=0.01, job_stale_after_s=0.03)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    stamps: list = []
    beaten = threading.Event()
    real_run = pipeline._run

    def slow_run(*args, **kwargs):  # the job runs until its worker has stamped it twice after the claim
        with session_factory() as s:
            stamps.append(s.get(Job, job_id).heartbeat_at)
        while len(stamps) < 3:
            beaten.wait()
            beaten.clear()
        return real_run(*args, **kwargs)

    real_beat = pipeline.JobHeartbeat.beat

    def recording_beat(self):
        ours = real_beat(self)
        with session_factory() as s:
            stamps.append(s.get(Job, job_id).heartbeat_at)
        beaten.set()
        return ours

    monkeypatch.setattr(pipeline, "_run", slow_run)
    monkeypatch.setattr(pipeline.JobHeartbeat, "beat", recording_beat)
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings),
                       task_id="t-1") is JobState.SUCCEEDED
    assert stamps[0] is not None and stamps[0] < stamps[1] < stamps[2]  # the claim's, then the beats'

    with session_factory() as s:  # queued again as orphaned meanwhile: the old claim's beat stamps nothing
        job = s.get(Job, job_id)
        job.state, job.celery_task_id = JobState.QUEUED, ""
        s.commit()
    assert real_beat(pipeline.JobHeartbeat(session_factory, job_id, "t-1", 30.0)) is False


def test_a_run_whose_job_was_queued_again_and_claimed_by_another_worker_records_nothing(
        worker_settings, session_factory, dicom_corpus, monkeypatch):
    """The service's sweeper queues again a RUNNING job whose worker was silent for job_stale_after_s (a
    database outage longer than that, a frozen process), and another worker claims it. The first run, if
    it was alive after all, must not write its outcome over the second's claim: it checked only that the
    job was RUNNING, so it recorded SUCCEEDED under the other worker's running attempt."""
    import worker.pipeline as pipeline

    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    real_run = pipeline._run

    def taken_over_meanwhile(*args, **kwargs):
        with session_factory() as s:  # what StalledJobSweeper.reclaim_orphans does, then another delivery
            job = s.get(Job, job_id)
            job.state, job.celery_task_id = JobState.QUEUED, ""
            s.commit()
        assert pipeline.claim_job(session_factory, job_id, task_id="t-2") == (True, JobState.RUNNING)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run", taken_over_meanwhile)
    assert process_job(settings, session_factory, job_id, ModelRegistry.from_settings(settings),
                       task_id="t-1") is JobState.RUNNING
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.celery_task_id, job.attempts) == (JobState.RUNNING, "t-2", 2)
        assert s.scalars(select(Result)).all() == [] and s.scalars(select(OutboxItem)).all() == []

    # a failure of the first run is not recorded over the second's claim either
    assert pipeline.record_failure(settings, session_factory, job_id, RuntimeError("x"), claim="t-1") is JobState.RUNNING
    with session_factory() as s:
        assert s.get(Job, job_id).last_error == ""


def test_a_run_whose_job_was_queued_again_and_finished_by_another_worker_records_nothing(
        worker_settings, session_factory, dicom_corpus, monkeypatch):
    """The orphaned run may resume only after the second delivery has already finished the job: it found
    the job SUCCEEDED (not RUNNING), took that for its own outcome and committed its Result over the
    second's, deleting the second's outbox rows (already SENT) and queueing its objects again."""
    import worker.pipeline as pipeline

    settings = worker_settings()
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    registry = ModelRegistry.from_settings(settings)
    real_run = pipeline._run
    second: dict = {}

    def taken_over_and_finished_meanwhile(*args, **kwargs):
        monkeypatch.setattr(pipeline, "_run", real_run)
        with session_factory() as s:  # what StalledJobSweeper.reclaim_orphans does
            job = s.get(Job, job_id)
            job.state, job.celery_task_id = JobState.QUEUED, ""
            s.commit()
        assert process_job(settings, session_factory, job_id, registry, task_id="t-2") is JobState.SUCCEEDED
        with session_factory() as s:
            (res,) = s.scalars(select(Result)).all()
            second["result"] = res.id
            s.execute(update(OutboxItem).values(state=OutboxState.SENT))
            s.commit()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run", taken_over_and_finished_meanwhile)
    process_job(settings, session_factory, job_id, registry, task_id="t-1")
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.celery_task_id) == (JobState.SUCCEEDED, "t-2")
        assert [r.id for r in s.scalars(select(Result)).all()] == [second["result"]]
        items = s.scalars(select(OutboxItem)).all()
        assert items and {i.state for i in items} == {OutboxState.SENT}
        assert all((settings.outbox_dir / i.path).is_file() for i in items)



def test_a_rerun_of_an_older_job_does_not_reject_the_newer_result(worker_settings, session_factory, dicom_corpus):
    """`medgru jobs retry --rerun` of the first job of a series after its late-slice revision: the re-run
    made a note rejecting the revision's SR and SC (the current verdict, on more frames), while the
    revision's note had already rejected the re-run's own UIDs, so the PACS hid both results."""
    from worker.admin import retry_job

    settings = worker_settings(reject_revised_results=True)
    first_job = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, first_job, registry) is JobState.SUCCEEDED
    late_job = _late_slice_job(settings, session_factory, dicom_corpus, first_job)
    assert process_job(settings, session_factory, late_job, registry) is JobState.SUCCEEDED
    (late,), _ = _results(session_factory, late_job)

    class _App:  # retry_job enqueues; nothing consumes here
        def send_task(self, *a, **k):
            return type("R", (), {"id": "x"})()

    retry_job(session_factory, _App(), first_job, rerun_succeeded=True)
    assert process_job(settings, session_factory, first_job, registry) is JobState.SUCCEEDED
    (rerun,), items = _results(session_factory, first_job)
    rejected = set()
    for item in items:
        if item.result_fk == rerun.id and item.sop_class_uid == KeyObjectSelectionDocumentStorage:
            note = pydicom.dcmread(settings.outbox_dir / item.path)
            rejected |= {str(i.ReferencedSOPInstanceUID) for s in note.CurrentRequestedProcedureEvidenceSequence
                         for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert not rejected & {late.sr_sop_instance_uid, late.sc_sop_instance_uid}


def _rejected_and_predecessors(settings, items, result) -> tuple[set[str], set[str]]:
    """The UIDs the result's rejection note lists and those its SR names as predecessors."""
    rejected, predecessors = set(), set()
    for item in items:
        if item.result_fk != result.id:
            continue
        ds = pydicom.dcmread(settings.outbox_dir / item.path)
        if item.sop_class_uid == KeyObjectSelectionDocumentStorage:
            rejected |= {str(i.ReferencedSOPInstanceUID) for s in ds.CurrentRequestedProcedureEvidenceSequence
                         for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        if item.sop_instance_uid == result.sr_sop_instance_uid:
            predecessors |= {str(i.ReferencedSOPInstanceUID) for s in ds.get("PredecessorDocumentsSequence", [])
                             for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    return rejected, predecessors


def test_a_rerun_of_an_older_job_made_before_the_upgrade_spares_the_newer_result(worker_settings, session_factory,
                                                                                 dicom_corpus):
    """Before migration 0008 a late slice's result had the same SR and SC UIDs as the series' first result
    (the UIDs did not carry the frames), and the late job took the objects' outbox rows. After the upgrade,
    `medgru jobs retry --rerun` of the first job counted its own old result among the ones it revises: its
    SR named, and its rejection note rejected, the very objects that were the late job's current result."""
    settings = worker_settings(reject_revised_results=True)
    first_job = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, first_job, registry) is JobState.SUCCEEDED
    old_sr, old_sc = _as_made_before_input_key(settings, session_factory, first_job)
    late_job = _late_slice_job(settings, session_factory, dicom_corpus, first_job)
    assert process_job(settings, session_factory, late_job, registry) is JobState.SUCCEEDED
    with session_factory() as s:  # as the old release left it: the late job's result holds the same objects
        for item in s.scalars(select(OutboxItem)):
            if item.sop_instance_uid in (old_sr, old_sc) or item.sop_class_uid == KeyObjectSelectionDocumentStorage:
                (settings.outbox_dir / item.path).unlink()
                s.delete(item)
        s.commit()
    assert _as_made_before_input_key(settings, session_factory, late_job) == (old_sr, old_sc)
    with session_factory() as s:
        s.get(Job, late_job).state = JobState.SUCCEEDED
        s.get(Job, first_job).state = JobState.QUEUED  # medgru jobs retry --rerun of the first job
        s.commit()

    assert process_job(settings, session_factory, first_job, registry) is JobState.SUCCEEDED
    (rerun,), items = _results(session_factory, first_job)
    assert rerun.sr_sop_instance_uid not in (old_sr, old_sc)
    rejected, predecessors = _rejected_and_predecessors(settings, items, rerun)
    assert not rejected & {old_sr, old_sc}
    assert old_sr not in predecessors
    # the late job's objects stay in the outbox, files and all
    late_items = [i for i in items if i.sop_instance_uid in (old_sr, old_sc)]
    assert len(late_items) == 2 and all((settings.outbox_dir / i.path).is_file() for i in late_items)
