"""Assembly of series into ordered sequences and queued jobs (pure ordering, then on SQLite and PostgreSQL)."""

from __future__ import annotations

import logging

import random
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom import uid as dicom_uid
from sqlalchemy import func, select, update

from pacs_listener.assembly import (
    NON_IMAGE_SOP_CLASSES,
    ORDER_INSTANCE_NUMBER,
    ORDER_NONE,
    ORDER_POSITION,
    ORDER_TIME,
    Assembler,
    order_frames,
    parse_dicom_time,
)
from storage.db import init_db, make_engine, make_session_factory
from storage.models import Instance, Job, JobState, Patient, SequenceRecord, Series, SeriesState, Study
from tests.storage.dbutil import isolated_url

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
MR = str(dicom_uid.MRImageStorage)
CR = str(dicom_uid.ComputedRadiographyImageStorage)
T0 = datetime(2026, 5, 1, 8, 0, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Inst:
    sop_instance_uid: str
    instance_number: int | None = None
    number_of_frames: int = 1
    image_position: list[float] | None = None
    image_orientation: list[float] | None = None
    acquisition_time: str = ""
    content_time: str = ""
    has_pixels: bool = True


def _shuffled(items, seed=7):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


# --- pure ordering --------------------------------------------------------------------------------------


def test_order_by_instance_number():
    insts = [Inst(f"1.2.{k}", instance_number=k, image_position=[0, 0, -k], image_orientation=AXIAL)
             for k in range(1, 11)]
    refs, key = order_frames(_shuffled(insts))
    assert key == ORDER_INSTANCE_NUMBER
    assert refs == [(f"1.2.{k}", 1) for k in range(1, 11)]  # numbers win over (reversed) positions


@pytest.mark.parametrize("numbers", ["missing", "duplicated", "one_missing"])
def test_order_by_position_when_numbers_unusable(numbers):
    zs = [12.5, -30.0, 0.0, 7.25, -2.0, 40.0]
    insts = []
    for k, z in enumerate(zs):
        n = {"missing": None, "duplicated": 1, "one_missing": (None if k == 2 else k + 1)}[numbers]
        insts.append(Inst(f"9.{k}", instance_number=n, image_position=[-100.0, -90.0, z],
                          image_orientation=AXIAL, acquisition_time="101010"))
    refs, key = order_frames(_shuffled(insts))
    assert key == ORDER_POSITION
    want = [f"9.{k}" for k, _ in sorted(enumerate(zs), key=lambda kz: kz[1])]
    assert [uid for uid, _ in refs] == want


def test_position_is_projected_on_the_slice_normal():
    # sagittal stack: the normal is x; y and z vary too but must not matter
    sag = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    insts = [Inst(f"3.{k}", image_position=[x, 50.0 - 3 * k, 9.0 * k], image_orientation=sag)
             for k, x in enumerate([5.0, -5.0, 0.0, 10.0])]
    refs, key = order_frames(_shuffled(insts))
    assert key == ORDER_POSITION
    normal_x = -1.0  # row (0,1,0) x column (0,0,-1) = (-1,0,0)
    want = sorted(insts, key=lambda i: normal_x * i.image_position[0])
    assert [u for u, _ in refs] == [i.sop_instance_uid for i in want]


def test_position_order_does_not_depend_on_row_order_when_an_orientation_is_flipped():
    """Slices whose normals are antiparallel (the orientation flipped within the series) are one stack; the
    direction comes from the lowest SOP Instance UID's normal, so every row order gives the same order."""
    flipped = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # normal -z
    insts = [Inst(f"4.{k}", image_position=[0.0, 0.0, z], image_orientation=AXIAL if k != 2 else flipped)
             for k, z in enumerate([30.0, 10.0, 20.0, 0.0])]
    first, key = order_frames(insts)
    assert key == ORDER_POSITION
    assert [u for u, _ in first] == ["4.3", "4.1", "4.2", "4.0"]  # "4.0" is axial: feet -> head
    assert order_frames(list(reversed(insts)))[0] == first  # "4.2", the flipped one, first
    for seed in range(5):
        assert order_frames(_shuffled(insts, seed))[0] == first


def test_order_by_time_when_no_positions():
    times = ["101500.25", "101459", "101500.5", "101501"]
    insts = [Inst(f"5.{k}", acquisition_time=t) for k, t in enumerate(times)]
    refs, key = order_frames(_shuffled(insts))
    assert key == ORDER_TIME
    assert [u for u, _ in refs] == ["5.1", "5.0", "5.2", "5.3"]


def test_time_falls_back_to_content_time_and_handles_datetimes():
    insts = [
        Inst("6.a", content_time="20260501235959"),
        Inst("6.b", acquisition_time="20260502000001.5"),
        Inst("6.c", acquisition_time="20260502000001.25"),
    ]
    refs, key = order_frames(_shuffled(insts))
    assert key == ORDER_TIME
    assert [u for u, _ in refs] == ["6.a", "6.c", "6.b"]  # across midnight, by date then time


def test_four_d_series_without_numbers_comes_out_volume_by_volume():
    insts = []
    for vol, t in enumerate(["120000", "120003"]):
        for s, z in enumerate([0.0, 5.0, 10.0]):
            insts.append(Inst(f"7.{vol}.{s}", image_position=[0, 0, z], image_orientation=AXIAL, acquisition_time=t))
    refs, key = order_frames(_shuffled(insts))
    assert key == ORDER_TIME
    assert [u for u, _ in refs] == ["7.0.0", "7.0.1", "7.0.2", "7.1.0", "7.1.1", "7.1.2"]


def test_uid_is_the_last_tie_break_and_order_is_deterministic():
    insts = [Inst(uid, acquisition_time="080000") for uid in ["1.9", "1.10", "1.2"]]
    first, key = order_frames(insts)
    assert key == ORDER_TIME
    assert [u for u, _ in first] == ["1.10", "1.2", "1.9"]  # equal times: UID text order
    for seed in range(5):
        assert order_frames(_shuffled(insts, seed))[0] == first
    none_refs, none_key = order_frames([Inst("2.2"), Inst("2.1")])
    assert none_key == ORDER_NONE and [u for u, _ in none_refs] == ["2.1", "2.2"]


def test_multi_frame_instances_expand_to_their_frames():
    insts = [Inst("8.2", instance_number=2, number_of_frames=2), Inst("8.1", instance_number=1, number_of_frames=3)]
    refs, key = order_frames(insts)
    assert key == ORDER_INSTANCE_NUMBER
    assert refs == [("8.1", 1), ("8.1", 2), ("8.1", 3), ("8.2", 1), ("8.2", 2)]


def test_instances_without_pixels_contribute_nothing():
    insts = [Inst("4.1", instance_number=1), Inst("4.2", instance_number=1, has_pixels=False),
             Inst("4.3", instance_number=2)]
    refs, key = order_frames(insts)
    assert key == ORDER_INSTANCE_NUMBER  # the duplicate number belongs to an object without pixels
    assert refs == [("4.1", 1), ("4.3", 1)]
    assert order_frames([Inst("4.2", has_pixels=False)]) == ([], ORDER_NONE)


def test_one_image_radiograph_is_a_sequence_of_length_one():
    assert order_frames([Inst("1.2.3", instance_number=None)])[0] == [("1.2.3", 1)]
    assert order_frames([Inst("1.2.3", instance_number=1)]) == ([("1.2.3", 1)], ORDER_INSTANCE_NUMBER)


def test_parse_dicom_time():
    assert parse_dicom_time("142856.530000") == (0, 14 * 3600 + 28 * 60 + 56.53)
    assert parse_dicom_time("20180918114815") == (20180918, 11 * 3600 + 48 * 60 + 15)
    assert parse_dicom_time("1148") == (0, 11 * 3600 + 48 * 60)
    assert parse_dicom_time("") is None and parse_dicom_time("noon") is None


# --- real series ----------------------------------------------------------------------------------------


def _from_file(path: Path) -> Inst:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Inst(
        sop_instance_uid=str(ds.SOPInstanceUID),
        instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None,
        number_of_frames=int(ds.get("NumberOfFrames") or 1),
        image_position=[float(v) for v in ds.ImagePositionPatient],
        image_orientation=[float(v) for v in ds.ImageOrientationPatient],
        acquisition_time=str(ds.get("AcquisitionTime", "")),
        content_time=str(ds.get("ContentTime", "")),
        has_pixels=True,  # every file of these series is an MR image with Pixel Data
    )


@pytest.mark.parametrize(
    "folder, n, n_volume",
    [("orthanc-tests/Brainix/Flair", 22, 22), ("dcm_qa_nih/20180918GE/mr_0004", 20, 15)],
)
def test_real_series_order(dicom_corpus, folder, n, n_volume):
    files = sorted((dicom_corpus / folder).glob("*.dcm"))[:n]
    assert len(files) == n
    insts = [_from_file(f) for f in files]
    by_number = [i.sop_instance_uid for i in sorted(insts, key=lambda i: i.instance_number)]
    refs, key = order_frames(_shuffled(insts, seed=11))
    assert key == ORDER_INSTANCE_NUMBER
    assert [u for u, _ in refs] == by_number
    # Position order agrees with the numbering, up to direction, within one volume (mr_0004 is an fMRI
    # run: 15 slices per volume, positions repeat from file 16 on).
    volume = sorted(insts, key=lambda i: i.instance_number)[:n_volume]
    unnumbered = [replace(i, instance_number=None) for i in volume]
    pos_refs, pos_key = order_frames(_shuffled(unnumbered, seed=3))
    assert pos_key == ORDER_POSITION
    numbered = [i.sop_instance_uid for i in volume]
    got = [u for u, _ in pos_refs]
    assert got in (numbered, numbered[::-1])
    if folder.startswith("orthanc"):
        assert got == numbered[::-1]  # Brainix is numbered head → feet; position order is feet → head
    else:
        assert got == numbered  # "i_to_s": numbered feet → head


# --- database -------------------------------------------------------------------------------------------


@pytest.fixture
def db_url(database_url):
    with isolated_url(database_url) as url:
        engine = init_db(url)
        engine.dispose()
        yield url


@pytest.fixture
def session_factory(db_url):
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


class Recorder:
    """An enqueue callback that checks, from its own connection, that the job is committed."""

    def __init__(self, db_url: str):
        self.engine = make_engine(db_url)
        self.sessions = make_session_factory(self.engine)
        self.ids: list[int] = []
        self.seen_committed: list[bool] = []

    def __call__(self, job_id: int) -> None:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            self.seen_committed.append(job is not None and job.state is JobState.QUEUED)
        self.ids.append(job_id)


@pytest.fixture
def recorder(db_url):
    r = Recorder(db_url)
    yield r
    r.engine.dispose()


def add_series(
    s,
    instances: list[dict],
    *,
    uid: str,
    modality: str = "MR",
    body_part: str = "HEAD",
    description: str = "",
    study_uid: str | None = None,
    study_date: str = "20260501",
    patient_id: str = "P1",
    last: datetime = T0,
) -> Series:
    patient = s.scalar(select(Patient).where(Patient.patient_id == patient_id)) or Patient(patient_id=patient_id)
    study_uid = study_uid or f"{uid}.0"
    study = s.scalar(select(Study).where(Study.study_uid == study_uid)) or Study(
        study_uid=study_uid, patient=patient, study_date=study_date
    )
    series = Series(series_uid=uid, study=study, modality=modality, body_part=body_part,
                    series_description=description, first_received_at=last, last_received_at=last)
    s.add(series)
    s.flush()
    for k, kw in enumerate(instances):
        kw = dict(kw)
        kw.setdefault("patient_fk", patient.id)  # the instance's own patient (the study's unless told)
        kw.setdefault("sop_instance_uid", f"{uid}.{k + 1}")
        kw.setdefault("sop_class_uid", MR)
        kw.setdefault("has_pixels", True)
        kw.setdefault("path", f"{uid}/{kw['sop_instance_uid']}.dcm")
        s.add(Instance(series=series, **kw))
    s.flush()
    return series


def _stack(n: int, numbers: bool = True) -> list[dict]:
    return [dict(instance_number=(k + 1) if numbers else None, image_position=[0.0, 0.0, 5.0 * k],
                 image_orientation=AXIAL) for k in range(n)]


def test_quiet_period_respected(make_settings, session_factory, recorder):
    settings = make_settings(quiet_period_s=10.0)
    with session_factory() as s:
        add_series(s, _stack(3), uid="1.1")
        s.commit()
    asm = Assembler(settings, session_factory, recorder)
    assert asm.run_once(now=T0 + timedelta(seconds=9.9)) == []
    with session_factory() as s:
        assert s.scalar(select(Series.state)) is SeriesState.RECEIVING
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    ids = asm.run_once(now=T0 + timedelta(seconds=10.1))
    assert len(ids) == 1 and recorder.ids == ids and recorder.seen_committed == [True]
    with session_factory() as s:
        series = s.scalar(select(Series))
        assert series.state is SeriesState.ASSEMBLED
        job = s.get(Job, ids[0])
        seq = s.get(SequenceRecord, job.sequence_fk)
        assert job.state is JobState.QUEUED
        assert seq.series_fk == series.id and seq.order_key == ORDER_INSTANCE_NUMBER
        assert seq.frame_refs == [["1.1.1", 1], ["1.1.2", 1], ["1.1.3", 1]] and seq.n_frames == 3
        assert seq.prior_study_uid == ""
    assert asm.run_once(now=T0 + timedelta(hours=1)) == []  # nothing new: no second job


def test_stored_order_by_position_from_shuffled_rows(make_settings, session_factory, recorder):
    zs = [30.0, -10.0, 0.0, 20.0, 10.0]
    rows = [dict(sop_instance_uid=f"2.1.{k}", instance_number=7, image_position=[0, 0, z], image_orientation=AXIAL)
            for k, z in enumerate(zs)]
    with session_factory() as s:
        add_series(s, _shuffled(rows), uid="2.1")
        s.commit()
    ids = Assembler(make_settings(quiet_period_s=5), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    with session_factory() as s:
        seq = s.get(Job, ids[0]).sequence
        assert seq.order_key == ORDER_POSITION
        assert [u for u, _ in seq.frame_refs] == ["2.1.1", "2.1.2", "2.1.4", "2.1.3", "2.1.0"]


def test_multi_frame_and_radiograph_sequences(make_settings, session_factory, recorder):
    with session_factory() as s:
        add_series(s, [dict(instance_number=1, number_of_frames=4)], uid="3.1")
        add_series(s, [dict(sop_class_uid=CR, instance_number=None)], uid="3.2", modality="CR", body_part="CHEST")
        s.commit()
    ids = Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    assert len(ids) == 2
    with session_factory() as s:
        by_series = {j.sequence.series.series_uid: j.sequence for j in s.scalars(select(Job))}
        assert by_series["3.1"].frame_refs == [["3.1.1", f] for f in (1, 2, 3, 4)]
        assert by_series["3.2"].frame_refs == [["3.2.1", 1]] and by_series["3.2"].n_frames == 1


NON_IMAGE = {
    "SR": dicom_uid.ComprehensiveSRStorage,
    "PR": dicom_uid.GrayscaleSoftcopyPresentationStateStorage,
    "KOS": dicom_uid.KeyObjectSelectionDocumentStorage,
    "SEG": dicom_uid.SegmentationStorage,
    "PDF": dicom_uid.EncapsulatedPDFStorage,
    "RTSTRUCT": dicom_uid.RTStructureSetStorage,
    "RTDOSE": dicom_uid.RTDoseStorage,
    "ECG": dicom_uid.TwelveLeadECGWaveformStorage,
}


def test_non_image_series_are_ignored_with_reason(make_settings, session_factory, recorder):
    assert all(v in NON_IMAGE_SOP_CLASSES for v in NON_IMAGE.values())
    with session_factory() as s:
        for k, (name, sop_class) in enumerate(NON_IMAGE.items()):
            # SEG and RT Dose carry pixel data: the class decides, not the pixels
            has_pixels = name in {"SEG", "RTDOSE"}
            add_series(s, [dict(sop_class_uid=str(sop_class), has_pixels=has_pixels)], uid=f"4.{k}", modality=name)
        add_series(s, [dict(sop_class_uid=MR, has_pixels=False)], uid="4.99")
        s.commit()
    ids = Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    assert ids == [] and recorder.ids == []
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(SequenceRecord)) == 0
        series = {x.series_uid: x for x in s.scalars(select(Series))}
        for k, (name, sop_class) in enumerate(NON_IMAGE.items()):
            x = series[f"4.{k}"]
            assert x.state is SeriesState.IGNORED
            assert x.state_reason.startswith("no image content") and sop_class.name in x.state_reason
        assert series["4.99"].state is SeriesState.IGNORED
        assert "no pixel data" in series["4.99"].state_reason


def test_our_own_secondary_capture_is_ignored_but_foreign_sc_is_processed(make_settings, session_factory, recorder):
    sc = str(dicom_uid.SecondaryCaptureImageStorage)
    with session_factory() as s:
        add_series(s, [dict(sop_class_uid=sc, instance_number=1)], uid="5.1",
                   description="MedGRU Grad-CAM overlay (NOT FOR DIAGNOSTIC USE)", modality="OT")
        add_series(s, [dict(sop_class_uid=str(dicom_uid.ComprehensiveSRStorage), has_pixels=False)], uid="5.2",
                   description="MedGRU anomaly report", modality="SR")
        add_series(s, [dict(sop_class_uid=sc, instance_number=1)], uid="5.3", description="scanned film", modality="OT")
        s.commit()
    ids = Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    assert len(ids) == 1
    with session_factory() as s:
        series = {x.series_uid: x for x in s.scalars(select(Series))}
        assert series["5.1"].state is SeriesState.IGNORED and "our own output" in series["5.1"].state_reason
        assert series["5.2"].state is SeriesState.IGNORED and "our own output" in series["5.2"].state_reason
        assert series["5.3"].state is SeriesState.ASSEMBLED
        assert s.get(Job, ids[0]).sequence.series.series_uid == "5.3"


def test_non_image_instances_inside_an_image_series_are_left_out(make_settings, session_factory, recorder):
    pr = str(dicom_uid.GrayscaleSoftcopyPresentationStateStorage)
    rows = _stack(2) + [dict(sop_class_uid=pr, has_pixels=False, instance_number=1)]
    with session_factory() as s:
        add_series(s, rows, uid="6.1")
        s.commit()
    ids = Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    with session_factory() as s:
        seq = s.get(Job, ids[0]).sequence
        assert seq.frame_refs == [["6.1.1", 1], ["6.1.2", 1]] and seq.order_key == ORDER_INSTANCE_NUMBER


SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]


