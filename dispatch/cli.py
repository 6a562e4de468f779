"""``medgru outbox``: the result objects on their way to the PACS; list them, re-send failed ones.
``medgru echo``: check that the PACS can be reached and takes the SOP classes of our results.

A PENDING item is sent by the running service's sender (retried with back-off while the PACS is down);
a FAILED one was refused by the PACS ``max_attempts`` times and waits for an admin. ``resend`` puts
FAILED items back to PENDING, due at once, attempts reset.
"""

from __future__ import annotations

import argparse
import logging

from dispatch.admin import outbox_rows, resend_items
from medgru.tables import format_table, open_database, positive_int, printable, row_id, when_iso
from storage.models import OutboxState

_STATES = [s.value for s in OutboxState]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("outbox", help="results on their way to the PACS: list, resend")
    outbox = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")

    q = outbox.add_parser("list", help="the latest outbox items, newest first")
    q.add_argument("--state", choices=_STATES, help="only items in this state")
    q.add_argument("--limit", type=positive_int, default=50, help="at most this many rows (default 50)")
    q.set_defaults(func=_list)

    q = outbox.add_parser("resend", help="put failed items back to pending (the running service sends them)")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("item_ids", type=row_id, nargs="*", metavar="ID", default=[], help="outbox item ids")
    which.add_argument("--all-failed", action="store_true", help="every failed item")
    q.set_defaults(func=_resend)

    p = sub.add_parser("echo", help="C-ECHO the PACS and check that it accepts our SR and SC (exit 0 when it does)")
    p.add_argument("destination", nargs="?", metavar="AET@HOST:PORT",
                   help="the peer to check (default: the configured destination and every route's, over TLS when "
                        "send_tls is on)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each step (default 10)")
    p.set_defaults(func=_echo)


def _list(args, settings) -> int:
    sf = open_database(settings)
    states = (OutboxState(args.state),) if args.state else None
    with sf() as session:
        items = outbox_rows(session, states=states, limit=args.limit)
    rows = [[r["id"], r["state"], r["kind"], r["job"], r["destination"], r["attempts"],
             "" if r["last_status"] is None else f"0x{r['last_status']:04X}",
             when_iso(r["sent_at"] or r["next_attempt_at"]),
             r["sop_instance_uid"], r["last_error"][:80]] for r in items]
    print(format_table(["ID", "STATE", "OBJECT", "JOB", "DESTINATION", "TRIES", "STATUS", "SENT / NEXT (UTC)",
                        "SOP INSTANCE UID", "LAST ERROR"], rows))
    if not rows:
        print("(no outbox items)")
    return 0


def _resend(args, settings) -> int:
    from dispatch.sender import requeue_failed

    sf = open_database(settings)
    if args.all_failed:
        n = requeue_failed(sf)
        print(f"{n} failed item(s) back to pending")
        return 0
    ok, refused = resend_items(sf, args.item_ids)
    for exc in refused.values():
        print(f"cannot resend: {printable(exc.args[0])}")
    if ok:
        print(f"{len(ok)} failed item(s) back to pending: {', '.join(map(str, ok))}")
    return 1 if refused else 0


def _echo(args, settings) -> int:
    from dispatch.verify import result_sop_classes, verify_configured, verify_destination
    from medgru.settings import Destination
    from medgru.tls import client_context

    # the report names each failure; pynetdicom's own ERROR lines would only repeat it on stderr
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    if args.destination:
        try:
            destination = Destination.parse(args.destination)
        except ValueError as exc:
            print(f"medgru echo: {exc}")
            return 2
        reports = [("given", verify_destination(destination, calling_ae=settings.ae_title, timeout=args.timeout,
                                                tls=client_context(settings),
                                                sop_classes=result_sop_classes(settings)))]
    else:
        reports = verify_configured(settings, timeout=args.timeout)
        if not reports:
            print("medgru echo: no destination configured (MEDGRU_DESTINATION, MEDGRU_ROUTES) and none given")
            return 2
    print("\n\n".join(printable(f"[{why}] " + "\n".join(report.lines()), lines=True) for why, report in reports))
    return 0 if all(report.ok for _, report in reports) else 1
