"""``medgru quarantine retry``: DCMTK's storescu sends while the spool cannot be written (our fault: the
instances are quarantined); once it can, the retry stores them as if they had just arrived. An instance
refused for its own data is refused again, with no second quarantine row."""

from __future__ import annotations

import shutil

import pytest
from pydicom import dcmwrite
from sqlalchemy import func, select

from medgru.cli import main
from pacs_listener.scp import Listener
from pacs_listener.status import StoreStatus
from storage.db import init_db, make_session_factory
from storage.models import Instance, QuarantineItem, Series, SeriesState

from .conftest import PATIENT_NAME, STORESCU, make_mr, run_dcmtk

pytestmark = pytest.mark.integration  # storescu is a real peer


def test_retry_stores_what_our_fault_refused_and_not_what_the_data_did(make_settings, tmp_path, cli_env, capsys):
    settings = make_settings(listen_host="127.0.0.1", listen_port=0, min_free_disk_mb=0)
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    cli_env.setenv("MEDGRU_MIN_FREE_DISK_MB", "0")
    good = [make_mr(), make_mr()]
    for ds in good[1:]:
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = good[0].StudyInstanceUID, good[0].SeriesInstanceUID, 2
    bad = make_mr()
    bad.NumberOfFrames = 5  # its pixel data holds one frame
    files = []
    for i, ds in enumerate([*good, bad]):
        dcmwrite(tmp_path / f"{i}.dcm", ds, enforce_file_format=True)
        files.append(tmp_path / f"{i}.dcm")
    sf = make_session_factory(init_db(settings.effective_database_url))

    with Listener(settings, sf) as listener:
        shutil.rmtree(settings.spool_dir)
        settings.spool_dir.write_text("a file where the spool folder should be")  # every spool write fails
        res = run_dcmtk([STORESCU, "-v", "-nh", "-aet", "MODALITY", "-aec", settings.ae_title, "127.0.0.1",
                         str(listener.port), *map(str, files)])
    assert res.stderr.count("Refused: OutOfResources") == 2 and "DataSetDoesNotMatchSOPClass" in res.stderr
    with sf() as s:
        assert s.scalar(select(func.count(Instance.id))) == 0
        items = s.scalars(select(QuarantineItem).order_by(QuarantineItem.id)).all()
        assert [i.status_code for i in items] == [StoreStatus.OUT_OF_RESOURCES] * 2 + [
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS]
        ids = [i.id for i in items]

    settings.spool_dir.unlink()  # the admin fixes the fault
    settings.spool_dir.mkdir()
    capsys.readouterr()
    assert main(["quarantine", "retry", "--all"]) == 1  # one of three is refused again
    out = capsys.readouterr().out
    assert f"{ids[0]}: stored {good[0].SOPInstanceUID}" in out and f"{ids[1]}: stored {good[1].SOPInstanceUID}" in out
    assert f"{ids[2]}: refused again: " in out and "PixelData has" in out and "2 of 3 stored" in out
    assert PATIENT_NAME not in out
    with sf() as s:
        stored = s.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert [i.sop_instance_uid for i in stored] == [str(ds.SOPInstanceUID) for ds in good]
        assert {i.calling_ae for i in stored} == {"MODALITY"}  # as if the modality had just sent them
        assert all((settings.spool_dir / i.path).is_file() for i in stored)
        series = s.scalars(select(Series)).one()
        assert series.state is SeriesState.RECEIVING  # the assembler takes it after the quiet period
        assert s.scalar(select(func.count(QuarantineItem.id))) == 3  # no second quarantine row
        released = {i.id: i.released_at for i in s.scalars(select(QuarantineItem))}
        assert released[ids[0]] and released[ids[1]] and released[ids[2]] is None

    assert main(["quarantine", "retry", str(ids[0]), "999"]) == 1
    out = capsys.readouterr().out
    assert f"{ids[0]}: already stored by a retry on" in out and "999: no quarantined instance 999" in out
    assert main(["quarantine", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows[str(ids[2])].split()[5] == bad.SOPInstanceUID  # refused again: no retry date before its UID
    assert rows[str(ids[0])].split()[7] == good[0].SOPInstanceUID  # stored: the retry's date and time first
    assert main(["quarantine", "show", str(ids[0])]) == 0
    assert "stored by a retry" in capsys.readouterr().out
