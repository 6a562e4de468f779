"""The running service: one object that wires listener → assembler → queue → worker → sender.

``medgru serve`` and ``medgru demo`` both build a :class:`Service` from the process's settings. This is
the composition root: the only place that knows every part.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from medgru.settings import Settings

log = logging.getLogger(__name__)

#: how often the service checks that its embedded worker process still runs
WORKER_CHECK_S = 2.0
#: the embedded worker's restart back-off: the first delay, doubled while it keeps dying, up to the maximum
WORKER_RESTART_DELAY_S = 1.0
WORKER_RESTART_MAX_DELAY_S = 60.0
#: how long stopping the service waits for the supervisor thread, which gives a worker it restarted its warm
#: shutdown (WorkerHandle.stop: SIGKILL after 60 s)
WORKER_STOP_JOIN_S = 75.0


class StartError(RuntimeError):
    """A part of the service could not start (its address is taken, not on this machine, not resolved): one
    line that names the part and the address, instead of a traceback that names neither."""


#: what binding a listening socket fails with: the address taken, not this machine's, a port below 1024
_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _bind(part: str, host: str, port: int, start):
    """``start()``, its socket error said as a :class:`StartError` naming ``part`` at ``host:port``. Other
    errors of ``start()`` (a spool folder or a TLS file it cannot read) keep their own words."""
    try:
        return start()
    except OSError as exc:
        bind_error = isinstance(exc, socket.gaierror) or (
            exc.errno in _BIND_ERRNOS and exc.filename is None and not isinstance(exc, ssl.SSLError))
        if not bind_error:
            raise
        raise StartError(f"the {part} cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


@dataclass
class Service:
    settings: Settings
    with_worker: bool = True
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    listener: Any = None
    worker: Any = None
    dashboard: Any = None
    sender: Any = None
    session_factory: Any = None
    celery_app: Any = None
    worker_restarts: int = 0

    def start(self) -> "Service":
        from dispatch.sender import Sender
        from pacs_listener.assembly import Assembler
        from pacs_listener.scp import Listener
        from storage.db import init_db, make_session_factory
        from worker.celery_app import make_celery
        from worker.tasks import StalledJobSweeper, enqueue_job

        s = self.settings
        s.ensure_dirs()
        engine = init_db(s.effective_database_url)
        self.session_factory = sf = make_session_factory(engine)
        self.celery_app = app = make_celery(s)

        if self.with_worker:
            from worker.embedded import recover_orphans, start_worker

            self.worker = start_worker(s)
            recovered = recover_orphans(sf, app, max_retries=s.job_max_retries)
            if recovered:
                log.info("re-enqueued %d unfinished jobs found at start-up", len(recovered) if hasattr(recovered, "__len__") else recovered)

        self.listener = listener = Listener(s, sf)
        _bind("DICOM listener", s.listen_host, s.listen_port, listener.start)
        log.info("listening as %s on %s:%s", s.ae_title, s.listen_host, self.listener.port)

        assembler = Assembler(s, sf, enqueue=lambda job_id: enqueue_job(app, job_id))
        self.sender = sender = Sender(s, sf)
        # a job whose enqueue failed would wait for ever, with or without the embedded worker
        sweeper = StalledJobSweeper(s, sf, app)
        loops = [("assembler", assembler.run_forever), ("sender", sender.run_forever),
                 ("queue-sweeper", sweeper.run_forever),
                 ("quarantine-recorder", self.listener.run_quarantine_recorder)]
        if self.with_worker:
            loops.append(("worker-supervisor", self._supervise_worker))
        if s.retention_days > 0 or s.quarantine_retention_days > 0:
            from storage.retention import run_forever as apply_retention

            loops.append(("retention", lambda stop: apply_retention(s, sf, stop)))
        for name, target in loops:
            t = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

        try:
            from medgru.dashboard import start_dashboard
        except ImportError:
            start_dashboard = None
        if start_dashboard is not None and s.dashboard_port:
            self.dashboard = _bind("dashboard", s.dashboard_host, s.dashboard_port,
                                   lambda: start_dashboard(s, sf, app, health=self.health))
        return self

    def _supervise_worker(self, stop: threading.Event) -> None:
        """Restart the embedded worker whenever its process ends while the service runs (killed for memory,
        a crash), after a back-off that doubles up to a minute while it keeps dying, re-enqueueing the jobs
        it left first (nothing runs them then; a job that used all its attempts fails instead).

        This thread must live as long as the service: a worker is killed when the thread that started it
        ends (PR_SET_PDEATHSIG, :mod:`worker.embedded`). So an error of a restart (the database briefly
        away during the recovery, a failed fork) is logged and the whole restart, recovery included, tried
        again after the back-off; it never ends the thread."""
        from worker.embedded import recover_orphans, start_worker

        delay = WORKER_RESTART_DELAY_S
        started = time.monotonic()
        started_here = None  # the worker this thread started: it is killed the moment this thread ends
        while not stop.wait(WORKER_CHECK_S):
            try:
                worker = self.worker
                if worker.is_alive():
                    if time.monotonic() - started > 60.0:
                        delay = WORKER_RESTART_DELAY_S
                    continue
                log.error("embedded worker %d exited with code %s; restarting it in %g s",
                          worker.pid, worker.process.poll(), delay)
                if stop.wait(delay):
                    break
                delay = min(2 * delay, WORKER_RESTART_MAX_DELAY_S)
                recover_orphans(self.session_factory, self.celery_app, max_retries=self.settings.job_max_retries)
                self.worker = started_here = start_worker(self.settings)
                self.worker_restarts += 1
                started = time.monotonic()
            except Exception:
                log.exception("restarting the embedded worker failed; trying again in %g s", WORKER_CHECK_S + delay)
        if started_here is not None and self.worker is started_here:
            # the service stops: a worker started here would get SIGKILL (ORPHAN_SIGNAL) as this thread ends,
            # in the middle of its job; it is given its warm shutdown (the job finishes) first
            started_here.stop()

    def health(self) -> dict[str, str | None]:
        """Each part of the running service and what is wrong with it (``None``: fine). The dashboard's
        ``/healthz`` answers 503 when any is wrong, for systemd, a load balancer or a watchdog."""
        from pacs_listener.scp import disk_short

        report: dict[str, str | None] = {}
        report["listener"] = None if self.listener is not None and self.listener.listening else "not listening"
        report["disk"] = disk_short(self.settings.spool_dir, self.settings.min_free_disk_mb)
        for t in self._threads:
            report[t.name] = None if t.is_alive() else "thread stopped"
        if self.with_worker:
            if self.worker is None:
                report["worker"] = "not started"
            else:
                code = self.worker.process.poll()
                report["worker"] = None if code is None else f"process {self.worker.pid} exited with code {code}"
        return report

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
        for t in self._threads:  # the supervisor stops the worker it restarted: up to the worker's stop time-out
            t.join(timeout=WORKER_STOP_JOIN_S if t.name == "worker-supervisor" else 10)
        if self.sender is not None:  # a send still in flight: its items are due again at the next start
            try:
                self.sender.release_claims()
            except Exception:  # the database away: they wait for their lease to end instead
                log.exception("could not release the outbox items of the send in flight")
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.worker is not None:
            self.worker.stop()
        log.info("service stopped")
