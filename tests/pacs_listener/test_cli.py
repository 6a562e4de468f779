"""``medgru quarantine list/show`` through the real command line, after DCMTK's storescu sent the listener
one good and one broken instance."""

from __future__ import annotations

import pytest
from pydicom import dcmread, dcmwrite

from medgru.cli import main
from pacs_listener.scp import Listener
from pacs_listener.status import StoreStatus
from storage.db import init_db, make_session_factory

from .conftest import PATIENT_NAME, STORESCU, make_mr, run_dcmtk

pytestmark = pytest.mark.integration  # storescu is a real peer


def test_quarantine_list_and_show(make_settings, tmp_path, cli_env, capsys):
    settings = make_settings(listen_host="127.0.0.1", listen_port=0)
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    good, bad = make_mr(), make_mr()
    bad.NumberOfFrames = 5  # its pixel data holds one frame
    files = []
    for name, ds in (("good.dcm", good), ("bad.dcm", bad)):
        dcmwrite(tmp_path / name, ds, enforce_file_format=True)
        files.append(tmp_path / name)
    sf = make_session_factory(init_db(settings.effective_database_url))
    with Listener(settings, sf) as listener:
        res = run_dcmtk([STORESCU, "-v", "-nh", "-aet", "BADMOD", "-aec", settings.ae_title, "127.0.0.1",
                         str(listener.port), *map(str, files)])
    assert "Error: DataSetDoesNotMatchSOPClass" in res.stderr  # storescu got the failure status we answered

    capsys.readouterr()
    assert main(["quarantine", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "RECEIVED", "(UTC)"]
    [row] = lines[2:]  # the good instance was stored, not quarantined
    item_id = row.split()[0]
    assert "BADMOD" in row and f"0x{StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS:04X}" in row
    assert bad.SOPInstanceUID in row and "PixelData has" in row and good.SOPInstanceUID not in out
    assert main(["quarantine", "list", "--calling-ae", "OTHER"]) == 0
    assert "(no quarantined instances)" in capsys.readouterr().out

    assert main(["quarantine", "show", item_id]) == 0
    out = capsys.readouterr().out
    assert "Data Set Does Not Match SOP Class" in out and bad.SeriesInstanceUID in out and bad.StudyInstanceUID in out
    file_line = next(line for line in out.splitlines() if line.startswith("file"))
    path = file_line.split(None, 1)[1].rsplit(" (", 1)[0]
    assert dcmread(path).SOPInstanceUID == bad.SOPInstanceUID  # the refused bytes are kept, as received
    assert PATIENT_NAME not in out and PATIENT_NAME.split("^")[0] not in out

    assert main(["quarantine", "show", "999"]) == 1
    assert "no quarantined instance 999" in capsys.readouterr().out
