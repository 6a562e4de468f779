"""``medgru jobs``: list, show, retry and cancel inference jobs; verdicts by model and sender.

Tables show job ids, states, modality, body part, series UIDs and results; never patient names.
"""

from __future__ import annotations

import argparse

from sqlalchemy import select

from medgru.tables import format_table, open_database, positive_int, print_fields, printable, row_id, when
from storage.models import Job, JobState

_STATES = [s.value for s in JobState]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="inference jobs: list, show, retry, cancel")
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    q = jobs.add_parser("list", help="the latest jobs, newest first")
    q.add_argument("--state", choices=_STATES, help="only jobs in this state")
    q.add_argument("--limit", type=positive_int, default=50, help="at most this many rows (default 50)")
    q.add_argument("--find", metavar="UID", help="only the jobs of this series, study, accession number or "
                                                 "SOP instance (exact)")
    q.set_defaults(func=_list)

    q = jobs.add_parser("show", help="one job in detail: sequence, attempts, errors, results, outbox")
    q.add_argument("job_id", type=row_id, metavar="ID")
    q.set_defaults(func=_show)

    q = jobs.add_parser("retry", help="put failed, not processed or cancelled jobs back on the queue")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("job_ids", type=row_id, nargs="*", metavar="ID", default=[], help="job ids")
    which.add_argument("--all-failed", action="store_true",
                       help="every failed job (after an outage: a worker or the GPU was away)")
    q.add_argument("--rerun", action="store_true",
                   help="also re-run succeeded jobs (e.g. after a model update); their SR and SC are replaced")
    q.set_defaults(func=_retry)

    q = jobs.add_parser("cancel", help="cancel a queued or retrying job")
    q.add_argument("job_id", type=row_id, metavar="ID")
    q.set_defaults(func=_cancel)

    q = jobs.add_parser("verdicts", help="ABNORMAL verdicts by model and sender, overall and over the latest "
                                         "results (a moving share: a site whose images changed)")
    q.add_argument("--recent", type=int, default=None, metavar="N",
                   help="the latest N results of each model and sender (default 100)")
    q.set_defaults(func=_verdicts)


# ------------------------------------------------------------------------------------- plumbing
# ------------------------------------------------------------------------------------- handlers
def _list(args, settings) -> int:
    from worker.admin import job_rows, series_without_jobs

    sf = open_database(settings)
    with sf() as session:
        jobs = job_rows(session, limit=args.limit, state=args.state, find=args.find)
        skipped = series_without_jobs(session, args.find) if args.find else []
    rows = [[j["id"], j["state"], j["attempts"], j["modality"], j["body_part"], j["frames"], j["model"] or "",
             "" if j["score"] is None else f"{j['score']:.4f}", j["verdict"] or "", j["in_pacs"] or "",
             j["updated_at"], j["series_uid"]]
            for j in jobs]
    headers = ["ID", "STATE", "TRIES", "MODALITY", "BODY PART", "FRAMES", "MODEL", "SCORE", "VERDICT", "IN PACS",
               "UPDATED (UTC)", "SERIES UID"]
    print(format_table(headers, rows))
    if not rows:
        print("(no jobs)")
    if skipped:
        print("\nseries received without a job:")
        print(format_table(["STATE", "MODALITY", "LAST RECEIVED (UTC)", "SERIES UID", "REASON"],
                           [[x["state"], x["modality"], x["last_received_at"], x["series_uid"], x["reason"]]
                            for x in skipped]))
    return 0


def _show(args, settings) -> int:
    from worker.admin import job_fields

    sf = open_database(settings)
    with sf() as session:
        try:
            fields = job_fields(session, args.job_id)
        except KeyError as exc:
            print(exc.args[0])
            return 1
    print_fields(fields)
    return 0


def _retry(args, settings) -> int:
    from worker.admin import retry_job
    from worker.celery_app import make_celery

    sf = open_database(settings)
    job_ids = list(dict.fromkeys(args.job_ids))
    if args.all_failed:
        with sf() as session:
            job_ids = list(session.scalars(select(Job.id).where(Job.state == JobState.FAILED).order_by(Job.id)))
        if not job_ids:
            print("no failed jobs")
            return 0
    app = make_celery(settings)
    refused = 0
    for job_id in job_ids:
        try:
            retry_job(sf, app, job_id, rerun_succeeded=args.rerun)
        except (KeyError, ValueError) as exc:
            print(f"cannot retry: {printable(exc.args[0] if exc.args else exc)}"
                  + ("" if args.rerun else " (--rerun re-runs a succeeded job)"))
            refused += 1
        else:
            print(f"job {job_id} re-queued")
    return 1 if refused else 0


def _cancel(args, settings) -> int:
    from worker.admin import cancel_job

    sf = open_database(settings)
    try:
        cancel_job(sf, args.job_id)
    except (KeyError, ValueError) as exc:
        print(f"cannot cancel: {printable(exc.args[0] if exc.args else exc)}")
        return 1
    print(f"job {args.job_id} cancelled")
    return 0


def _verdicts(args, settings) -> int:
    from worker.monitoring import DEFAULT_RECENT, verdict_rows

    recent = DEFAULT_RECENT if args.recent is None else args.recent
    if recent < 1:
        print(f"--recent must be at least 1, not {recent}")
        return 2
    sf = open_database(settings)
    with sf() as session:
        rows = verdict_rows(session, recent=recent)
    if not rows:
        print("no results yet")
        return 0
    print(format_table(
        ["MODEL", "VERSION", "SENDER", "RESULTS", "ABNORMAL", f"LATEST {recent}: ABNORMAL", "LAST RESULT (UTC)"],
        [[r.model, r.version, r.sender or "(unknown)", r.results, f"{r.abnormal} ({r.share:.0%})",
          f"{r.recent_abnormal} of {r.recent} ({r.recent_share:.0%})", when(r.last_at)] for r in rows]))
    return 0