def test_a_localizer_in_the_series_of_the_stack_is_left_out_with_reason(make_settings, session_factory, recorder,
                                                                         caplog):
    """A sagittal localizer stored in the series of an axial stack (InstanceNumber 1, before the slices)
    was frame 1 of the sequence: judged as a slice of the stack, deciding the verdict, and the slices were
    resized to its size (seen live: a 128 x 128 localizer with five 64 x 64 axial slices). It is left out,
    and the series' note and a warning name it. A three-plane localizer series of equal parts keeps all."""
    stack = [dict(instance_number=k + 2, image_position=[0.0, 0.0, 5.0 * k], image_orientation=AXIAL)
             for k in range(5)]
    localizer = dict(sop_instance_uid="6.2.0", instance_number=1, image_position=[0.0, -100.0, 100.0],
                     image_orientation=SAGITTAL)
    planes = [dict(instance_number=3 * p + k + 1, image_position=[0.0, 0.0, float(k)], image_orientation=o)
              for p, o in enumerate((AXIAL, SAGITTAL, CORONAL)) for k in range(3)]
    with session_factory() as s:
        add_series(s, [localizer] + stack, uid="6.2")
        add_series(s, planes, uid="6.3")
        s.commit()
    with caplog.at_level(logging.WARNING, logger="pacs_listener.assembly"):
        ids = Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    assert len(ids) == 2
    with session_factory() as s:
        by_series = {j.sequence.series.series_uid: j.sequence for j in s.scalars(select(Job))}
        assert [u for u, _ in by_series["6.2"].frame_refs] == [f"6.2.{k}" for k in range(2, 7)]
        series = s.scalar(select(Series).where(Series.series_uid == "6.2"))
        assert "1 image(s) left out" in series.state_reason and "6.2.0" in series.state_reason
        assert by_series["6.3"].n_frames == 9
    assert "6.2.0" in caplog.text


