"""Ingest throughput of our C-STORE listener, side by side with DCMTK storescp and Orthanc.

    python benchmarks/bench_ingest.py [--copies 10] [--rounds 3]

What a PACS admin sizing the service asks: how fast does it take a study in? Every round sends the same
freshly made instances to each peer, one DCMTK ``storescu`` association per peer (``TCP_NODELAY=1``), all
inside a private network namespace (``tests/integration/netns.py``), peers in a rotated order:

* ``storescp``: DCMTK's storage SCP writing each file (``-od``), without fsync: the floor;
* ``orthanc``: the PACS peer (Debian Orthanc, SQLite index, storage on disk, no ``--verbose``);
* ``medgru-sqlite``: our listener (``pacs_listener.scp.Listener``) as the embedded default runs it:
  it parses and validates each instance, writes it (write, fsync, rename) and records it in SQLite
  before it answers Success;
* ``medgru-postgresql``: the same on the machine's PostgreSQL (production), reached by its Unix socket.

The instances are the corpus's Brainix FLAIR series (22 MR images), copied ``--copies`` times with new
study, series and SOP instance UIDs each round. The figure is instances per second from the client's
start to its exit, the median over rounds; ratios are against storescp and Orthanc of the same rounds.
Prints a table and writes ``benchmarks/results/ingest.json``. A benchmark, not a test: these machines
are shared and noisy (the load average is recorded), so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from benchmarks.bench_inference import cpu_model  # noqa: E402
from tests.integration.dcmtk import STORESCU  # noqa: E402
from tests.integration.netns import NetNamespace, stop_process  # noqa: E402
from tests.integration.orthanc import Modality, OrthancServer  # noqa: E402

STORESCP = "/usr/bin/storescp"
SERIES = Path("orthanc-tests/Brainix/Flair")
CLIENT_AET = "BENCH"
POSTGRES_SOCKET_DIR = "/var/run/postgresql"
POSTGRES_ADMIN = f"postgresql+psycopg://postgres@/test?host={POSTGRES_SOCKET_DIR}"


def make_instances(source: Path, folder: Path, copies: int) -> list[Path]:
    """``copies`` copies of the series under ``source``, each with new study, series and instance UIDs."""
    folder.mkdir(parents=True)
    files = sorted(source.glob("*.dcm"))
    out = []
    for c in range(copies):
        study, series = generate_uid(), generate_uid()
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"{c:03d}-{f.name}"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
    return out


def send(ns: NetNamespace, aet: str, port: int, files: list[Path]) -> float:
    """Seconds for one storescu association carrying ``files``; raises if it fails."""
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    done = ns.run([STORESCU, "-aet", CLIENT_AET, "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                  env=env, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


class StoreSCP:
    name = "storescp"

    def __init__(self, ns: NetNamespace, work: Path, port: int) -> None:
        self.ns, self.work, self.port, self.aet = ns, work, port, "STORESCP"
        self.out = work / "received"
        self.out.mkdir(parents=True)
        self.proc = ns.popen([STORESCP, "-aet", self.aet, "-od", str(self.out), str(port)],
                             env=dict(os.environ, TCP_NODELAY="1"))

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        stop_process(self.proc, grace_s=5)


class Orthanc:
    name = "orthanc"

    def __init__(self, ns: NetNamespace, work: Path, port: int) -> None:
        self.aet, self.port = "ORTHANC", port
        self.server = OrthancServer(ns, work, aet=self.aet, dicom_port=port, http_port=port + 1, load_dicomweb=False,
                                    modalities={"bench": Modality(CLIENT_AET, "127.0.0.1", 104)}, verbose=False)
        self.server.start()

    def count(self) -> int:
        return int(self.server.statistics()["CountInstances"])

    def stop(self) -> None:
        self.server.stop()


class Medgru:
    def __init__(self, ns: NetNamespace, work: Path, port: int, database_url: str | None, name: str) -> None:
        from medgru.settings import Settings
        from pacs_listener.scp import Listener
        from storage.db import init_db, make_session_factory

        self.name, self.aet, self.port, self.ns = name, "MEDGRU", port, ns
        settings = Settings(home=work / "home", listen_host="127.0.0.1", listen_port=port, ae_title=self.aet,
                            database_url=database_url, min_free_disk_mb=0)
        settings.ensure_dirs()
        self.engine = init_db(settings.effective_database_url)
        self.sf = make_session_factory(self.engine)
        self.listener = Listener(settings, self.sf)
        ns.call(self.listener.start)  # its sockets live in the namespace

    def count(self) -> int:
        from sqlalchemy import func, select

        from storage.models import Instance

        with self.sf() as s:
            return int(s.scalar(select(func.count(Instance.id))))

    def stop(self) -> None:
        self.ns.call(self.listener.stop)
        self.engine.dispose()


def postgres_database() -> tuple[str, callable]:
    """A fresh database on the machine's PostgreSQL (its Unix socket) and a function that drops it."""
    from sqlalchemy import create_engine, text

    name = f"medgru_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return f"postgresql+psycopg://postgres@/{name}?host={POSTGRES_SOCKET_DIR}", drop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=10, help="copies of the 22-instance series per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("MEDGRU_DATA_ROOT", REPO.parent / "shared" / "data")))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = p.parse_args()
    source = args.data_root / "dicom" / SERIES
    if not source.is_dir():
        sys.exit(f"{source} not found: set MEDGRU_DATA_ROOT or --data-root")

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    pg_url, drop_pg = postgres_database()
    ns = NetNamespace(prefix="bench").create()
    peers = []
    times: dict[str, list[float]] = {}
    try:
        peers = [StoreSCP(ns, tmp / "storescp", 11120), Orthanc(ns, tmp / "orthanc", 11130),
                 Medgru(ns, tmp / "medgru-sqlite", 11140, None, "medgru-sqlite"),
                 Medgru(ns, tmp / "medgru-pg", 11150, pg_url, "medgru-postgresql")]
        time.sleep(1.0)
        n = size = 0
        for r in range(args.rounds):
            files = make_instances(source, tmp / f"round{r}", args.copies)
            n, size = len(files), sum(f.stat().st_size for f in files)
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for peer in order:
                before = peer.count()
                seconds = send(ns, peer.aet, peer.port, files)
                stored = peer.count() - before
                if stored != n:
                    raise RuntimeError(f"{peer.name} stored {stored} of {n} instances in round {r}")
                times.setdefault(peer.name, []).append(seconds)
                print(f"round {r + 1}: {peer.name:18s} {n} instances in {seconds:6.2f} s ({n / seconds:6.1f}/s)",
                      flush=True)
            shutil.rmtree(tmp / f"round{r}")
    finally:
        for peer in peers:
            peer.stop()
        ns.destroy()
        drop_pg()
        shutil.rmtree(tmp, ignore_errors=True)

    rate = {name: n / statistics.median(ts) for name, ts in times.items()}
    rows = {name: {"instances_per_s": round(rate[name], 1), "seconds": [round(t, 3) for t in ts],
                   "x_storescp": round(rate[name] / rate["storescp"], 3),
                   "x_orthanc": round(rate[name] / rate["orthanc"], 3)} for name, ts in times.items()}
    result = {
        "what": "instances per second from storescu's start to its exit (one association, TCP_NODELAY), median "
                "over rounds; every peer gets the same fresh instances each round, in a rotated order",
        "instances_per_round": n, "rounds": args.rounds, "series": str(SERIES),
        "megabytes_per_round": round(size / 1e6, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peers": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'peer':18s} {'inst/s':>8s} {'x storescp':>11s} {'x Orthanc':>10s}")
    for name, row in rows.items():
        print(f"{name:18s} {row['instances_per_s']:8.1f} {row['x_storescp']:11.2f} {row['x_orthanc']:10.2f}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
