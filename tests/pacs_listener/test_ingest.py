"""record_instance on SQLite and PostgreSQL: upserts, idempotent resend, late instances."""

from datetime import timedelta

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import event, func, inspect, select

from pacs_listener.assembly import Assembler
from pacs_listener.ingest import extract_meta, record_instance
from storage.db import init_db, make_session_factory
from storage.models import Instance, Job, Patient, SequenceRecord, Series, SeriesState, Study, utcnow
from tests.storage.dbutil import isolated_url

from .conftest import make_mr


def meta_of(ds):
    return extract_meta(ds, ExplicitVRLittleEndian)


def record(session_factory, ds, **kw):
    meta = meta_of(ds)
    with session_factory() as session:
        result = record_instance(session, meta, f"{meta.study_uid}/{meta.series_uid}/{meta.sop_instance_uid}.dcm",
                                 size_bytes=10, sha256="0" * 64, calling_ae="CT1", **kw)
        session.commit()
    return result


def test_extract_meta_fields_and_no_patient_name():
    ds = make_mr(BodyPartExamined="", StudyDescription="IRM", ProtocolName="x", NumberOfFrames=2)
    meta = meta_of(ds)
    assert meta.body_part == "BRAIN"  # from "T1 cérébral"
    assert meta.image_position == [0.0, 0.0, 1.5]
    assert meta.image_orientation == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert meta.acquisition_time == "20240102101112.5"
    assert meta.number_of_frames == 2 and meta.has_pixels and meta.series_number == 3
    assert "Zorglub" not in repr(meta) and "Quetzal" not in repr(meta)


def test_extract_meta_tolerates_odd_values():
    ds = make_mr(InstanceNumber="99999999999", ImagePositionPatient=[1.0, 2.0])
    ds.AcquisitionDateTime = "20240102101112"
    meta = meta_of(ds)
    assert meta.instance_number is None  # out of the database integer range
    assert meta.image_position is None  # wrong multiplicity
    assert meta.acquisition_time == "20240102101112"


def test_extract_meta_drops_nul_characters_from_text():
    ds = make_mr(SeriesDescription="T1\x00AX", StudyDescription="IRM\x00", AccessionNumber="A1\x00B")
    meta = meta_of(ds)
    assert meta.series_description == "T1AX" and meta.accession_number == "A1B"
    assert "\x00" not in repr(meta)


def test_first_instance_creates_patient_study_series(session_factory):
    ds = make_mr()
    result = record(session_factory, ds)
    assert result.created and not result.reopened and result.series_uid == ds.SeriesInstanceUID
    with session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == ds.SeriesInstanceUID))
        assert series.state == SeriesState.RECEIVING and series.body_part == "BRAIN"
        assert series.modality == "MR" and series.series_number == 3
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert inst.image_position == [0.0, 0.0, 1.5] and inst.calling_ae == "CT1" and inst.has_pixels
        study = s.scalar(select(Study).where(Study.study_uid == ds.StudyInstanceUID))
        assert s.get(Patient, study.patient_fk).patient_id == ds.PatientID


def test_no_table_has_a_patient_name_column(session_factory):
    engine = session_factory.kw["bind"]
    for table in inspect(engine).get_table_names():
        for column in inspect(engine).get_columns(table):
            assert "name" not in column["name"].lower() or table in ("jobs", "results", "alembic_version"), (table, column)


def test_resent_instance_is_stored_once(session_factory):
    ds = make_mr()
    first = record(session_factory, ds)
    second = record(session_factory, ds)
    assert first.created and not second.created
    assert second.instance_id == first.instance_id and second.path == first.path
    with session_factory() as s:
        n = s.scalar(select(func.count()).select_from(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert n == 1


def test_same_patient_same_issuer_shares_row_other_issuer_does_not(session_factory):
    pid = "P" + generate_uid()[-10:]
    a = make_mr(PatientID=pid, IssuerOfPatientID="HOSP_A")
    b = make_mr(PatientID=pid, IssuerOfPatientID="HOSP_A")
    c = make_mr(PatientID=pid, IssuerOfPatientID="HOSP_B")
    for ds in (a, b, c):
        record(session_factory, ds)
    with session_factory() as s:
        rows = s.scalars(select(Patient).where(Patient.patient_id == pid)).all()
        assert sorted(p.issuer for p in rows) == ["HOSP_A", "HOSP_B"]


def test_each_instance_records_the_patient_it_names(session_factory):
    # a study first recorded for one patient keeps its row, and an instance of it naming another patient
    # records that one (assembly looks up the prior study by it, not by the study's)
    first, other = "P" + generate_uid()[-10:], "Q" + generate_uid()[-10:]
    a = make_mr(PatientID=first)
    b = make_mr(PatientID=other, StudyInstanceUID=a.StudyInstanceUID)
    for ds in (a, b):
        record(session_factory, ds)
    with session_factory() as s:
        named = dict(s.execute(select(Instance.sop_instance_uid, Patient.patient_id)
                               .join(Patient, Instance.patient_fk == Patient.id)
                               .where(Instance.sop_instance_uid.in_([a.SOPInstanceUID, b.SOPInstanceUID]))).all())
        assert named == {a.SOPInstanceUID: first, b.SOPInstanceUID: other}
        study = s.scalar(select(Study).where(Study.study_uid == a.StudyInstanceUID))
        assert s.get(Patient, study.patient_fk).patient_id == first


def test_second_instance_joins_series_and_updates_last_received(session_factory):
    ds1 = make_mr()
    ds2 = make_mr(StudyInstanceUID=ds1.StudyInstanceUID, SeriesInstanceUID=ds1.SeriesInstanceUID, InstanceNumber=2)
    t0 = utcnow()
    record(session_factory, ds1, now=t0)
    record(session_factory, ds2, now=t0 + timedelta(seconds=5))
    with session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == ds1.SeriesInstanceUID))
        assert len(series.instances) == 2
        assert series.last_received_at.replace(tzinfo=None) == (t0 + timedelta(seconds=5)).replace(tzinfo=None)
        assert s.scalar(select(func.count()).select_from(Study).where(Study.study_uid == ds1.StudyInstanceUID)) == 1