def test_slices_tilted_within_the_stack_s_plane_are_not_left_out(make_settings, session_factory, recorder):
    """A spine series whose axial slices come in groups, each tilted to its disc (-15°, 0°, +15°: 4, 5 and 4
    slices), kept only the largest group: 8 of its 13 slices were left out as 'not the stack's orientation
    (a localizer?)' (seen live: storescu -> medgru serve, a job of 5 frames). Only an image of another plane
    (more than 45° off, as the sagittal localizer here) is left out."""
    import math

    def tilted(degrees: float) -> list[float]:
        t = math.radians(degrees)
        return [1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)]

    planes = [(g, k, tilt) for g, (tilt, n) in enumerate(((-15, 4), (0, 5), (15, 4))) for k in range(n)]
    slices = [dict(instance_number=i + 2, image_position=[0.0, 0.0, 40.0 * g + 4.0 * k],
                   image_orientation=tilted(tilt)) for i, (g, k, tilt) in enumerate(planes)]
    localizer = dict(sop_instance_uid="6.4.0", instance_number=1, image_position=[0.0, -100.0, 100.0],
                     image_orientation=SAGITTAL)
    with session_factory() as s:
        add_series(s, [localizer] + slices, uid="6.4")
        s.commit()
    assert len(Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))) == 1
    with session_factory() as s:
        seq = s.scalar(select(Job)).sequence
        assert seq.n_frames == 13 and "6.4.0" not in [u for u, _ in seq.frame_refs]
        assert "1 image(s) left out" in seq.series.state_reason


