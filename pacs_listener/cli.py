"""``medgru quarantine``: the instances the listener refused, with the status it answered and why.

The files stay where they are (``<home>/quarantine/<day>/``) beside their ``.reason.json``; these commands
only read. Tables show calling AE titles, UIDs and our reasons, never patient data.
"""

from __future__ import annotations

import argparse

from medgru.tables import format_table, open_database, print_fields, when_iso
from pacs_listener.quarantine import quarantine_detail, quarantine_rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quarantine", help="instances the listener refused: list, show")
    quarantine = p.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")

    q = quarantine.add_parser("list", help="the latest refused instances, newest first")
    q.add_argument("--calling-ae", help="only those sent by this calling AE title")
    q.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    q.set_defaults(func=_list)

    q = quarantine.add_parser("show", help="one refused instance: reason, status, UIDs, where its file is")
    q.add_argument("item_id", type=int, metavar="ID")
    q.set_defaults(func=_show)


def _list(args, settings) -> int:
    sf = open_database(settings)
    with sf() as session:
        items = quarantine_rows(session, limit=args.limit, calling_ae=args.calling_ae)
    rows = [[r["id"], when_iso(r["received_at"]), r["calling_ae"], f"0x{r['status_code']:04X}",
             r["sop_instance_uid"], r["reason"][:100]] for r in items]
    print(format_table(["ID", "RECEIVED (UTC)", "CALLING AE", "STATUS", "SOP INSTANCE UID", "REASON"], rows))
    if not rows:
        print("(no quarantined instances)")
    return 0


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
    if d["purged_at"]:
        size = f"removed by retention on {when_iso(d['purged_at'], minutes=True)} UTC"
    else:
        size = "missing" if d["file_bytes"] is None else f"{d['file_bytes']} bytes"
    fields.append(("file", f"{d['file']} ({size})"))
    if "sidecar_error" in d:
        fields.append(("reason file", f"unreadable: {d['sidecar_error']}"))
    print_fields(fields)
    return 0
