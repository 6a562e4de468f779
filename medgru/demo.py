"""``medgru demo``: the whole loop on one machine with no servers to install.

It starts a small stand-in PACS (a pynetdicom Storage SCP that keeps what it receives in
``<home>/demo-pacs``), starts the service on the embedded default (SQLite, filesystem broker, an
in-process worker) with that PACS as destination, sends sample series to the listener over DICOM,
waits until every job has ended and its result objects have arrived at the stand-in PACS, and prints
the findings. The default samples come from the benchmark data's DICOM corpus: an ordered brain MR
series, a human chest CR (MONOCHROME1), and a knee MR series that no model covers (it must come back unprocessed).

Every run starts from an empty home (default ``<MEDGRU_HOME>/demo``): the folder is marked as a demo's
(``.medgru-demo``; one made before the mark existed is known by its ``demo-pacs`` folder) and a later run
clears it first. (Kept, the earlier run's database would take the same instances for duplicates, assemble
nothing new and wait for results that never come.) A non-empty folder without that mark is refused, never
cleared.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

from medgru.settings import Destination, Settings

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = (
    "dicom/orthanc-tests/Brainix/Flair",
    "dicom/dwv/data/gdcm-CR-MONO1-10-chest.dcm",
    "dicom/orthanc-tests/Knee/T1",
)
DEMO_PACS_AET = "DEMOPACS"
DEMO_SCU_AET = "DEMOSCU"
#: a file in the demo's home that marks it as made by ``medgru demo``, so that a later run may clear it
DEMO_MARKER = ".medgru-demo"
#: the stand-in PACS's folder in the demo's home (also how a home of a demo older than the marker is known)
DEMO_PACS_DIR = "demo-pacs"


def prepare_home(folder: Path) -> None:
    """Make ``folder`` an empty demo home: cleared if an earlier demo made it, refused if anything else is
    in it."""
    if folder.exists():
        entries = list(folder.iterdir())
        made_by_demo = (folder / DEMO_MARKER).is_file() or (folder / DEMO_PACS_DIR).is_dir()
        if entries and not made_by_demo:
            raise SystemExit(f"medgru demo: {folder} is not empty and was not made by medgru demo; "
                             "give a new or empty --home")
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if entries:
            log.info("demo home %s: the earlier demo run's files removed", folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("made by medgru demo; cleared at the start of every demo run\n")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"demo input {p} does not exist")
    return out


def _start_demo_pacs(folder: Path, port: int):
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    folder.mkdir(parents=True, exist_ok=True)
    received: list[Path] = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        received.append(path)
        return 0x0000  # Success

    ae = AE(ae_title=DEMO_PACS_AET)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, received


def _send(files: list[Path], settings: Settings, port: int, dimse_timeout: float = 300.0) -> tuple[int, int]:
    import pydicom
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=DEMO_SCU_AET)
    # the listener answers once the instance is on disk and recorded; on a loaded machine (the first
    # instance also waits for the service to warm up) that took over pynetdicom's default of 30 s, the
    # association was aborted and the demo failed with a RuntimeError from the next C-STORE
    ae.dimse_timeout = dimse_timeout
    seen = set()
    for ds in datasets:
        key = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        if key not in seen:
            seen.add(key)
            ae.requested_contexts.append(build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID]))
    assoc = ae.associate("127.0.0.1", port, ae_title=settings.ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"could not associate with our listener on port {port}")
    ok = failed = 0
    try:
        for i, ds in enumerate(datasets):
            if not assoc.is_established:  # aborted (by either side): the rest were not sent
                log.warning("the association with our listener ended; %d instances not sent", len(datasets) - i)
                failed += len(datasets) - i
                break
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                ok += 1
            else:
                failed += 1
                log.warning("C-STORE of %s answered %s", ds.SOPInstanceUID, status)
    finally:
        assoc.release()
    return ok, failed


def run_demo(settings: Settings, *, data_root: Path | None, inputs: list[Path] | None, timeout: float,
             home: Path | None) -> int:
    from sqlalchemy import select

    from medgru.service import Service
    from storage.models import Job, JobState, SequenceRecord, Series

    root = data_root or settings.data_root
    if inputs:
        paths = list(inputs)
    else:
        if root is None:
            raise SystemExit("medgru demo: give --data-root (the shared/data folder) or --input")
        paths = [Path(root) / rel for rel in DEFAULT_SAMPLES]
        missing = [p for p in paths if not p.exists()]
        if missing:  # a data root that is not shared/data (a relative one from another folder, say)
            raise SystemExit(f"medgru demo: {missing[0]} does not exist: --data-root {root} is not the shared/data "
                             "folder (the one that holds dicom/orthanc-tests/)")
    try:
        files = _files(paths)
    except FileNotFoundError as exc:  # an --input that is not there
        raise SystemExit(f"medgru demo: {exc}") from None

    listen_port, pacs_port = _free_port(), _free_port()
    demo_home = (home or settings.home / "demo").resolve()
    prepare_home(demo_home)
    run_settings = settings.model_copy(update={
        "home": demo_home,
        "listen_host": "127.0.0.1",
        "listen_port": listen_port,
        "destination": Destination(ae_title=DEMO_PACS_AET, host="127.0.0.1", port=pacs_port),
        "quiet_period_s": min(settings.quiet_period_s, 2.0),
        "allowed_calling_aes": [],
        "database_url": None,
        "broker_url": None,
        "dashboard_port": 0,
    })
    pacs, received = _start_demo_pacs(demo_home / DEMO_PACS_DIR, pacs_port)
    service = Service(run_settings).start()
    t0 = time.monotonic()
    try:
        short = service.health().get("disk")
        if short:
            print(f"error: the listener would refuse every instance: {short} (MEDGRU_MIN_FREE_DISK_MB)")
            return 1
        ok, failed = _send(files, run_settings, service.listener.port)
        print(f"sent {ok + failed} instances from {len(paths)} inputs: {ok} stored, {failed} refused")
        if ok == 0:  # no job can come: waiting would only run into the time-out
            print("error: no instance was stored; the listener's reasons are in the log above")
            return 1
        t_sent = time.monotonic()
        terminal = {JobState.SUCCEEDED, JobState.FAILED, JobState.NOT_PROCESSED, JobState.CANCELLED}
        while True:
            with service.session_factory() as session:
                jobs = session.scalars(select(Job)).all()
                done = jobs and all(j.state in terminal for j in jobs)
                expected = 2 * sum(1 for j in jobs if j.state == JobState.SUCCEEDED)
            if done and len(received) >= expected:
                break
            if time.monotonic() - t0 > timeout:
                print(f"timed out after {timeout:.0f} s; jobs: {[(j.id, j.state.value) for j in jobs]}")
                return 1
            time.sleep(0.5)
        elapsed = time.monotonic() - t_sent
        with service.session_factory() as session:
            rows = session.execute(
                select(Job, SequenceRecord, Series).join(SequenceRecord, Job.sequence_fk == SequenceRecord.id)
                .join(Series, SequenceRecord.series_fk == Series.id).order_by(Job.id)
            ).all()
            print(f"\n{'job':>4}  {'modality':8} {'body part':10} {'frames':>6}  {'state':14} {'score':>8} "
                  f"{'threshold':>9}  verdict   model")
            all_ok = True
            for job, seq, series in rows:
                res = job.results[-1] if job.results else None
                if job.state not in (JobState.SUCCEEDED, JobState.NOT_PROCESSED):
                    all_ok = False
                if res is not None:
                    verdict = "ABNORMAL" if res.is_anomaly else "normal"
                    print(f"{job.id:>4}  {series.modality:8} {series.body_part or '-':10} {seq.n_frames:>6}  "
                          f"{job.state.value:14} {res.score:8.3f} {res.threshold:9.3f}  {verdict:9} "
                          f"{res.model_name} {res.model_version}")
                else:
                    print(f"{job.id:>4}  {series.modality:8} {series.body_part or '-':10} {seq.n_frames:>6}  "
                          f"{job.state.value:14} {'':>8} {'':>9}  {'':9} {job.reason or job.last_error}")
        print(f"\nresults received by the stand-in PACS ({len(received)} objects, {elapsed:.1f} s after the last "
              f"instance was sent): {demo_home / DEMO_PACS_DIR}")
        print("NOT FOR DIAGNOSTIC USE")
        return 0 if all_ok and rows else 1
    finally:
        service.stop()
        pacs.shutdown()