def test_enqueue_called_only_after_commit_with_the_new_ids(make_settings, session_factory, recorder):
    with session_factory() as s:
        for k in range(4):
            add_series(s, _stack(2), uid=f"7.{k}", last=T0 + timedelta(seconds=k))
        s.commit()
    ids = Assembler(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    assert len(ids) == 4 and len(set(ids)) == 4
    assert recorder.ids == ids
    assert recorder.seen_committed == [True] * 4  # each job was visible from another connection


def test_enqueue_failure_keeps_the_job_queued(make_settings, session_factory):
    calls = []

    def broken_enqueue(job_id: int) -> None:
        calls.append(job_id)
        raise ConnectionError("broker down")

    with session_factory() as s:
        add_series(s, _stack(1), uid="8.1")
        add_series(s, _stack(1), uid="8.2", last=T0 + timedelta(seconds=1))
        s.commit()
    ids = Assembler(make_settings(), session_factory, broken_enqueue).run_once(now=T0 + timedelta(minutes=1))
    assert calls == ids and len(ids) == 2
    with session_factory() as s:
        assert [j.state for j in s.scalars(select(Job))] == [JobState.QUEUED, JobState.QUEUED]


def test_a_broker_outage_is_logged_in_one_line_without_a_traceback(make_settings, session_factory, caplog):
    """kombu's connection error came with a 170-line chained traceback for each series assembled while
    Redis was away; the outage is expected (the sweeper enqueues the job later): one line, the reason."""
    def broker_away(job_id: int) -> None:
        raise ConnectionError("broker redis://127.0.0.1:6390/0 did not take job 1: Connection refused")

    with session_factory() as s:
        add_series(s, _stack(1), uid="8.3")
        s.commit()
    with caplog.at_level(logging.ERROR, logger="pacs_listener.assembly"):
        [job_id] = Assembler(make_settings(), session_factory, broker_away).run_once(now=T0 + timedelta(minutes=1))
    [record] = [r for r in caplog.records if "could not be enqueued" in r.getMessage()]
    assert record.exc_info is None and "Connection refused" in record.getMessage()
    assert record.getMessage().startswith(f"job {job_id}: committed but could not be enqueued")


def test_one_job_per_series_with_concurrent_assemblers(make_settings, db_url):
    n_series = 12
    engines = [make_engine(db_url) for _ in range(3)]
    try:
        factories = [make_session_factory(e) for e in engines]
        with factories[0]() as s:
            for k in range(n_series):
                add_series(s, _stack(3), uid=f"9.{k}")
            s.commit()
        settings = make_settings()
        results: list[list[int]] = [[], []]
        enqueued: list[int] = []
        lock = threading.Lock()

        def enqueue(job_id: int) -> None:
            with lock:
                enqueued.append(job_id)

        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                asm = Assembler(settings, factories[k], enqueue)
                barrier.wait()
                results[k] = asm.run_once(now=T0 + timedelta(minutes=1))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        all_ids = results[0] + results[1]
        assert len(all_ids) == n_series and len(set(all_ids)) == n_series
        assert sorted(enqueued) == sorted(all_ids)
        with factories[2]() as s:
            assert s.scalar(select(func.count()).select_from(Job)) == n_series
            per_series = s.execute(
                select(SequenceRecord.series_fk, func.count()).group_by(SequenceRecord.series_fk)
            ).all()
            assert len(per_series) == n_series and all(c == 1 for _, c in per_series)
            assert all(x.state is SeriesState.ASSEMBLED for x in s.scalars(select(Series)))
    finally:
        for e in engines:
            e.dispose()


def test_late_instance_gives_a_new_sequence_covering_all_instances(make_settings, session_factory, recorder):
    with session_factory() as s:
        add_series(s, _stack(2), uid="10.1")
        s.commit()
    asm = Assembler(make_settings(quiet_period_s=10), session_factory, recorder)
    first = asm.run_once(now=T0 + timedelta(seconds=20))
    late = T0 + timedelta(minutes=5)
    with session_factory() as s:  # what the listener does for a late instance, in one transaction
        series = s.scalar(select(Series))
        s.add(Instance(series=series, sop_instance_uid="10.1.3", sop_class_uid=MR, instance_number=3,
                       has_pixels=True, path="10.1/10.1.3.dcm"))
        series.state = SeriesState.RECEIVING
        series.last_received_at = late
        s.commit()
    assert asm.run_once(now=late + timedelta(seconds=5)) == []
    second = asm.run_once(now=late + timedelta(seconds=11))
    assert len(first) == 1 and len(second) == 1 and second != first
    with session_factory() as s:
        seqs = s.scalars(select(SequenceRecord).order_by(SequenceRecord.id)).all()
        assert [q.n_frames for q in seqs] == [2, 3]
        assert seqs[1].frame_refs == [["10.1.1", 1], ["10.1.2", 1], ["10.1.3", 1]]
        assert s.get(Job, first[0]).state is JobState.QUEUED  # the earlier job is left as it is


def test_unforeseen_error_on_one_series_ignores_it_with_reason(make_settings, session_factory, recorder):
    class Fragile(Assembler):
        def _build(self, session, series_id):
            series = session.get(Series, series_id)
            if series.series_uid == "12.1":
                raise ValueError("odd data")
            return super()._build(session, series_id)

    with session_factory() as s:
        add_series(s, _stack(2), uid="12.1")
        add_series(s, _stack(2), uid="12.2", last=T0 + timedelta(seconds=1))
        s.commit()
    ids = Fragile(make_settings(), session_factory, recorder).run_once(now=T0 + timedelta(minutes=1))
    assert len(ids) == 1 and recorder.ids == ids
    with session_factory() as s:
        series = {x.series_uid: x for x in s.scalars(select(Series))}
        assert series["12.1"].state is SeriesState.IGNORED
        assert series["12.1"].state_reason == "assembly failed: ValueError: odd data"
        assert series["12.1"].sequences == []  # the failed transaction left nothing behind
        assert series["12.2"].state is SeriesState.ASSEMBLED


def test_run_forever_until_stopped(make_settings, session_factory):
    stop = threading.Event()
    got: list[int] = []

    def enqueue(job_id: int) -> None:
        got.append(job_id)
        stop.set()

    with session_factory() as s:
        add_series(s, _stack(1), uid="11.1")  # received in the past: quiet for a long time already
        s.commit()
    thread = threading.Thread(target=Assembler(make_settings(), session_factory, enqueue).run_forever,
                              args=(stop, 0.05))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert len(got) == 1


# --- prior study ----------------------------------------------------------------------------------------


def _assemble(settings, session_factory, now):
    return Assembler(settings, session_factory, lambda _id: None).run_once(now=now)


def _sequence_of(session_factory, series_uid: str) -> SequenceRecord:
    with session_factory() as s:
        return s.scalars(
            select(SequenceRecord).join(Series).where(Series.series_uid == series_uid).order_by(SequenceRecord.id.desc())
        ).first()


def test_prior_study_frames_lead(make_settings, session_factory):
    settings = make_settings(add_prior_study=True)
    with session_factory() as s:
        add_series(s, [dict(sop_class_uid=CR)], uid="20.1", modality="CR", body_part="CHEST", study_date="20240101")
        add_series(s, [dict(sop_class_uid=CR)], uid="20.2", modality="CR", body_part="CHEST", study_date="20250101")
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=1))
    first = _sequence_of(session_factory, "20.1")
    assert first.prior_study_uid == "" and first.frame_refs == [["20.1.1", 1]]  # no prior: plain sequence
    # the later study was assembled in the same pass; it is the one that gets a prior, once 20.1 is assembled
    with session_factory() as s:
        later = s.scalar(select(Series).where(Series.series_uid == "20.2"))
        later.state = SeriesState.RECEIVING
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=2))
    seq = _sequence_of(session_factory, "20.2")
    assert seq.prior_study_uid == "20.1.0"
    assert seq.frame_refs == [["20.1.1", 1], ["20.2.1", 1]] and seq.n_frames == 2


