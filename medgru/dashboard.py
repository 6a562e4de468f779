"""Admin surfaces: a small web dashboard of the job queue and Prometheus metrics.

Served by ``medgru serve`` on ``settings.dashboard_host:dashboard_port`` (stdlib HTTP server, no extra
web framework):

* ``GET /`` — the queue at a glance: counts by state (each a link to the jobs in that state,
  ``/?state=failed``), the latest jobs with Retry / Cancel buttons, the outbox items that are not sent
  (failed ones with a Resend button), the latest quarantined instances with the status we answered
  and why, and the ABNORMAL verdicts by model and sender;
* ``GET /jobs/<id>`` — one job in detail (as ``medgru jobs show``): times, errors, its UIDs, results and
  where its SR and SC are, and the overlay as the PACS received it (``GET /jobs/<id>/overlay.png``, the
  SC's pixels read from its outbox file: the caption and heat map, no patient attribute);
* ``POST /echo`` — the "Check the PACS" button: ``medgru echo`` for every configured PACS, as a page;
* ``GET /?q=<uid>`` and ``/api/jobs?q=`` — the jobs of a series, study, accession number or SOP instance;
* ``GET /api/jobs`` (``?state=``), ``/api/outbox`` (``?state=``), ``/api/quarantine`` and
  ``/api/verdicts`` (ABNORMAL verdicts by model and sender, :mod:`worker.monitoring`) — the same as JSON;  ``POST /jobs/<id>/retry``, ``/jobs/<id>/cancel``, ``/outbox/<id>/resend`` and
  ``/quarantine/<id>/retry`` (``medgru quarantine retry``);
* ``GET /metrics`` — Prometheus text format, read from the database at scrape time so that workers in
  other processes are counted too (see :class:`_DbCollector`), and ``medgru_up{part}``, what ``/healthz``
  finds of each part (:class:`_HealthCollector`; it answers with the database away);  ``GET /healthz`` — 200 when the database
  answers and every part of the service is running (listener, assembler, sender, worker), else 503 with
  what is wrong, one line per part.

Pages show UIDs, modality and body part, never patient names. With ``settings.dashboard_password`` set
every path but ``/healthz`` asks for HTTP Basic authentication (user ``settings.dashboard_user``); the
settings refuse a non-loopback ``dashboard_host`` without one; ten wrong passwords from one address within a
minute lock that address out for a minute (429, :class:`LoginThrottle`). The actions are plain form POSTs; one
whose ``Origin`` (or, without one, ``Sec-Fetch-Site``) says it came from another site is refused with
403, so that a page elsewhere cannot make an admin's browser retry or re-send (cross-site request forgery).
Every request but ``/healthz`` whose ``Host`` is not a name the dashboard is served as is refused with 421
(:func:`misdirected`): a page whose own name the attacker re-points at this machine (DNS rebinding) is
same-origin with the dashboard as far as the browser knows, and only its ``Host`` gives it away. The names
are ``dashboard_host``, loopback names and addresses, on ``0.0.0.0`` this machine's name, FQDN and the
address a request came in on, and those listed in ``settings.dashboard_allowed_hosts`` (a reverse proxy's).
No response may be framed by another page (``X-Frame-Options``, CSP ``frame-ancestors``): a click on an
invisible frame of the dashboard would post with the dashboard's own ``Origin`` (clickjacking).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from datetime import timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sqlalchemy import func, select

from dispatch.admin import outbox_rows, resend_item
from medgru.settings import is_loopback
from medgru.tables import MAX_ROW_ID, when_iso
from medgru.tls import dashboard_context
from pacs_listener.quarantine import quarantine_rows
from pacs_listener.status import refused_for_our_fault
from worker.admin import job_rows, series_without_jobs
from worker.monitoring import DEFAULT_RECENT, verdict_rows
from storage.db import database_unreachable, error_line
from storage.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    QuarantineItem,
    Result,
    utcnow,
)

log = logging.getLogger(__name__)
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"

#: sent with every response: no page elsewhere may frame the dashboard (clickjacking: the admin's click on
#: an invisible frame would post with the dashboard's own Origin), no body is sniffed as another type, and
#: nothing is kept in the browser's cache (the overlay PNG is a patient's image, the pages name studies:
#: on a shared workstation they stayed on disk after the admin had gone)
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def summary(session) -> dict[str, Any]:
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    outbox = dict(session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
    return {
        "jobs": {s.value: int(jobs.get(s, 0)) for s in JobState},
        "outbox": {s.value: int(outbox.get(s, 0)) for s in OutboxState},
        # files still held in quarantine: not stored since by a retry, not removed by retention
        "quarantine": int(session.scalar(select(func.count()).select_from(QuarantineItem).where(
            QuarantineItem.released_at.is_(None), QuarantineItem.purged_at.is_(None))) or 0),
        # every instance ever refused (rows are never deleted, so this only grows)
        "refused": int(session.scalar(select(func.count()).select_from(QuarantineItem)) or 0),
        "results": int(session.scalar(select(func.count()).select_from(Result)) or 0),
    }


#: job states in which a job waits for a worker (the oldest of them is the queue's lag)
WAITING_STATES = (JobState.QUEUED, JobState.RETRYING)


def _age_seconds(oldest, now) -> float:
    """Seconds since ``oldest`` (a stored UTC time, naive or aware), 0 when there is none."""
    if oldest is None:
        return 0.0
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return max(0.0, (now - oldest).total_seconds())


class _DbCollector:
    """Prometheus collector that reads the queue's state from the database at scrape time.

    Besides counts by state it exports what an alert needs: how long the oldest waiting job and the oldest
    unsent result have waited (a stalled worker or an unreachable PACS), and the mean inference time.
    Whatever is read from the results is a gauge, not a counter or summary: a re-run replaces a job's result
    (:mod:`worker.pipeline` deletes the old one), so a verdict count or the inference time's sum can go
    down, which Prometheus would take for a counter's reset."""

    def __init__(self, session_factory):
        self._sf = session_factory

    def collect(self):
        try:
            yield from self._collect()
        except Exception as exc:  # the database away: the rest of /metrics (medgru_up says so) still answers
            log.warning("/metrics: the database's figures are left out: %s: %s", type(exc).__name__,
                        error_line(exc)[:200])

    def _collect(self):
        now = utcnow()
        with self._sf() as session:
            s = summary(session)
            n_inf, sum_inf = session.execute(
                select(func.count(Result.inference_seconds), func.sum(Result.inference_seconds))).one()
            # since it was last queued: a job an admin retried after days has not waited for days
            oldest_job = session.scalar(select(func.min(func.coalesce(Job.queued_at, Job.created_at)))
                                        .where(Job.state.in_(WAITING_STATES)))
            # the latest failure still standing (a job an admin retried is no longer FAILED)
            latest_failure = session.scalar(select(func.max(Job.finished_at)).where(Job.state == JobState.FAILED))
            instances = session.scalar(select(func.count()).select_from(Instance)) or 0
            by_destination = session.execute(
                select(OutboxItem.destination, OutboxItem.state, func.count(), func.min(OutboxItem.created_at))
                .where(OutboxItem.state.in_((OutboxState.PENDING, OutboxState.FAILED)))
                .group_by(OutboxItem.destination, OutboxItem.state)).all()
            verdicts = verdict_rows(session)
        g = GaugeMetricFamily("medgru_jobs", "Inference jobs by state", labels=["state"])
        for state, n in s["jobs"].items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("medgru_outbox_items", "Result objects in the outbox by state", labels=["state"])
        for state, n in s["outbox"].items():
            g.add_metric([state], n)
        yield g
        # per destination (several PACS with settings.routes): which one does not take our results
        unsent = GaugeMetricFamily("medgru_destination_unsent_results",
                                   "Result objects not yet in the PACS, by destination and state", labels=["destination", "state"])
        oldest = GaugeMetricFamily("medgru_destination_oldest_unsent_result_age_seconds",
                                   "Age of the oldest pending result object, by destination", labels=["destination"])
        pending_since = []
        for destination, state, n, first in by_destination:
            unsent.add_metric([destination or "(none)", state.value], n)
            if state is OutboxState.PENDING:
                oldest.add_metric([destination or "(none)"], _age_seconds(first, now))
                pending_since.append(first)
        yield unsent
        yield oldest
        yield GaugeMetricFamily("medgru_quarantined_instances",
                                "Refused instances whose file is still held in quarantine (not stored by a retry, "
                                "not removed by retention)", value=s["quarantine"])
        yield CounterMetricFamily("medgru_refused_instances", "Instances the listener quarantined: refused, or a "
                                  "resend whose content differs from the stored copy", value=s["refused"])
        yield GaugeMetricFamily("medgru_stored_instances", "Instances received and stored", value=int(instances))
        yield GaugeMetricFamily("medgru_results", "Results produced", value=s["results"])
        yield GaugeMetricFamily("medgru_oldest_waiting_job_age_seconds",
                                "Age of the oldest queued or retrying job since it was last queued (0 when none "
                                "waits)",
                                value=_age_seconds(oldest_job, now))
        if latest_failure is not None and latest_failure.tzinfo is None:
            latest_failure = latest_failure.replace(tzinfo=timezone.utc)
        yield GaugeMetricFamily("medgru_latest_job_failure_timestamp_seconds",
                                "When the latest job still FAILED failed (Unix time; 0 when none is): the "
                                "failed-jobs alert reads it, since a retry lowers medgru_jobs{state=\"failed\"} "
                                "and hid a failure in the same hour from delta()",
                                value=latest_failure.timestamp() if latest_failure is not None else 0.0)
        yield GaugeMetricFamily("medgru_oldest_unsent_result_age_seconds",
                                "Age of the oldest pending outbox item (0 when all are sent)",
                                value=_age_seconds(min(pending_since, default=None), now))
        # verdicts by model and sender: a share of ABNORMAL that moves is a site whose images changed
        labels = ["model", "version", "sender"]
        total = GaugeMetricFamily("medgru_verdicts", "Results by model, sender and verdict (a job's latest "
                                  "result: a re-run replaces it)", labels=[*labels, "verdict"])
        share = GaugeMetricFamily("medgru_recent_abnormal_share", "Share of ABNORMAL verdicts among the latest "
                                  f"{DEFAULT_RECENT} results of a model and sender", labels=labels)
        recent = GaugeMetricFamily("medgru_recent_results", "How many results medgru_recent_abnormal_share is "
                                   f"taken over (at most {DEFAULT_RECENT})", labels=labels)
        for r in verdicts:
            key = [r.model, r.version, r.sender or "(unknown)"]
            total.add_metric([*key, "abnormal"], r.abnormal)
            total.add_metric([*key, "normal"], r.results - r.abnormal)
            share.add_metric(key, r.recent_share)
            recent.add_metric(key, r.recent)
        yield total
        yield share
        yield recent
        yield GaugeMetricFamily("medgru_inference_seconds_mean",
                                "Mean inference time per job (of each job's latest result)",
                                value=float(sum_inf / n_inf) if n_inf else 0.0)


