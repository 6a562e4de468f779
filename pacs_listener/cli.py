"""``medgru quarantine``: the instances the listener refused, with the status it answered and why.

The files stay where they are (``<home>/quarantine/<day>/``) beside their ``.reason.json``. ``list`` and
``show`` only read; ``retry`` puts kept files through the listener's store path again
(:mod:`pacs_listener.reingest`). Tables show calling AE titles, UIDs and our reasons, never patient data.
"""

from __future__ import annotations

import argparse

from medgru.tables import format_table, open_database, positive_int, print_fields, printable, row_id, when_iso
from pacs_listener.quarantine import quarantine_detail, quarantine_rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quarantine", help="instances the listener refused: list, show, retry")
    quarantine = p.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")

    q = quarantine.add_parser("list", help="the latest refused instances, newest first")
    q.add_argument("--calling-ae", help="only those sent by this calling AE title")
    q.add_argument("--limit", type=positive_int, default=50, help="at most this many rows (default 50)")
    q.set_defaults(func=_list)

    q = quarantine.add_parser("show", help="one refused instance: reason, status, UIDs, where its file is")
    q.add_argument("item_id", type=row_id, metavar="ID")
    q.set_defaults(func=_show)

    q = quarantine.add_parser("retry", help="store kept instances after all, once the fault on our side is "
                                            "fixed (the listener's own checks; refused ones stay)")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("item_ids", type=row_id, nargs="*", metavar="ID", default=[], help="quarantine ids")
    which.add_argument("--all", action="store_true", help="every kept instance not yet stored by a retry")
    q.set_defaults(func=_retry)


def _list(args, settings) -> int:
    sf = open_database(settings)
    with sf() as session:
        items = quarantine_rows(session, limit=args.limit, calling_ae=args.calling_ae)
    rows = [[r["id"], when_iso(r["received_at"]), r["calling_ae"], f"0x{r['status_code']:04X}",
             when_iso(r["released_at"]) if r["released_at"] else "", r["sop_instance_uid"], r["reason"][:100]]
            for r in items]
    print(format_table(["ID", "RECEIVED (UTC)", "CALLING AE", "STATUS", "STORED BY RETRY", "SOP INSTANCE UID",
                        "REASON"], rows))
    if not rows:
        print("(no quarantined instances)")
    return 0


def _retry(args, settings) -> int:
    from pacs_listener.reingest import retry_quarantined

    sf = open_database(settings)
    outcomes = retry_quarantined(settings, sf, None if args.all else args.item_ids)
    for o in outcomes:
        print(f"{o.item_id}: {printable(o.message)}")
    stored = sum(o.stored for o in outcomes)
    print(f"{stored} of {len(outcomes)} stored")
    return 0 if stored == len(outcomes) else 1


def _show(args, settings) -> int:
    sf = open_database(settings)
    with sf() as session:
        try:
            d = quarantine_detail(session, settings.quarantine_dir, args.item_id)
        except KeyError as exc:
            print(exc.args[0])
            return 1
    fields = [("quarantined", d["id"]), ("received (UTC)", when_iso(d["received_at"])),
              ("calling AE", d["calling_ae"]), ("answered", d["status"]), ("reason", d["reason"]),
              ("SOP instance UID", d["sop_instance_uid"]), ("SOP class UID", d["sop_class_uid"])]
    for key, label in (("study_uid", "study UID"), ("series_uid", "series UID"),
                       ("transfer_syntax_uid", "transfer syntax")):
        if d.get(key):
            fields.append((label, d[key]))
    if d["released_at"]:
        fields.append(("stored by a retry", f"{when_iso(d['released_at'])} UTC"))
    if d["purged_at"]:
        size = f"removed by retention on {when_iso(d['purged_at'], minutes=True)} UTC"
    else:
        size = "missing" if d["file_bytes"] is None else f"{d['file_bytes']} bytes"
    fields.append(("file", f"{d['file']} ({size})"))
    if "sidecar_error" in d:
        fields.append(("reason file", f"unreadable: {d['sidecar_error']}"))
    print_fields(fields)
    return 0