def test_late_instance_puts_assembled_series_back_to_receiving(session_factory):
    ds1 = make_mr()
    record(session_factory, ds1)
    with session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == ds1.SeriesInstanceUID))
        series.state = SeriesState.ASSEMBLED
        s.commit()
    late = make_mr(StudyInstanceUID=ds1.StudyInstanceUID, SeriesInstanceUID=ds1.SeriesInstanceUID)
    result = record(session_factory, late)
    assert result.created and result.reopened
    with session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == ds1.SeriesInstanceUID))
        assert series.state == SeriesState.RECEIVING
        assert late.SOPInstanceUID in series.state_reason
    # a resend of an instance already there does not reopen an assembled series
    with session_factory() as s:
        s.scalar(select(Series).where(Series.series_uid == ds1.SeriesInstanceUID)).state = SeriesState.ASSEMBLED
        s.commit()
    again = record(session_factory, late)
    assert not again.created and not again.reopened
    with session_factory() as s:
        assert s.scalar(select(Series.state).where(Series.series_uid == ds1.SeriesInstanceUID)) == SeriesState.ASSEMBLED


@pytest.fixture
def own_session_factory(database_url):
    """A database of the test's own: an assembler pass claims every quiet series it sees."""
    with isolated_url(database_url) as url:
        engine = init_db(url)
        yield make_session_factory(engine)
        engine.dispose()


def test_late_instance_recorded_while_the_assembler_claims_its_series_is_assembled_later(
    make_settings, own_session_factory
):
    """The assembler claims the series (RECEIVING -> ASSEMBLED) after record_instance has read the series and
    before its commit. The late instance must still put the series back to RECEIVING, so that the next pass
    builds a sequence holding it (it was committed, and answered Success, in no sequence)."""
    factory = own_session_factory
    t0 = utcnow()
    asm = Assembler(make_settings(quiet_period_s=10), factory, enqueue=lambda job_id: None)
    first = make_mr()
    record(factory, first, now=t0)
    late = make_mr(StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID,
                   InstanceNumber=2)
    claimed: list[list[int]] = []

    def assemble_after_the_series_is_read(state):
        if claimed or not state.is_select or state.bind_mapper is not inspect(Series):
            return None
        rows = state.invoke_statement().freeze()  # fetched: no cursor left open on the listener's connection
        claimed.append(asm.run_once(now=t0 + timedelta(seconds=15)))  # its quiet period is over
        return rows()

    meta = meta_of(late)
    with factory() as session:
        event.listen(session, "do_orm_execute", assemble_after_the_series_is_read)
        result = record_instance(session, meta, f"{meta.study_uid}/{meta.series_uid}/{meta.sop_instance_uid}.dcm",
                                 size_bytes=10, sha256="0" * 64, now=t0 + timedelta(seconds=20))
        session.commit()
    assert len(claimed) == 1 and len(claimed[0]) == 1, "the assembler did not claim the series in between"
    assert result.created and result.reopened
    with factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == first.SeriesInstanceUID))
        assert series.state == SeriesState.RECEIVING and late.SOPInstanceUID in series.state_reason
    [job_id] = asm.run_once(now=t0 + timedelta(seconds=31))
    with factory() as s:
        seq = s.get(SequenceRecord, s.get(Job, job_id).sequence_fk)
        assert [uid for uid, _ in seq.frame_refs] == [first.SOPInstanceUID, late.SOPInstanceUID]


def test_instance_of_another_study_is_not_merged_into_a_series(make_settings, sqlite_session_factory):
    """A SeriesInstanceUID belongs to one study. An instance naming the same series in another study (here
    another patient's) was answered Success and scored in the same ConvGRU sequence as the first patient's
    slices, its SR filed in the first patient's study."""
    from sqlalchemy import func, select

    from pacs_listener.scp import Listener
    from pacs_listener.status import StoreStatus
    from storage.models import Instance, QuarantineItem

    from .conftest import store_with

    listener = Listener(make_settings(min_free_disk_mb=0), sqlite_session_factory)
    first = make_mr(InstanceNumber=1)
    assert store_with(listener, first) == StoreStatus.SUCCESS
    other = make_mr(InstanceNumber=2, SeriesInstanceUID=first.SeriesInstanceUID, PatientID="OTHER")
    assert other.StudyInstanceUID != first.StudyInstanceUID

    status = store_with(listener, other)

    assert status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    with sqlite_session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        item = s.scalars(select(QuarantineItem)).one()
        assert item.sop_instance_uid == other.SOPInstanceUID
        assert first.StudyInstanceUID in item.reason and other.StudyInstanceUID in item.reason
    assert not list((listener.spool_dir / other.StudyInstanceUID).rglob("*.dcm"))