def test_a_localizer_of_the_prior_study_is_left_out_too(make_settings, session_factory):
    """The prior study's frames lead the sequence; its series' localizer of another plane was among them
    (its own sequence left it out): the first frame, whose size every frame of the sequence takes."""
    settings = make_settings(add_prior_study=True)
    stack = [dict(instance_number=k + 2, image_position=[0.0, 0.0, 5.0 * k], image_orientation=AXIAL)
             for k in range(3)]
    localizer = dict(instance_number=1, image_position=[0.0, -100.0, 100.0], image_orientation=SAGITTAL)
    with session_factory() as s:
        add_series(s, [localizer] + stack, uid="21.1", study_date="20240101")
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=1))
    with session_factory() as s:
        add_series(s, _stack(2), uid="21.2", study_date="20250101", last=T0 + timedelta(minutes=1))
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=3))
    seq = _sequence_of(session_factory, "21.2")
    assert seq.prior_study_uid == "21.1.0"
    assert [u for u, _ in seq.frame_refs] == ["21.1.2", "21.1.3", "21.1.4", "21.2.1", "21.2.2"]


def test_prior_rule_choices(make_settings, session_factory):
    settings = make_settings(add_prior_study=True)
    cr = dict(sop_class_uid=CR)
    with session_factory() as s:
        add_series(s, [cr], uid="21.1", modality="CR", body_part="CHEST", study_date="20230101")
        add_series(s, [cr], uid="21.2", modality="CR", body_part="CHEST", study_date="20240601")  # the latest prior
        add_series(s, [cr], uid="21.3", modality="DX", body_part="CHEST", study_date="20241001")  # other modality
        add_series(s, [cr], uid="21.4", modality="CR", body_part="HAND", study_date="20241101")  # other body part
        add_series(s, [cr], uid="21.5", modality="CR", body_part="CHEST", study_date="20250101", patient_id="P2")
        add_series(s, [cr], uid="21.6", modality="CR", body_part="CHEST", study_date="20260101")  # later study
        add_series(s, [cr], uid="21.7", modality="CR", body_part="CHEST", study_date="20250101",
                   study_uid="21.7.0")  # same day as the current one: not strictly before
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=1))
    with session_factory() as s:
        current = add_series(s, [cr], uid="21.8", modality="CR", body_part="chest", study_date="20250101",
                             last=T0 + timedelta(minutes=5))
        s.commit()
        assert current.state is SeriesState.RECEIVING
    _assemble(settings, session_factory, T0 + timedelta(minutes=10))
    seq = _sequence_of(session_factory, "21.8")
    assert seq.prior_study_uid == "21.2.0"  # not DX 21.3, not HAND 21.4, not P2, not later 21.6, not same-day 21.7
    assert seq.frame_refs == [["21.2.1", 1], ["21.8.1", 1]]
    # the earliest study has no earlier one: plain sequence, never the later studies
    assert _sequence_of(session_factory, "21.1").prior_study_uid == ""
    # off by default
    with session_factory() as s:
        again = s.scalar(select(Series).where(Series.series_uid == "21.8"))
        again.state = SeriesState.RECEIVING
        s.commit()
    _assemble(make_settings(add_prior_study=False), session_factory, T0 + timedelta(minutes=20))
    plain = _sequence_of(session_factory, "21.8")
    assert plain.prior_study_uid == "" and plain.frame_refs == [["21.8.1", 1]]


