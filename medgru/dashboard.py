"""Admin surfaces: a small web dashboard of the job queue and Prometheus metrics.

Served by ``medgru serve`` on ``settings.dashboard_host:dashboard_port`` (stdlib HTTP server, no extra
web framework):

* ``GET /`` — the queue at a glance: counts by state, the outbox, quarantine, and the latest jobs with
  Retry / Cancel buttons;
* ``GET /api/jobs`` — the same jobs as JSON;  ``POST /jobs/<id>/retry`` and ``/jobs/<id>/cancel``;
* ``GET /metrics`` — Prometheus text format, read from the database at scrape time so that workers in
  other processes are counted too;  ``GET /healthz``.

Pages show UIDs, modality and body part, never patient names.
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from storage.models import Job, JobState, OutboxItem, OutboxState, QuarantineItem, Result, SequenceRecord, Series

log = logging.getLogger(__name__)
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


def job_rows(session, limit: int = 100, state: str | None = None) -> list[dict[str, Any]]:
    q = (
        select(Job, SequenceRecord, Series)
        .join(SequenceRecord, Job.sequence_fk == SequenceRecord.id)
        .join(Series, SequenceRecord.series_fk == Series.id)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if state:
        q = q.where(Job.state == JobState(state))
    rows = []
    for job, seq, series in session.execute(q).all():
        res = job.results[-1] if job.results else None
        rows.append({
            "id": job.id,
            "state": job.state.value,
            "attempts": job.attempts,
            "series_uid": series.series_uid,
            "modality": series.modality,
            "body_part": series.body_part,
            "frames": seq.n_frames,
            "score": None if res is None else round(res.score, 4),
            "threshold": None if res is None else round(res.threshold, 4),
            "verdict": None if res is None else ("abnormal" if res.is_anomaly else "normal"),
            "cluster": None if res is None else (res.cluster_label or None),
            "model": f"{job.model_name} {job.model_version}".strip() or None,
            "note": job.reason or job.last_error or "",
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "retry_at": job.retry_at.isoformat() if job.retry_at and job.state is JobState.RETRYING else None,
        })
    return rows


def summary(session) -> dict[str, Any]:
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    outbox = dict(session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
    return {
        "jobs": {s.value: int(jobs.get(s, 0)) for s in JobState},
        "outbox": {s.value: int(outbox.get(s, 0)) for s in OutboxState},
        "quarantine": int(session.scalar(select(func.count()).select_from(QuarantineItem)) or 0),
        "results": int(session.scalar(select(func.count()).select_from(Result)) or 0),
    }


class _DbCollector:
    """Prometheus collector that reads the queue's state from the database at scrape time."""

    def __init__(self, session_factory):
        self._sf = session_factory

    def collect(self):
        with self._sf() as session:
            s = summary(session)
            mean_inf = session.scalar(select(func.avg(Result.inference_seconds)))
        g = GaugeMetricFamily("medgru_jobs", "Inference jobs by state", labels=["state"])
        for state, n in s["jobs"].items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("medgru_outbox_items", "Result objects in the outbox by state", labels=["state"])
        for state, n in s["outbox"].items():
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily("medgru_quarantined_instances", "Instances kept in quarantine", value=s["quarantine"])
        yield GaugeMetricFamily("medgru_results", "Results produced", value=s["results"])
        yield GaugeMetricFamily("medgru_inference_seconds_mean", "Mean inference time per job",
                                value=float(mean_inf or 0.0))


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MedGRU worker</title>
<meta http-equiv="refresh" content="5">
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} h1{{font-size:20px;margin:0 0 4px}}
.sub{{color:#666;margin-bottom:16px}} .cards{{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:18px}}
.card{{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}}
.card b{{display:block;font-size:22px}} table{{border-collapse:collapse;width:100%;font-size:13px}}
th,td{{border-bottom:1px solid #eee;padding:5px 8px;text-align:left}} th{{background:#f6f6f6}}
.state-failed{{color:#b00020;font-weight:600}} .state-succeeded{{color:#1b7a1b}}
.state-not_processed{{color:#8a6d00}} .abnormal{{color:#b00020;font-weight:600}}
form{{display:inline}} button{{font-size:12px}} code{{font-size:11px}}
</style></head><body>
<h1>MedGRU worker — job queue</h1><div class="sub">AE {ae} · listening on port {port} · results to {dest} ·
NOT FOR DIAGNOSTIC USE</div>
<div class="cards">{cards}</div>
<table><tr><th>job</th><th>state</th><th>tries</th><th>modality</th><th>body part</th><th>frames</th>
<th>score</th><th>threshold</th><th>verdict</th><th>model</th><th>series UID</th><th>note</th><th></th></tr>
{rows}</table></body></html>"""


def render_page(settings, session) -> str:
    s = summary(session)
    cards = "".join(f'<div class="card">{html.escape(k)}<b>{v}</b></div>' for k, v in s["jobs"].items())
    cards += f'<div class="card">outbox pending<b>{s["outbox"]["pending"]}</b></div>'
    cards += f'<div class="card">outbox failed<b>{s["outbox"]["failed"]}</b></div>'
    cards += f'<div class="card">quarantined<b>{s["quarantine"]}</b></div>'
    out = []
    for r in job_rows(session):
        actions = ""
        if r["state"] in ("failed", "not_processed", "cancelled"):
            actions += f'<form method="post" action="/jobs/{r["id"]}/retry"><button>Retry</button></form>'
        if r["state"] in ("queued", "retrying"):
            actions += f'<form method="post" action="/jobs/{r["id"]}/cancel"><button>Cancel</button></form>'
        verdict = r["verdict"] or ""
        out.append(
            f'<tr><td>{r["id"]}</td><td class="state-{r["state"]}">{r["state"]}</td><td>{r["attempts"]}</td>'
            f'<td>{html.escape(r["modality"])}</td><td>{html.escape(r["body_part"] or "-")}</td><td>{r["frames"]}</td>'
            f'<td>{"" if r["score"] is None else r["score"]}</td><td>{"" if r["threshold"] is None else r["threshold"]}</td>'
            f'<td class="{verdict}">{verdict}</td><td>{html.escape(r["model"] or "")}</td>'
            f'<td><code>{html.escape(r["series_uid"])}</code></td><td>{html.escape(r["note"][:160])}</td><td>{actions}</td></tr>'
        )
    return _PAGE.format(ae=html.escape(settings.ae_title), port=settings.listen_port,
                        dest=html.escape(str(settings.destination or "(none)")), cards=cards, rows="".join(out))


class DashboardServer:
    def __init__(self, settings, session_factory, retry: Callable[[int], Any], cancel: Callable[[int], Any]):
        self.settings = settings
        self.sf = session_factory
        self.registry = CollectorRegistry()
        self.registry.register(_DbCollector(session_factory))
        handler = self._make_handler(retry, cancel)
        self.httpd = ThreadingHTTPServer((settings.dashboard_host, settings.dashboard_port), handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    def start(self) -> "DashboardServer":
        self._thread.start()
        log.info("dashboard on http://%s:%s/", self.settings.dashboard_host, self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _make_handler(self, retry, cancel):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # route through logging, not stderr
                log.debug("dashboard: " + fmt, *args)

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    return self._send(200, b"ok\n", "text/plain")
                if path == "/metrics":
                    return self._send(200, generate_latest(server.registry), CONTENT_TYPE_METRICS)
                with server.sf() as session:
                    if path == "/api/jobs":
                        body = json.dumps({"summary": summary(session), "jobs": job_rows(session)}).encode()
                        return self._send(200, body, "application/json")
                    if path in ("/", "/index.html"):
                        return self._send(200, render_page(server.settings, session).encode(), "text/html; charset=utf-8")
                return self._send(404, b"not found\n", "text/plain")

            def do_POST(self):
                m = re.fullmatch(r"/jobs/(\d+)/(retry|cancel)", self.path)
                if not m:
                    return self._send(404, b"not found\n", "text/plain")
                job_id, action = int(m[1]), m[2]
                try:
                    (retry if action == "retry" else cancel)(job_id)
                except (KeyError, ValueError) as exc:
                    return self._send(409, f"{action} job {job_id}: {exc}\n".encode(), "text/plain")
                log.info("dashboard: %s job %d", action, job_id)
                return self._send(303, b"", "text/plain", {"Location": "/"})

        return Handler


def start_dashboard(settings, session_factory, celery_app) -> DashboardServer:
    from worker.admin import cancel_job, retry_job

    return DashboardServer(
        settings, session_factory,
        retry=lambda job_id: retry_job(session_factory, celery_app, job_id),
        cancel=lambda job_id: cancel_job(session_factory, job_id),
    ).start()