class _HealthCollector:
    """``medgru_up{part}``: 1 where ``/healthz`` finds a part of the service fine, 0 where it does not (the
    database, the listener, the spool's disk, each loop, the embedded worker), so that an alert can tell a
    part that stopped: with the assembler's thread ended no job is ever made, and no other figure moves."""

    def __init__(self, session_factory, health: Callable[[], dict[str, str | None]] | None):
        self._sf, self._health = session_factory, health

    def collect(self):
        g = GaugeMetricFamily("medgru_up", "1 where /healthz finds this part of the service fine, 0 where not "
                              "(/healthz says why)", labels=["part"])
        for part, problem in health_parts(self._sf, self._health).items():
            g.add_metric([part], 0.0 if problem else 1.0)
        yield g


class _DiskCollector:
    """Free space on the spool's disk, and the floor below which the listener refuses instances."""

    def __init__(self, settings):
        self._settings = settings

    def collect(self):
        import shutil

        try:
            free = shutil.disk_usage(self._settings.spool_dir).free
        except OSError:
            return
        yield GaugeMetricFamily("medgru_spool_disk_free_bytes", "Free space on the spool's disk", value=free)
        yield GaugeMetricFamily("medgru_spool_disk_min_free_bytes",
                                "Below this the listener answers 0xA700 (min_free_disk_mb)",
                                value=self._settings.min_free_disk_mb * 1e6)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MedGRU worker</title>