def test_later_study_never_used_as_prior(make_settings, session_factory):
    settings = make_settings(add_prior_study=True)
    with session_factory() as s:
        add_series(s, [dict(sop_class_uid=CR)], uid="22.2", modality="CR", body_part="CHEST", study_date="20250101")
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=1))
    with session_factory() as s:  # an older study arrives after the newer one was assembled
        add_series(s, [dict(sop_class_uid=CR)], uid="22.1", modality="CR", body_part="CHEST", study_date="20240101",
                   last=T0 + timedelta(minutes=2))
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=5))
    seq = _sequence_of(session_factory, "22.1")
    assert seq.prior_study_uid == "" and seq.frame_refs == [["22.1.1", 1]]


def test_no_prior_for_anonymous_patient_or_missing_date(make_settings, session_factory):
    settings = make_settings(add_prior_study=True)
    cr = dict(sop_class_uid=CR)
    with session_factory() as s:
        add_series(s, [cr], uid="23.1", modality="CR", body_part="CHEST", study_date="20240101", patient_id="")
        add_series(s, [cr], uid="23.3", modality="CR", body_part="CHEST", study_date="20240101", patient_id="P9")
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=1))
    with session_factory() as s:
        add_series(s, [cr], uid="23.2", modality="CR", body_part="CHEST", study_date="20250101", patient_id="",
                   last=T0 + timedelta(minutes=2))
        add_series(s, [cr], uid="23.4", modality="CR", body_part="CHEST", study_date="", patient_id="P9",
                   last=T0 + timedelta(minutes=2))
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=5))
    assert _sequence_of(session_factory, "23.2").prior_study_uid == ""
    assert _sequence_of(session_factory, "23.4").prior_study_uid == ""


