"""Every file of the DICOM corpus sent to the listener gets a definite outcome, and nothing is lost.

Each file is sent with DCMTK ``storescu`` (batched per transfer syntax, proposing that syntax so that the
file travels unchanged). A file storescu will not send (unreadable, no UIDs, unknown SOP class...) is
retried with a pynetdicom SCU that reads it with ``force=True``; if that cannot send it either, the
outcome is "refused by the sender". Afterwards the listener still answers C-ECHO, every instance we
answered Success for is in the spool and the database, and every failure we answered is in the
quarantine with its reason.
"""

from __future__ import annotations

import collections
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from pacs_listener.spool import read_quarantine_reason
from pacs_listener.status import StoreStatus
from storage.models import Instance, QuarantineItem

from .conftest import ECHOSCU, STORESCU, STORESCU_TS_OPTION, run_dcmtk

pytestmark = pytest.mark.integration

BATCH = 40  # files per storescu run: keeps the proposed presentation contexts under 128


@dataclass
class Outcome:
    path: str
    sender: str = ""  # "storescu" or "pynetdicom"
    kind: str = ""  # success | warning | failure | refused-by-sender
    detail: str = ""
    sop_instance_uid: str = ""
    attempts: list[str] = field(default_factory=list)


_SENDING = re.compile(r"^I: Sending file: (.*)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.*)\)$")


def parse_storescu_log(log: str, files: list[str]) -> dict[str, tuple[str, str]]:
    """path -> (kind, detail) from ``storescu -v`` output; files it never tried are absent."""
    outcomes: dict[str, tuple[str, str]] = {}
    current: str | None = None
    for line in log.splitlines():
        m = _SENDING.match(line)
        if m:
            current = m.group(1)
            outcomes[current] = ("refused-by-sender", "no response")
            continue
        if current is None:
            continue
        m = _RESPONSE.match(line)
        if m:
            status = m.group(1)
            kind = "success" if status == "Success" else "warning" if status.startswith("Warning") else "failure"
            outcomes[current] = (kind, status)
        elif line.startswith("E: "):
            kind, detail = outcomes[current]
            if kind == "refused-by-sender":
                outcomes[current] = (kind, (detail if detail != "no response" else "") + line[3:] + " ")
    return {p: outcomes[p] for p in files if p in outcomes}


def read_uid(path: Path) -> str:
    try:
        return str(dcmread(path, force=True, stop_before_pixels=True).get("SOPInstanceUID", "") or "")
    except Exception:
        return ""


def send_with_pynetdicom(port: int, path: Path) -> tuple[str, str]:
    try:
        ds = dcmread(path, force=True)
        sop_class, sop_uid = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception as exc:
        return "refused-by-sender", f"pydicom cannot read it: {type(exc).__name__}"
    if not sop_class or not sop_uid:
        return "refused-by-sender", "no SOP Class/Instance UID"
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not ts:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    ae = AE(ae_title="PYSCU")
    try:
        ae.add_requested_context(str(sop_class), [str(ts)])
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDGRU")
    except Exception as exc:
        return "refused-by-sender", f"pynetdicom cannot propose it: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        return "refused-by-sender", "association not accepted for its SOP class/transfer syntax"
    try:
        rsp = assoc.send_c_store(ds)
    except Exception as exc:
        return "refused-by-sender", f"pynetdicom cannot encode it: {type(exc).__name__}: {str(exc)[:100]}"
    finally:
        assoc.release()
    status = getattr(rsp, "Status", None)
    if status is None:
        return "refused-by-sender", "no response"
    if status == StoreStatus.SUCCESS:
        return "success", "Success"
    kind = "warning" if (status & 0xF000) == 0xB000 else "failure"
    name = StoreStatus(status).name if status in StoreStatus._value2member_map_ else "unnamed"
    return kind, f"{status:#06x} {name}"