<noscript><meta http-equiv="refresh" content="5"></noscript>
<script>
// every 5 s, as a meta refresh did, but not while the admin types in the search box: the refresh emptied it
setInterval(function () {{
  var q = document.querySelector('input[name=q]');
  if (!q || (document.activeElement !== q && q.value === q.defaultValue)) location.reload();
}}, 5000);
</script>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} h1{{font-size:20px;margin:0 0 4px}}
h2{{font-size:16px;margin:22px 0 6px}} .sub{{color:#666;margin-bottom:16px}}
.cards{{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:18px}}
.card{{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px;color:#222;text-decoration:none}}
a.card:hover{{border-color:#888}} .card.on{{border-color:#222;background:#f6f6f6}} .card.alert b{{color:#b00020}}
.card b{{display:block;font-size:22px}} table{{border-collapse:collapse;width:100%;font-size:13px}}
th,td{{border-bottom:1px solid #eee;padding:5px 8px;text-align:left}} th{{background:#f6f6f6}}
td code,td.note{{overflow-wrap:anywhere}} td:last-child{{white-space:nowrap}}
.state-failed{{color:#b00020;font-weight:600}} .state-succeeded{{color:#1b7a1b}}
.state-not_processed{{color:#8a6d00}} .abnormal{{color:#b00020;font-weight:600}} .none{{color:#888}}
form{{display:inline}} button{{font-size:12px}} code{{font-size:11px}} form.find{{display:block;margin:4px 0 0}}
</style></head><body>
<h1>MedGRU worker — job queue</h1><div class="sub">AE {ae} · listening on port {port} · results to {dest}
<form method="post" action="/echo"><button title="C-ECHO each PACS and check it accepts our SR and SC">Check the
PACS</button></form> · NOT FOR DIAGNOSTIC USE</div>
<div class="cards">{cards}</div>
<form method="get" action="/" class="find"><input name="q" size="60" value="{find}"
placeholder="series / study UID, accession number or SOP instance UID"> <button>Find</button></form>
<h2>{jobs_title}</h2>
<table><tr><th>job</th><th>state</th><th>tries</th><th>modality</th><th>body part</th><th>frames</th>
<th>score</th><th>threshold</th><th>verdict</th><th title="SR and SC stored in the PACS">in PACS</th><th>model</th><th>series UID</th><th>note</th><th></th></tr>
{rows}</table>
<h2 id="outbox">Outbox: results not yet in the PACS</h2>
{outbox}
<h2 id="quarantine">Quarantine: the latest instances we refused</h2>
{quarantine}
<h2 id="verdicts">Verdicts by model and sender</h2>
<div class="sub">A share of ABNORMAL that moves for one sender is a sign that its images changed (device,
protocol, processing): the threshold was calibrated at a false-positive rate on other normals.
<code>medgru calibrate</code> re-sets it on that site's normals.</div>
{verdicts}
</body></html>"""

#: rows of the outbox and quarantine tables on the page (the CLI and the JSON API list more)
PAGE_SECTION_ROWS = 20
#: jobs on one page of the dashboard (and of /api/jobs); older ones on the next page (``?before=<id>``)
PAGE_JOB_ROWS = 100


def _note_cell(text: str, limit: int, suffix: str = "") -> str:
    """A table cell of ``text`` cut to ``limit`` characters: a cut one ends in an ellipsis and shows the
    whole text on hover (it was cut mid-sentence without a sign: "...`medgru calibrate` on")."""
    text = text or ""
    if len(text) <= limit:
        return f'<td class="note">{html.escape(text)}{suffix}</td>'
    return f'<td class="note" title="{html.escape(text)}">{html.escape(text[:limit].rstrip())}…{suffix}</td>'


def _outbox_table(items: list[dict[str, Any]]) -> str:
    if not items:
        return '<p class="none">Every result has been sent.</p>'
    out = ['<table><tr><th>item</th><th>state</th><th>object</th><th>job</th><th>destination</th><th>tries</th>'
           '<th>next try (UTC)</th><th>SOP instance UID</th><th>last error</th><th></th></tr>']
    for r in items:
        action = (f'<form method="post" action="/outbox/{r["id"]}/resend"><button>Resend</button></form>'
                  if r["state"] == OutboxState.FAILED.value else "")
        out.append(
            f'<tr><td>{r["id"]}</td><td class="state-{r["state"]}">{r["state"]}</td>'
            f'<td>{html.escape(r["kind"])}</td><td>{"" if r["job"] is None else r["job"]}</td>'
            f'<td>{html.escape(r["destination"] or "(none set)")}</td><td>{r["attempts"]}</td>'
            f'<td>{when_iso(r["next_attempt_at"])}</td><td><code>{html.escape(r["sop_instance_uid"])}</code></td>'
            f'{_note_cell(r["last_error"], 160)}<td>{action}</td></tr>')
    return "".join(out) + "</table>"


def retry_quarantined_item(settings, session_factory, item_id: int) -> None:
    """The quarantine's Retry button (:func:`pacs_listener.reingest.retry_quarantined` of one item);
    ``ValueError`` with the reason when it is not stored."""
    from pacs_listener.reingest import retry_quarantined

    [outcome] = retry_quarantined(settings, session_factory, [item_id])
    if not outcome.stored:
        raise ValueError(outcome.message)


def _quarantine_table(items: list[dict[str, Any]]) -> str:
    if not items:
        return '<p class="none">Nothing refused.</p>'
    out = ['<table><tr><th>item</th><th>received (UTC)</th><th>calling AE</th><th>answered</th>'
           '<th>SOP instance UID</th><th>reason</th><th></th></tr>']
    for r in items:
        ours = refused_for_our_fault(r["status_code"])  # data faults: the sender must fix them, no button
        action = ("" if r["released_at"] or r["purged_at"] or not ours else
                  f'<form method="post" action="/quarantine/{r["id"]}/retry"><button title="store the kept file '
                  f'after all, once the fault on our side is fixed">Retry</button></form>')
        out.append(
            f'<tr><td>{r["id"]}</td><td>{when_iso(r["received_at"])}</td><td>{html.escape(r["calling_ae"])}</td>'
            f'<td>{html.escape(r["status"])}</td><td><code>{html.escape(r["sop_instance_uid"])}</code></td>'
            f'{_note_cell(r["reason"], 200, " (stored later by a retry)" if r["released_at"] else "")}'
            f'<td>{action}</td></tr>')
    return "".join(out) + "</table>"


def _verdicts_table(rows) -> str:
    if not rows:
        return '<p class="none">No results yet.</p>'
    out = ['<table><tr><th>model</th><th>sender</th><th>results</th><th>ABNORMAL</th>'
           f'<th>ABNORMAL in the latest {DEFAULT_RECENT}</th><th>last result (UTC)</th></tr>']
    for r in rows:
        out.append(
            f'<tr><td>{html.escape(f"{r.model} {r.version}")}</td><td>{html.escape(r.sender or "(unknown)")}</td>'
            f'<td>{r.results}</td><td>{r.abnormal} ({r.share:.0%})</td>'
            f'<td>{r.recent_abnormal} of {r.recent} ({r.recent_share:.0%})</td>'
            f'<td>{when_iso(r.last_at.isoformat() if r.last_at else None)}</td></tr>')
    return "".join(out) + "</table>"


def _job_buttons(job_id: int, state: JobState) -> str:
    """The Retry / Cancel forms that the job's state allows (:data:`worker.admin.RETRYABLE`, ``CANCELLABLE``)."""
    from worker.admin import CANCELLABLE, RETRYABLE

    if state in RETRYABLE:
        return f'<form method="post" action="/jobs/{job_id}/retry"><button>Retry</button></form>'
    if state in CANCELLABLE:
        return f'<form method="post" action="/jobs/{job_id}/cancel"><button>Cancel</button></form>'
    return ""


def _jobs_heading(s, rows, more: bool, state: str | None, find: str | None, before: int | None) -> str:
    """The title of the jobs table: which jobs, how many of how many, and links to older and newest ones.
    A filter's page showed the latest 100 of 300 failed jobs as if they were all of them, and the other
    200 could not be reached."""
    from urllib.parse import urlencode

    title = f"Jobs: {html.escape(state)}" if state else "Jobs"
    if find:
        title += f" of {html.escape(find)}"
    if before is not None:
        title += f", older than job {before}"
    if find or before is not None:
        title += f" ({len(rows)}{' shown, more below' if more else ''})" if rows else ""
    else:
        total = s["jobs"][state] if state else sum(s["jobs"].values())
        title += f" (the latest {len(rows)} of {total})" if more or total > len(rows) else f" ({total})"
    links = []
    base = {k: v for k, v in (("state", state), ("q", find)) if v}
    if before is not None:
        links.append(f'<a href="/?{html.escape(urlencode(base))}">newest</a>')
    if more and rows:
        links.append(f'<a href="/?{html.escape(urlencode(base | {"before": rows[-1]["id"]}))}">older jobs</a>')
    return title + (f' <span class="sub">{" · ".join(links)}</span>' if links else "")


def render_page(settings, session, state: str | None = None, find: str | None = None,
                before: int | None = None) -> str:
    s = summary(session)
    cards = "".join(
        f'<a class="card{" on" if k == state else ""}{" alert" if k == "failed" and v else ""}" '
        f'href="/?state={html.escape(k)}">{html.escape(k)}<b>{v}</b></a>' for k, v in s["jobs"].items())
    if state:
        cards += '<a class="card" href="/">all jobs<b>&nbsp;</b></a>'
    cards += f'<a class="card" href="#outbox">outbox pending<b>{s["outbox"]["pending"]}</b></a>'
    failed_cls = " alert" if s["outbox"]["failed"] else ""
    cards += f'<a class="card{failed_cls}" href="#outbox">outbox failed<b>{s["outbox"]["failed"]}</b></a>'
    cards += f'<a class="card" href="#quarantine">quarantined<b>{s["quarantine"]}</b></a>'
    out = []
    rows = job_rows(session, state=state, find=find, before=before, limit=PAGE_JOB_ROWS + 1)
    more, rows = len(rows) > PAGE_JOB_ROWS, rows[:PAGE_JOB_ROWS]
    for r in rows:
        actions = _job_buttons(r["id"], JobState(r["state"]))
        verdict = r["verdict"] or ""
        out.append(
            f'<tr><td><a href="/jobs/{r["id"]}">{r["id"]}</a></td><td class="state-{r["state"]}">{r["state"]}</td>'
            f'<td>{r["attempts"]}</td>'
            f'<td>{html.escape(r["modality"])}</td><td>{html.escape(r["body_part"] or "-")}</td><td>{r["frames"]}</td>'
            f'<td>{"" if r["score"] is None else r["score"]}</td><td>{"" if r["threshold"] is None else r["threshold"]}</td>'
            f'<td class="{verdict}">{verdict}</td><td>{html.escape(r["in_pacs"] or "")}</td>'
            f'<td>{html.escape(r["model"] or "")}</td>'
            f'<td><code>{html.escape(r["series_uid"])}</code></td>{_note_cell(r["note"], 160)}<td>{actions}</td></tr>'
        )
    unsent = outbox_rows(session, states=(OutboxState.FAILED, OutboxState.PENDING), limit=PAGE_SECTION_ROWS)
    unsent.sort(key=lambda r: r["state"] != OutboxState.FAILED.value)  # failed first, each newest first
    jobs_title = _jobs_heading(s, rows, more, state, find, before)
    skipped = series_without_jobs(session, find) if find else []
    if find and not out:
        out.append('<tr><td colspan="14" class="none">No job for this series, study, accession number or '
                   'SOP instance.</td></tr>')
    for x in skipped:  # received, and skipped for a reason (or still receiving): say so, with the reason
        out.append(f'<tr><td colspan="14" class="none">Series <code>{html.escape(x["series_uid"])}</code> '
                   f'({html.escape(x["modality"] or "-")}), received without a job: {html.escape(x["state"])}'
                   f'{": " + html.escape(x["reason"]) if x["reason"] else ""}</td></tr>')
    return _PAGE.format(ae=html.escape(settings.ae_title), port=settings.listen_port,
                        dest=html.escape(str(settings.destination or "(none)") + "".join(
                            f", from {ae} to {d}" for ae, d in settings.routes.items())), cards=cards, rows="".join(out),
                        jobs_title=jobs_title, outbox=_outbox_table(unsent), find=html.escape(find or "", quote=True),
                        quarantine=_quarantine_table(quarantine_rows(session, limit=PAGE_SECTION_ROWS)),
                        verdicts=_verdicts_table(verdict_rows(session)))


_JOB_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MedGRU worker — job {job_id}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} h1{{font-size:20px;margin:0 0 12px}}
table{{border-collapse:collapse;font-size:13px}} th,td{{border-bottom:1px solid #eee;padding:5px 10px;text-align:left;
vertical-align:top}} th{{color:#555;font-weight:600;white-space:nowrap}} code{{font-size:12px}}
form{{display:inline;margin-right:8px}} .sub{{color:#666;margin-bottom:14px}} h2{{font-size:16px;margin:18px 0 8px}}
img{{max-width:100%;border:1px solid #ddd}}
</style></head><body><h1>Job {job_id}</h1>
<div class="sub"><a href="/">back to the queue</a> · times in UTC · NOT FOR DIAGNOSTIC USE</div>
<table>{rows}</table><p>{actions}</p>{overlay}</body></html>"""


_ECHO_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MedGRU worker — PACS check</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} h1{{font-size:20px;margin:0 0 12px}}
.sub{{color:#666;margin-bottom:14px}} pre{{border-left:4px solid #1b7a1b;padding:6px 12px;background:#f6f6f6}}
pre.failed{{border-color:#b00020}}
</style></head><body><h1>PACS check</h1>
<div class="sub"><a href="/">back to the queue</a> · one association per peer, as the sender opens it (medgru echo)</div>
{reports}</body></html>"""


def render_echo_page(settings, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO each configured PACS and check the SOP classes of our results (:mod:`dispatch.verify`):
    (all ok, the page)."""
    from dispatch.verify import verify_configured

    reports = verify_configured(settings, timeout=timeout)
    if not reports:
        return False, _ECHO_PAGE.format(reports="<p>No destination is configured (MEDGRU_DESTINATION, MEDGRU_ROUTES).</p>")
    blocks = "".join(f'<pre class="{"ok" if r.ok else "failed"}">[{html.escape(why)}] '
                     f'{html.escape(chr(10).join(r.lines()))}</pre>' for why, r in reports)
    return all(r.ok for _, r in reports), _ECHO_PAGE.format(reports=blocks)


def overlay_item(session, job_id: int) -> OutboxItem | None:
    """The outbox item of the Grad-CAM overlay SC of the job's latest result, or ``None`` (no result yet, or
    a result without SC)."""
    result = session.scalars(select(Result).where(Result.job_fk == job_id, Result.sc_sop_instance_uid != "")
                             .order_by(Result.id.desc()).limit(1)).first()
    if result is None:
        return None
    return session.scalars(select(OutboxItem).where(OutboxItem.sop_instance_uid == result.sc_sop_instance_uid)).first()


def overlay_png(session, outbox_dir: Path, job_id: int) -> bytes:
    """The job's overlay SC (what the PACS shows) as PNG, read from its outbox file. ``KeyError`` naming why
    there is none: no such job, no overlay, or its file removed by retention."""
    from io import BytesIO

    import pydicom
    from PIL import Image

    if session.get(Job, job_id) is None:
        raise KeyError(f"no job {job_id}")
    item = overlay_item(session, job_id)
    if item is None:
        raise KeyError(f"job {job_id} has no overlay")
    path = outbox_dir / item.path
    if item.purged_at is not None or not path.is_file():
        raise KeyError(f"the overlay of job {job_id} ({item.sop_instance_uid}) was removed from the outbox folder")
    pixels = pydicom.dcmread(path).pixel_array
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # (H, W, 3) uint8: RGB
    return buffer.getvalue()


def render_job_page(session, job_id: int) -> str:
    """One job in detail (the fields of ``medgru jobs show``), with its Retry / Cancel button and its
    overlay as the PACS received it; ``KeyError`` if there is no such job."""
    from worker.admin import job_fields

    fields = job_fields(session, job_id)
    actions = _job_buttons(job_id, session.get(Job, job_id).state)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>"
                   if "UID" in k or k in ("outbox", "celery task") else
                   f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in fields)
    item = overlay_item(session, job_id)
    if item is None:
        overlay = ""
    elif item.purged_at is not None:
        overlay = '<p class="sub">Overlay: its file was removed by retention (the PACS has it).</p>'
    else:
        overlay = (f'<h2>Overlay (Secondary Capture <code>{html.escape(item.sop_instance_uid)}</code>)</h2>'
                   f'<img src="/jobs/{job_id}/overlay.png" alt="Grad-CAM overlay of job {job_id}">')
    return _JOB_PAGE.format(job_id=job_id, rows=rows, actions=actions, overlay=overlay)


def cross_site(headers) -> str | None:
    """Why a POST with these request headers comes from another site, or ``None`` if it does not.

    A browser sends ``Origin`` with every form POST; it must name the host the request was sent to. Where
    there is no ``Origin`` (older browsers), ``Sec-Fetch-Site`` must not be ``cross-site`` or ``same-site``
    (another origin of the same site: another port of this host), and a ``Referer`` must name this host:
    a browser that sent no ``Origin`` still said where the form was, and a page elsewhere was served.
    Clients that send none of them (curl, scripts on the admin's machine) are allowed."""
    host = headers.get("Host", "")
    origin = headers.get("Origin")
    if origin is not None:
        netloc = urlsplit(origin).netloc if origin != "null" else ""
        if not netloc or netloc.lower() != host.lower():
            return f"Origin {origin[:100]!r} is not this dashboard ({host[:100]})"
        return None
    site = headers.get("Sec-Fetch-Site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site is {site}"
    referer = headers.get("Referer")
    if referer is not None:
        try:
            netloc = urlsplit(referer).netloc
        except ValueError:
            netloc = ""
        if not netloc or netloc.lower() != host.lower():
            return f"Referer {referer[:100]!r} is not this dashboard ({host[:100]})"
    return None


#: ``dashboard_host`` values that listen on every interface (the machine's names are the dashboard's then)
ALL_INTERFACES = ("0.0.0.0", "::", "")


def host_name(host: str) -> str:
    """The name in a ``Host`` header (or a configured host): lower case, without its port, the brackets of
    an IPv6 literal or a trailing dot. Anything malformed comes back as it is, and so matches no name."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        return name if bracket and rest[:1] in ("", ":") else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def served_names(settings) -> frozenset[str]:
    """The names besides loopback ones that the dashboard answers to: ``dashboard_host`` (on every
    interface, this machine's host name and FQDN instead) and ``dashboard_allowed_hosts``."""
    names = {host_name(h) for h in settings.dashboard_allowed_hosts}
    if settings.dashboard_host.strip("[] ") in ALL_INTERFACES:
        names |= {host_name(socket.gethostname()), host_name(socket.getfqdn())}
    else:
        names.add(host_name(settings.dashboard_host))
    return frozenset(names - {""})


def _same_address(name: str, address: str) -> bool:
    """Whether ``name`` is an address literal equal to ``address`` (an IPv6 one may carry a ``%zone``)."""
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False


def misdirected(host: str | None, names: frozenset[str], local_address: str) -> str | None:
    """Why a request with this ``Host`` header is not for this dashboard, or ``None`` if it is.

    DNS rebinding: a page on ``http://attacker.example:PORT`` whose name the attacker then points at
    127.0.0.1 reaches the dashboard from the admin's browser, with ``Origin`` and ``Host`` both naming
    attacker.example, so :func:`cross_site` sees nothing wrong. The ``Host`` must be one of ``names``, a
    loopback name or address, or the address the request came in on (``local_address``: an address
    literal cannot be rebound, and this one reached us)."""
    name = host_name(host or "")
    if name and (name in names or is_loopback(name) or _same_address(name, local_address)):
        return None
    return (f"Host {(host or '')[:100]!r} is not a name this dashboard is served as (dashboard_host, "
            "loopback, MEDGRU_DASHBOARD_ALLOWED_HOSTS)")


def check_basic_auth(header: str, user: str, password: str) -> bool:
    """Whether an ``Authorization: Basic …`` header carries ``user`` and ``password`` (constant-time compare)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, f"{user}:{password}".encode())


def basic_auth_user(header: str) -> str:
    """The user name an ``Authorization: Basic`` header gives (at most 64 characters), for the log; ``""``
    when there is none."""
    scheme, _, token = header.partition(" ")
    try:
        given = base64.b64decode(token.strip(), validate=True) if scheme.lower() == "basic" else b""
    except (binascii.Error, ValueError):
        return ""
    return given.partition(b":")[0].decode("utf-8", "replace")[:64]


def _state_param(query: str, allowed: set[str]) -> tuple[str | None, str | None]:
    """``(state, error)`` from a ``?state=`` query string."""
    values = parse_qs(query).get("state", [])
    if not values or not values[0]:
        return None, None
    if values[0] not in allowed:
        return None, f"unknown state {values[0]!r}; one of {sorted(allowed)}"
    return values[0], None


#: a row id in a path; one above MAX_ROW_ID (:mod:`medgru.tables`) is not found: the driver would raise and
#: the connection drop with no answer
ID = r"(\d{1,10})"

_JOB_STATES = {s.value for s in JobState}
_OUTBOX_STATES = {s.value for s in OutboxState}


#: seconds a dashboard connection may stay silent (a request not sent in full, a TLS handshake not finished)
#: before it is closed; without it every such connection held a thread and a file descriptor for ever
REQUEST_TIMEOUT_S = 30.0
#: connections served at once; more are refused at once (503 on plain HTTP). A client that opened a
#: thousand silent connections used up the process's file descriptors (1024 under systemd's default), and
#: the DICOM listener, the database and /healthz failed with it
MAX_CONNECTIONS = 64
#: connections of one address served at once: one host's silent or trickling connections (the timeout is
#: per read) filled all the others' slots, and /healthz answered 503 to systemd and the load balancer
MAX_CONNECTIONS_PER_ADDRESS = 16
#: wrong passwords from one address within FAILED_LOGIN_WINDOW_S before that address is refused (429, its
#: password not even checked) for LOGIN_LOCKOUT_S: without a limit a script could try passwords as fast as
#: the dashboard answered (hundreds a second)
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW_S = 60.0
LOGIN_LOCKOUT_S = 60.0


class LoginThrottle:
    """Counts wrong passwords per client address and locks an address out for a while after too many.

    The lock-out refuses the address's requests before their password is checked, so guesses cannot go on
    during it; the right password then also waits (an admin behind the same proxy as the guesser waits a
    minute, which is the cost of the limit). Memory is bounded: addresses whose window and lock-out are over
    are forgotten, and at most ``max_addresses`` are kept (the oldest dropped first)."""

    def __init__(self, max_failures: int = MAX_FAILED_LOGINS, window_s: float = FAILED_LOGIN_WINDOW_S,
                 lockout_s: float = LOGIN_LOCKOUT_S, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 4096):
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self.clock, self.max_addresses = clock, max_addresses
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}  # address -> times of its recent wrong passwords
        self._locked_until: dict[str, float] = {}

    def locked_for(self, address: str) -> float:
        """Seconds the address is still refused for (0 where it is not)."""
        with self._lock:
            until = self._locked_until.get(address)
            if until is None:
                return 0.0
            left = until - self.clock()
            if left <= 0:
                del self._locked_until[address]
                return 0.0
            return left

    def failed(self, address: str) -> bool:
        """Records a wrong password from ``address``; True where this one locks the address out."""
        with self._lock:
            now = self.clock()
            recent = [t for t in self._failures.get(address, ()) if now - t < self.window_s] + [now]
            self._failures.pop(address, None)  # re-inserted last: the dict's order is the age of its entries
            if len(recent) < self.max_failures:
                self._failures[address] = recent
                self._forget_old(now)
                return False
            self._locked_until[address] = now + self.lockout_s
            self._forget_old(now)
            return True

    def _forget_old(self, now: float) -> None:
        for address in [a for a, times in self._failures.items() if now - times[-1] >= self.window_s]:
            del self._failures[address]
        for address in [a for a, until in self._locked_until.items() if until <= now]:
            del self._locked_until[address]
        while len(self._failures) > self.max_addresses:
            del self._failures[next(iter(self._failures))]


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS,
                 max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS):
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._per_address: dict[str, int] = {}
        self._per_address_lock = threading.Lock()
        self.tls = False  # set once the socket is wrapped: no plain-text 503 on a TLS connection
        self._refused = 0
        self._refused_logged_at: float | None = None
        super().__init__(address, handler)

    def _take_address_slot(self, address: str) -> bool:
        with self._per_address_lock:
            if self._per_address.get(address, 0) >= self.max_per_address:
                return False
            self._per_address[address] = self._per_address.get(address, 0) + 1
            return True

    def _free_address_slot(self, address: str) -> None:
        with self._per_address_lock:
            left = self._per_address.get(address, 1) - 1
            if left > 0:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)

    def process_request(self, request, client_address) -> None:
        """A thread for the connection while fewer than ``max_connections`` are open, and fewer than
        ``max_per_address`` of its address; else it is closed."""
        address = str(client_address[0])
        if not self._take_address_slot(address):
            self._refuse(request, client_address, f"{self.max_per_address} from that address")
            return
        if not self._slots.acquire(blocking=False):
            self._free_address_slot(address)
            self._refuse(request, client_address, f"{self.max_connections} in all")
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slots are free again
            self._slots.release()
            self._free_address_slot(address)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            self._free_address_slot(str(client_address[0]))

    def _refuse(self, request, client_address, limit: str) -> None:
        import time

        self._refused += 1
        now = time.monotonic()
        if self._refused_logged_at is None or now - self._refused_logged_at >= 60:  # one line a minute at most
            log.warning("dashboard: the most connections served at once are open (%s); refused %d connection(s), "
                        "the latest from %s", limit, self._refused, client_address[0])
            self._refused, self._refused_logged_at = 0, now
        if not self.tls:
            try:
                request.setblocking(False)  # a few bytes into an empty send buffer; never wait for the client
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError as exc:
                log.debug("dashboard: could not answer a refused connection: %s", exc)
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """One log line for a connection that failed (a plain-HTTP client on the HTTPS port, a reset),
        not socketserver's traceback on stderr."""
        import sys

        exc = sys.exc_info()[1]
        log.warning("dashboard: connection from %s failed: %s", client_address[0],
                    getattr(exc, "reason", None) or exc)


class DashboardServer:
    def __init__(self, settings, session_factory, retry: Callable[[int], Any], cancel: Callable[[int], Any],
                 resend: Callable[[int], Any] | None = None,
                 health: Callable[[], dict[str, str | None]] | None = None, *,
                 max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT_S,
                 max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS, login_throttle: LoginThrottle | None = None):
        self.settings = settings
        self.request_timeout = request_timeout
        self.sf = session_factory
        self.health = health
        secret = settings.dashboard_password
        self.password: str | None = secret.get_secret_value() if secret is not None else None
        self.logins = login_throttle if login_throttle is not None else LoginThrottle()
        self.names = served_names(settings)
        self.registry = CollectorRegistry()
        self.registry.register(_DbCollector(session_factory))
        self.registry.register(_DiskCollector(settings))
        self.registry.register(_HealthCollector(session_factory, health))
        handler = self._make_handler(retry, cancel, resend or (lambda item_id: resend_item(session_factory, item_id)))
        self.httpd = _HttpServer((settings.dashboard_host, settings.dashboard_port), handler, max_connections,
                                 max_per_address)
        tls = dashboard_context(settings)
        if tls is not None:  # the handshake happens in the request's thread, not in the accepting one
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.httpd.tls = True
        self.scheme = "https" if tls is not None else "http"
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    def start(self) -> "DashboardServer":
        self._thread.start()
        log.info("dashboard on %s://%s:%s/", self.scheme, self.settings.dashboard_host, self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _make_handler(self, retry, cancel, resend):
        server = self
        actions = {("jobs", "retry"): retry, ("jobs", "cancel"): cancel, ("outbox", "resend"): resend,
                   ("quarantine", "retry"): lambda item_id: retry_quarantined_item(server.settings, server.sf, item_id)}

        class Handler(BaseHTTPRequestHandler):
            timeout = server.request_timeout  # a silent client is dropped, not waited for (socket timeout)

            def setup(self):
                """The request (TLS handshake, request line, headers) must arrive within the request timeout
                in all, not only between two reads: a client sending a byte every 29 s held its connection
                for ever. Past the deadline the socket is shut, and the read in progress ends."""
                super().setup()
                self._past_deadline = threading.Event()
                self._deadline = threading.Timer(server.request_timeout, self._too_slow)
                self._deadline.daemon = True
                self._deadline.start()

            def _too_slow(self):
                log.info("dashboard: %s did not send its request within %g s; connection closed",
                         self.client_address[0], server.request_timeout)
                self._past_deadline.set()  # before the shutdown, which ends the read in progress
                try:  # the plain socket's shutdown (an SSLSocket's would unwrap it under the reading thread)
                    socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
                except OSError as exc:
                    log.debug("dashboard: shutting a slow connection: %s", exc)

            def parse_request(self):
                # past the deadline the shut socket's read returned what had come so far as if the request
                # had ended: an incomplete request (a POST's action included) must not be handled
                ok = not self._past_deadline.is_set() and super().parse_request()
                self._deadline.cancel()  # the request is in: what follows is our work, not the client's
                if self._past_deadline.is_set():
                    self.close_connection = True
                    return False
                return ok

            def finish(self):
                self._deadline.cancel()
                super().finish()

            def log_message(self, fmt, *args):  # route through logging, not stderr
                log.debug("dashboard: " + fmt, *args)

            def end_headers(self):
                """Every response, :meth:`send_error`'s (400, 501) included, carries :data:`SECURITY_HEADERS`."""
                for k, v in SECURITY_HEADERS.items():
                    self.send_header(k, v)
                super().end_headers()

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, data: Any):
                return self._send(200, json.dumps(data).encode(), "application/json")

            def _password(self) -> tuple[str, float]:
                """The request's credentials against the settings' user and password: ``("ok", 0)`` (or no
                password set), ``("locked", seconds left)`` while the client's address is locked out for too
                many wrong passwords (:class:`LoginThrottle`; not checked then), ``("missing", 0)`` or
                ``("wrong", 0)``, which is logged and counted on every path, ``/healthz`` included (it must not
                be a way round the throttle)."""
                if server.password is None:
                    return "ok", 0.0
                address = self.client_address[0]
                wait = server.logins.locked_for(address)
                if wait > 0:
                    return "locked", wait
                given = self.headers.get("Authorization", "")
                if check_basic_auth(given, server.settings.dashboard_user, server.password):
                    return "ok", 0.0
                if not given:  # a browser's first request, with none, is not logged
                    return "missing", 0.0
                self._wrong_password(given, address)
                return "wrong", 0.0

            def _authorised(self) -> bool:
                """HTTP Basic (:meth:`_password`), when a password is set; else 401 (429 while the client's
                address is locked out)."""
                verdict, wait = self._password()
                if verdict == "ok":
                    return True
                if verdict == "locked":
                    self._send(429, b"too many wrong passwords from this address; try again later\n", "text/plain",
                               {"Retry-After": str(math.ceil(wait))})
                    return False
                self._send(401, b"authentication required\n", "text/plain",
                           {"WWW-Authenticate": 'Basic realm="MedGRU worker", charset="UTF-8"'})
                return False

            def _may_see_details(self) -> bool:
                """Whether this request may read error texts on ``/healthz``: no password set, or it carries
                the right one (an address locked out for wrong passwords may not)."""
                return self._password()[0] == "ok"

            def _wrong_password(self, given: str, address: str) -> None:
                """Log a wrong user or password and count it (:class:`LoginThrottle`); log a lock-out."""
                log.warning("dashboard: wrong user or password (user %r) for %s %s from %s", basic_auth_user(given),
                            self.command, self.path[:100], address)
                if server.logins.failed(address):
                    log.warning("dashboard: %d wrong passwords from %s within %g s; its requests are refused "
                                "for %g s", server.logins.max_failures, address, server.logins.window_s,
                                server.logins.lockout_s)

            def _for_us(self) -> bool:
                """Whether the ``Host`` names this dashboard (:func:`misdirected`); else 421 and a log line."""
                refused = misdirected(self.headers.get("Host"), server.names, self.connection.getsockname()[0])
                if refused is None:
                    return True
                log.warning("dashboard: refused %s %s from %s: %s", self.command, self.path[:100],
                            self.client_address[0], refused)
                self._send(421, f"refused: {refused}\n".encode(), "text/plain")
                return False

            def _or_503(self, handle):
                """``handle()``, or 503 and one line where the database does not answer: the connection
                was closed without an answer (an empty response in the browser, a dropped /api call) and
                the log called it a failed connection of the client's."""
                try:
                    return handle()
                except Exception as exc:
                    if not database_unreachable(exc):
                        raise
                    log.warning("dashboard: %s %s: the database does not answer: %s", self.command,
                                self.path[:100], error_line(exc)[:200])
                    return self._send(503, b"the database does not answer (GET /healthz)\n", "text/plain")

            def do_GET(self):
                return self._or_503(self._get)

            def do_POST(self):
                return self._or_503(self._post)

            def _get(self):
                path, _, query = self.path.partition("?")
                if path == "/healthz":
                    ok, text = health_report(server.sf, server.health, detailed=self._may_see_details())
                    return self._send(200 if ok else 503, text.encode(), "text/plain")
                if not self._for_us() or not self._authorised():
                    return None
                if path == "/metrics":
                    return self._send(200, generate_latest(server.registry), CONTENT_TYPE_METRICS)
                overlay = re.fullmatch(rf"/jobs/{ID}/overlay\.png", path)
                if overlay and int(overlay[1]) <= MAX_ROW_ID:
                    with server.sf() as session:
                        try:
                            png = overlay_png(session, server.settings.outbox_dir, int(overlay[1]))
                        except KeyError as exc:
                            return self._send(404, f"{exc.args[0]}\n".encode(), "text/plain")
                    return self._send(200, png, "image/png")
                job_page = re.fullmatch(rf"/jobs/{ID}", path)
                if job_page and int(job_page[1]) <= MAX_ROW_ID:
                    with server.sf() as session:
                        try:
                            page = render_job_page(session, int(job_page[1]))
                        except KeyError as exc:
                            return self._send(404, f"{exc.args[0]}\n".encode(), "text/plain")
                    return self._send(200, page.encode(), "text/html; charset=utf-8")
                if path == "/api/verdicts":
                    with server.sf() as session:
                        return self._json({"recent": DEFAULT_RECENT,
                                           "rows": [r.as_dict() for r in verdict_rows(session)]})
                if path not in ("/", "/index.html", "/api/jobs", "/api/outbox", "/api/quarantine"):
                    return self._send(404, b"not found\n", "text/plain")
                state, error = _state_param(query, _OUTBOX_STATES if path == "/api/outbox" else _JOB_STATES)
                if error:
                    return self._send(400, f"{error}\n".encode(), "text/plain")
                find = (parse_qs(query).get("q") or [""])[0].strip()[:128] or None
                before_text = (parse_qs(query).get("before") or [""])[0]
                if before_text and not re.fullmatch(r"\d{1,10}", before_text):
                    return self._send(400, b"before: a job id\n", "text/plain")
                before = min(int(before_text), MAX_ROW_ID + 1) if before_text else None
                with server.sf() as session:
                    if path == "/api/jobs":  # a page of PAGE_JOB_ROWS; "before" the next one (the last id)
                        rows = job_rows(session, state=state, find=find, before=before, limit=PAGE_JOB_ROWS + 1)
                        return self._json({"summary": summary(session), "jobs": rows[:PAGE_JOB_ROWS],
                                           "more": len(rows) > PAGE_JOB_ROWS,
                                           **({"series_without_jobs": series_without_jobs(session, find)}
                                              if find else {})})
                    if path == "/api/outbox":
                        states = (OutboxState(state),) if state else None
                        return self._json({"items": outbox_rows(session, states=states, limit=100)})
                    if path == "/api/quarantine":
                        return self._json({"items": quarantine_rows(session, limit=100)})
                    page = render_page(server.settings, session, state=state, find=find, before=before)
                return self._send(200, page.encode(), "text/html; charset=utf-8")

            def do_HEAD(self):
                """``HEAD /healthz`` for load balancers and monitors that check with HEAD: the status and
                headers of the GET, no body. Other paths: 405 (GET them)."""
                if self.path.partition("?")[0] != "/healthz":
                    self.send_response(405)
                    self.send_header("Allow", "GET, POST")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                ok, text = health_report(server.sf, server.health, detailed=self._may_see_details())
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text.encode())))
                self.end_headers()
                return None

            def _post(self):
                m = re.fullmatch(rf"/(jobs|outbox|quarantine)/{ID}/(retry|cancel|resend)", self.path)
                if not self._for_us() or not self._authorised():
                    return None
                action = actions.get((m[1], m[3])) if m and int(m[2]) <= MAX_ROW_ID else None
                if action is None and self.path != "/echo":
                    return self._send(404, b"not found\n", "text/plain")
                refused = cross_site(self.headers)  # /echo too: no change of state, but it opens associations
                if refused:
                    log.warning("dashboard: refused POST %s: %s", self.path, refused)
                    return self._send(403, f"refused: {refused}\n".encode(), "text/plain")
                if self.path == "/echo":
                    ok, page = render_echo_page(server.settings)
                    log.info("dashboard: PACS check (%s) from %s", "ok" if ok else "failed", self.client_address[0])
                    return self._send(200, page.encode(), "text/html; charset=utf-8")
                what, item_id, verb = m[1], int(m[2]), m[3]
                try:
                    action(item_id)
                except (KeyError, ValueError) as exc:
                    return self._send(409, f"{verb} {what} {item_id}: {exc}\n".encode(), "text/plain")
                log.info("dashboard: %s %s %d by %s from %s", verb, what, item_id,
                         server.settings.dashboard_user if server.password is not None else "(no password set)",
                         self.client_address[0])
                return self._send(303, b"", "text/plain", {"Location": "/" if what == "jobs" else f"/#{what}"})

        return Handler


def start_dashboard(settings, session_factory, celery_app, health=None) -> DashboardServer:
    from worker.admin import cancel_job, retry_job

    return DashboardServer(
        settings, session_factory,
        retry=lambda job_id: retry_job(session_factory, celery_app, job_id),
        cancel=lambda job_id: cancel_job(session_factory, job_id),
        health=health,
    ).start()


def health_report(session_factory, health: Callable[[], dict[str, str | None]] | None, *,
                  detailed: bool = True) -> tuple[bool, str]:
    """``(healthy, text)``: the database answers a query, and every part ``health()`` names is fine.
    ``detailed``: with the database driver's error text, which names the database's host, port and user;
    ``/healthz`` needs no password, so it gives that text only to a request that carries the dashboard's."""
    parts = health_parts(session_factory, health, detailed=detailed)
    ok = all(problem is None for problem in parts.values())
    lines = [f"{name}: {problem or 'ok'}" for name, problem in parts.items()]
    return ok, ("ok\n" if ok else "unhealthy\n") + "\n".join(lines) + "\n"


def health_parts(session_factory, health: Callable[[], dict[str, str | None]] | None, *,
                 detailed: bool = True) -> dict[str, str | None]:
    """What is wrong with each part (``None``: fine): the database, then each part ``health()`` names."""
    parts: dict[str, str | None] = {}
    try:
        with session_factory() as session:
            session.execute(select(1))
        parts["database"] = None
    except Exception as exc:  # any driver error means: not healthy
        parts["database"] = (f"{type(exc).__name__}: {error_line(exc)[:200]}" if detailed else
                             f"{type(exc).__name__} (its text: with the dashboard's password, or in the log)")
    if health is not None:
        parts.update(health())
    return parts