def test_the_prior_is_that_of_the_patient_the_instances_name_not_the_study_record(make_settings, session_factory,
                                                                                   caplog):
    """A Study Instance UID first recorded for P1 receives a series whose instances name P2 (a reused UID, a
    corrected PatientID). Its prior was looked up by the study's patient, so P1's earlier chest was
    prepended to P2's frames and referenced in P2's report."""
    settings = make_settings(add_prior_study=True)
    cr = dict(sop_class_uid=CR)
    with session_factory() as s:
        add_series(s, [cr], uid="24.1", modality="CR", body_part="CHEST", study_date="20240101", patient_id="P1")
        add_series(s, [cr], uid="24.2", modality="CR", body_part="CHEST", study_date="20230101", patient_id="P2")
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=1))
    with session_factory() as s:
        add_series(s, [cr], uid="24.5", modality="CR", body_part="CHEST", study_date="20250101", patient_id="P1",
                   study_uid="24.9.0", last=T0 + timedelta(minutes=2))  # the study, recorded for P1
        add_series(s, [cr], uid="24.6", modality="CR", body_part="CHEST", study_uid="24.9.0", patient_id="P2",
                   last=T0 + timedelta(minutes=2))  # its instances name P2
        mixed = add_series(s, [cr, cr], uid="24.7", modality="CR", body_part="CHEST", study_uid="24.9.0",
                           patient_id="P1", last=T0 + timedelta(minutes=2))
        mixed.instances[1].patient_fk = s.scalar(select(Patient.id).where(Patient.patient_id == "P2"))
        s.commit()
    with caplog.at_level("WARNING", logger="pacs_listener.assembly"):
        _assemble(settings, session_factory, T0 + timedelta(minutes=5))
    assert _sequence_of(session_factory, "24.5").prior_study_uid == "24.1.0"  # P1's own prior
    assert _sequence_of(session_factory, "24.6").prior_study_uid == "24.2.0"  # P2's, never P1's 24.1
    assert _sequence_of(session_factory, "24.7").prior_study_uid == ""  # two patients: none
    assert any("24.7" in r.getMessage() and "2 patients" in r.getMessage() for r in caplog.records)
    # nor is a series of several patients ever a prior: P1's next study finds 24.5, not the mixed 24.7
    with session_factory() as s:
        add_series(s, [cr], uid="24.8", modality="CR", body_part="CHEST", study_date="20260101", patient_id="P1",
                   last=T0 + timedelta(minutes=6))
        s.execute(update(Series).where(Series.series_uid == "24.5").values(last_received_at=T0))
        s.commit()
    _assemble(settings, session_factory, T0 + timedelta(minutes=10))
    seq = _sequence_of(session_factory, "24.8")
    assert seq.prior_study_uid == "24.9.0" and seq.frame_refs[0] == ["24.5.1", 1]