def test_every_corpus_file_gets_a_definite_outcome(listener_factory, sqlite_session_factory, dicom_corpus):
    inventory = list(csv.DictReader((dicom_corpus / "INVENTORY.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert len(inventory) > 500
    listener = listener_factory()
    outcomes: dict[str, Outcome] = {row["path"]: Outcome(row["path"]) for row in inventory}

    groups: dict[str, list[str]] = collections.defaultdict(list)
    for row in inventory:
        groups[STORESCU_TS_OPTION.get(row["transfer_syntax_uid"], "")].append(row["path"])
    for option, paths in sorted(groups.items()):
        for i in range(0, len(paths), BATCH):
            batch = paths[i : i + BATCH]
            args = [STORESCU, "-v", "-nh", "-R", *([option] if option else []), "-aet", "STORESCU", "-aec", "MEDGRU",
                    "127.0.0.1", str(listener.port), *[str(dicom_corpus / p) for p in batch]]
            res = run_dcmtk(args, timeout=300)
            parsed = parse_storescu_log(res.stdout + res.stderr, [str(dicom_corpus / p) for p in batch])
            for p in batch:
                kind, detail = parsed.get(str(dicom_corpus / p), ("refused-by-sender", "ignored by storescu"))
                o = outcomes[p]
                o.sender, o.kind, o.detail = "storescu", kind, detail.strip()
                o.attempts.append(f"storescu: {kind}")

    for o in outcomes.values():
        if o.kind == "refused-by-sender":
            kind, detail = send_with_pynetdicom(listener.port, dicom_corpus / o.path)
            o.attempts.append(f"pynetdicom: {kind}")
            o.sender, o.kind, o.detail = ("pynetdicom", kind, detail) if kind != "refused-by-sender" else (
                o.sender, o.kind, o.detail + f"; pynetdicom: {detail}")

    for o in outcomes.values():
        o.sop_instance_uid = read_uid(dicom_corpus / o.path)

    # the listener is still alive and answering
    res = run_dcmtk([ECHOSCU, "-aec", "MEDGRU", "127.0.0.1", str(listener.port)])
    assert res.returncode == 0, res.stdout + res.stderr

    counts = collections.Counter((o.kind, o.sender) for o in outcomes.values())
    with sqlite_session_factory() as s:
        stored = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
        quarantined = list(s.scalars(select(QuarantineItem)).all())

    lines = ["", "corpus robustness: outcome by sender", f"{'outcome':<20}{'sender':<12}{'files':>6}"]
    for (kind, sender), n in sorted(counts.items()):
        lines.append(f"{kind:<20}{sender:<12}{n:>6}")
    lines.append(f"{'total':<32}{sum(counts.values()):>6}")
    lines.append(f"distinct instances stored: {len(stored)}; quarantine items: {len(quarantined)}")
    failures = collections.Counter(o.detail for o in outcomes.values() if o.kind == "failure")
    lines += [f"  failure answered: {d} x{n}" for d, n in failures.most_common()]
    refused = [o for o in outcomes.values() if o.kind == "refused-by-sender"]
    lines += [f"  refused by sender: {o.path}: {o.detail[:110]}" for o in refused]
    print("\n".join(lines))

    # every file has a definite outcome
    assert all(o.kind in ("success", "warning", "failure", "refused-by-sender") for o in outcomes.values())
    # every Success is in the DB and in the spool, byte-for-byte what the row says
    for o in outcomes.values():
        if o.kind in ("success", "warning"):
            assert o.sop_instance_uid in stored, f"{o.path}: answered {o.detail} but {o.sop_instance_uid} not in DB"
            row = stored[o.sop_instance_uid]
            spooled = listener.spool_dir / row.path
            assert spooled.is_file() and spooled.stat().st_size == row.size_bytes, o.path
    # every failure we answered is in the quarantine, with its reason, file and sidecar; so is every copy of
    # a stored SOP Instance UID with other content (the corpus has several: truncated copies, other frames,
    # another patient), answered Success, the first copy kept in the spool
    refused_items = [q for q in quarantined if q.status_code != StoreStatus.SUCCESS]
    other_copies = [q for q in quarantined if q.status_code == StoreStatus.SUCCESS]
    n_failures = sum(1 for o in outcomes.values() if o.kind == "failure")
    assert len(refused_items) == n_failures
    quarantined_uids = {q.sop_instance_uid for q in refused_items}
    for o in outcomes.values():
        if o.kind == "failure" and o.sop_instance_uid:
            assert o.sop_instance_uid in quarantined_uids, f"{o.path}: failure answered but not quarantined"
    for q in other_copies:
        assert "other content" in q.reason and q.sop_instance_uid in stored
    for q in quarantined:
        assert q.reason
        assert (listener.quarantine_dir / q.path).is_file()
        assert read_quarantine_reason(listener.quarantine_dir, q.path)["reason"] == q.reason
    # nothing was stored that nobody was told about: every stored instance came from a success
    success_uids = {o.sop_instance_uid for o in outcomes.values() if o.kind in ("success", "warning")}
    assert set(stored) <= success_uids | {""}
    # the corpus is mostly well-formed: most files are stored, the known-broken ones are not silently accepted
    assert counts[("success", "storescu")] > 400
    broken = {r["path"] for r in inventory if r["known_defect"] and "valid file" not in r["known_defect"]}
    accepted_broken = sorted(p for p in broken if outcomes[p].kind == "success")
    print("known-defect files answered Success:", accepted_broken)