def test_a_series_the_database_refuses_does_not_hold_back_the_others(make_settings, sqlite_session_factory, caplog):
    """A database error on one series' sequence (here: too large for SQLite, a real case with an
    encapsulated NumberOfFrames of 14,000,000) escaped run_once: every pass stopped at that series, the
    oldest, and no series behind it was ever assembled."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import func, select

    from pacs_listener.assembly import Assembler
    from pacs_listener.scp import Listener
    from pacs_listener.status import StoreStatus
    from storage.models import Job, Series, SeriesState

    from .conftest import make_mr, store_with

    settings = make_settings(min_free_disk_mb=0, quiet_period_s=0)
    listener = Listener(settings, sqlite_session_factory)
    poisoned, fine = make_mr(), make_mr()
    assert store_with(listener, poisoned) == StoreStatus.SUCCESS
    assert store_with(listener, fine) == StoreStatus.SUCCESS
    assembler = Assembler(settings, sqlite_session_factory, enqueue=lambda job_id: None)
    real_build = assembler._build

    def build(session, series_id):
        if session.get(Series, series_id).series_uid == poisoned.SeriesInstanceUID:
            from sqlalchemy.exc import DataError
            raise DataError("INSERT INTO sequences ...", {}, Exception("string or blob too big"))
        return real_build(session, series_id)

    assembler._build = build
    later = datetime.now(timezone.utc) + timedelta(seconds=1)
    with caplog.at_level("WARNING", logger="pacs_listener.assembly"):
        jobs = assembler.run_once(now=later)
        assert assembler.run_once(now=later) == []  # the next pass: tried again, not logged again at once
    assert len(jobs) == 1
    assert len([r for r in caplog.records if "database error while assembling" in r.getMessage()]) == 1
    with sqlite_session_factory() as s:
        states = dict(s.execute(select(Series.series_uid, Series.state)).all())
        assert states[fine.SeriesInstanceUID] == SeriesState.ASSEMBLED
        assert states[poisoned.SeriesInstanceUID] == SeriesState.RECEIVING  # retried by the next pass
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_the_prior_lookup_starts_from_the_patient_s_instances_not_every_series(make_settings, tmp_path):
    """The lookup by the instances' patient was a correlated EXISTS that SQLite (the embedded default) ran
    by scanning every series and probing each one's instances: 0.5 s for each series assembled at 100,000
    series. Its plan must go through the patient's instances (ix_instances_patient_fk), not scan series."""
    from sqlalchemy import event

    engine = init_db(f"sqlite:///{tmp_path / 'plan.sqlite3'}")
    sf = make_session_factory(engine)
    settings = make_settings(add_prior_study=True)
    cr = dict(sop_class_uid=CR)
    with sf() as s:
        add_series(s, [cr], uid="25.1", modality="CR", body_part="CHEST", study_date="20240101", patient_id="P1")
        s.commit()
    _assemble(settings, sf, T0 + timedelta(minutes=1))
    with sf() as s:
        add_series(s, [cr], uid="25.2", modality="CR", body_part="CHEST", study_date="20250101", patient_id="P1",
                   last=T0 + timedelta(minutes=2))
        s.commit()
    statements = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cur, statement, params, ctx, many: statements.append((statement, params)))
    _assemble(settings, sf, T0 + timedelta(minutes=5))
    assert _sequence_of(sf, "25.2").prior_study_uid == "25.1.0"
    [(statement, params)] = [(q, p) for q, p in statements if "ORDER BY studies.study_date DESC" in q]
    with engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)]
    engine.dispose()
    series_steps = [step for step in plan if step.startswith(("SCAN series", "SEARCH series"))]
    assert len(series_steps) == 1 and "rowid=?" in series_steps[0], plan  # by the ids found, no scan
    assert any("ix_instances_patient_fk" in step for step in plan), plan
