"""End to end: a real Orthanc sends series to ``medgru serve``; the SR and the Grad-CAM SC come back to it.

Both run in the session's private network namespace (see ``conftest.py``). The latency from the last
instance sent to the SR being visible in Orthanc is printed, and written to the JSON file named by
``MEDGRU_SPINE_LATENCY_OUT`` (``benchmarks/bench_spine.py`` sets it to
``benchmarks/results/spine_latency.json``); a plain test run writes it under the system temp folder, so
the suite never modifies tracked files.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.integration.conftest import (
    MEDGRU_AET,
    ORTHANC_MODALITY_NAME,
    QUIET_PERIOD_S,
    REPO_ROOT,
    STORESCU_AET,
    MedgruService,
)
from tests.integration.dcmtk import dsrdump, storescu
from tests.integration.netns import NetNamespace
from tests.integration.orthanc import OrthancServer

pytestmark = pytest.mark.integration

BRAIN_SERIES = Path("orthanc-tests/Brainix/Flair")  # 22 MR slices; BRAIN only from the study description
CHEST_SERIES = Path("dwv/data/gdcm-CR-MONO1-10-chest.dcm")  # human chest CR, BodyPartExamined CHEST, MONOCHROME1
KNEE_SERIES = Path("orthanc-tests/Knee/T1")  # MR KNEE: no model covers it
DIRECT_SERIES = Path("pydicom-data/RG1_UNCR.dcm")  # human chest CR, 1955x1841 16-bit, 7 MB

RESULT_TIMEOUT_S = 300.0  # bounded but generous: a shared 2-core CPU machine
NOT_PROCESSED_TIMEOUT_S = 120.0
POLL_S = 0.25
ABORT_CHECK_S = 10.0
MANUFACTURER = "MedGRU"
LATENCY_FILE = Path(os.environ.get("MEDGRU_SPINE_LATENCY_OUT")
                    or Path(tempfile.gettempdir()) / "medgru-spine-latency.json")


# helpers -------------------------------------------------------------------------------------------------


def _files(corpus: Path, rel: Path) -> list[Path]:
    path = corpus / rel
    files = sorted(path.glob("*.dcm")) if path.is_dir() else [path]
    assert files, f"no DICOM files at {path}"
    return files


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _contains_string(node: Any, needle: str) -> bool:
    if isinstance(node, str):
        return node == needle
    if isinstance(node, dict):
        return any(_contains_string(v, needle) for v in node.values())
    if isinstance(node, list):
        return any(_contains_string(v, needle) for v in node)
    return False


def _content_items(node: Any) -> Iterator[dict[str, Any]]:
    """Every SR content item, depth first, from Orthanc's simplified tags."""
    for item in node.get("ContentSequence", []) or []:
        yield item
        yield from _content_items(item)


def _concept(item: dict[str, Any]) -> str:
    seq = item.get("ConceptNameCodeSequence") or [{}]
    return seq[0].get("CodeMeaning", "")


def _wait_for(
    what: str,
    predicate: Callable[[], Any],
    timeout_s: float,
    on_timeout: Callable[[], str],
    abort: Callable[[], str | None] | None = None,
) -> Any:
    """Poll ``predicate`` until truthy; fail after ``timeout_s``, or as soon as ``abort`` (checked every
    ``ABORT_CHECK_S``) returns a reason the wait is hopeless."""
    deadline = time.monotonic() + timeout_s
    next_abort_check = time.monotonic() + ABORT_CHECK_S
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if abort is not None and now >= next_abort_check:
            next_abort_check = now + ABORT_CHECK_S
            reason = abort()
            if reason and not predicate():
                pytest.fail(f"gave up waiting for {what}: {reason}\n{on_timeout()}")
        if now > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{on_timeout()}")
        time.sleep(POLL_S)


def _job_gave_up(service: MedgruService, series_uid: str) -> str | None:
    """A reason when the series' latest job ended without results (not_processed, failed, cancelled)."""
    listed = service.medgru("jobs", "list", "--limit", "1000")
    if listed.returncode != 0:
        return None
    for cols in (line.split() for line in listed.stdout.splitlines()[2:]):
        if cols and cols[-1] == series_uid:  # newest first: the first row is the latest job
            if cols[1] in ("not_processed", "failed", "cancelled"):
                shown = service.medgru("jobs", "show", cols[0])
                return f"its job {cols[0]} is {cols[1]}:\n{shown.stdout}"
            return None
    return None


class ResultFinder:
    """Find our SR / SC series in Orthanc that reference a given source series."""

    def __init__(self, orthanc: OrthancServer) -> None:
        self.orthanc = orthanc
        self._tags: dict[str, dict[str, Any]] = {}  # first-instance tags per Orthanc series id

    def _first_instance_tags(self, series: dict[str, Any]) -> dict[str, Any] | None:
        sid = series["ID"]
        if sid not in self._tags:
            if not series.get("Instances"):
                return None
            self._tags[sid] = self.orthanc.instance_tags(series["Instances"][0])
        return self._tags[sid]

    def study_id(self, study_uid: str) -> str | None:
        return next((h["ID"] for h in self.orthanc.lookup(study_uid) if h.get("Type") == "Study"), None)

    def results(self, study_uid: str, source_series_uid: str) -> dict[str, list[dict[str, Any]]]:
        """{"SR": [...], "SC": [...]}: our series in the study whose first instance references the source."""
        found: dict[str, list[dict[str, Any]]] = {"SR": [], "SC": []}
        study_id = self.study_id(study_uid)
        if study_id is None:
            return found
        for series in self.orthanc.study_series(study_id):
            tags = series.get("MainDicomTags", {})
            if tags.get("Manufacturer") != MANUFACTURER:
                continue
            first = self._first_instance_tags(series)
            if first is None or not _contains_string(first, source_series_uid):
                continue
            kind = "SR" if tags.get("Modality") == "SR" else "SC"
            found[kind].append({"series": series, "instance": series["Instances"][0], "tags": first})
        return found


def _record_latency(key: str, service: MedgruService, entry: dict[str, Any]) -> None:
    LATENCY_FILE.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if LATENCY_FILE.is_file():
        try:
            data = json.loads(LATENCY_FILE.read_text())
        except ValueError:
            data = {}
    data[key] = {
        **entry,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quiet_period_s": QUIET_PERIOD_S,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": "cpu",
        "models": service.models.kind if service.models else "?",
    }
    LATENCY_FILE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _jobs_report(service: MedgruService) -> str:
    proc = service.medgru("jobs", "list")
    return f"`medgru jobs list` rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def _not_processed_job(service: MedgruService, series_uid: str) -> dict[str, str] | None:
    """The not_processed job of ``series_uid`` as ``medgru jobs show`` prints it, or None if there is none yet.

    ``medgru jobs list`` prints a table whose first column is the job id and last the series UID.
    """
    listed = service.medgru("jobs", "list", "--state", "not_processed", "--limit", "1000")
    assert listed.returncode == 0, f"`medgru jobs list` failed: {listed.stderr}\n{listed.stdout}"
    job_id = next(
        (cols[0] for cols in (line.split() for line in listed.stdout.splitlines()[2:]) if cols and cols[-1] == series_uid),
        None,
    )
    if job_id is None:
        return None
    shown = service.medgru("jobs", "show", job_id)
    assert shown.returncode == 0, f"`medgru jobs show {job_id}` failed: {shown.stderr}\n{shown.stdout}"
    fields: dict[str, str] = {}
    for line in shown.stdout.splitlines():
        key, _, value = line.partition("  ")
        if key.strip():
            fields[key.strip()] = value.strip()
    return fields


def _check_sr(orthanc: OrthancServer, hit: dict[str, Any], source_series_uid: str, tmp_path: Path) -> dict[str, Any]:
    tags = hit["tags"]
    assert tags["Modality"] == "SR"
    assert tags.get("Manufacturer") == MANUFACTURER
    assert _contains_string(tags, source_series_uid), "SR does not reference its source series"
    items = list(_content_items(tags))
    by_concept: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_concept.setdefault(_concept(item), []).append(item)

    def numeric(concept: str) -> float:
        assert concept in by_concept, f"SR has no {concept!r} item; concepts: {sorted(by_concept)}"
        measured = by_concept[concept][0].get("MeasuredValueSequence") or [{}]
        return float(measured[0]["NumericValue"])

    score = numeric("Score")
    threshold = numeric("Threshold Value")
    assert np.isfinite(score) and np.isfinite(threshold)
    assert "Impression" in by_concept, f"SR has no verdict; concepts: {sorted(by_concept)}"
    verdict = by_concept["Impression"][0]["ConceptCodeSequence"][0]["CodeMeaning"]
    assert verdict in ("Normal", "Abnormal")
    assert verdict == ("Abnormal" if score > threshold else "Normal"), f"verdict {verdict} for {score} vs {threshold}"
    name_items = by_concept.get("Algorithm Name", [])
    version_items = by_concept.get("Algorithm Version", [])
    assert name_items and version_items, f"SR lacks algorithm name/version; concepts: {sorted(by_concept)}"
    model_name = name_items[0]["TextValue"]
    model_version = version_items[0]["TextValue"]
    assert model_name.strip() and model_version.strip()

    # the same content through DCMTK's SR parser, on the file as Orthanc stores it
    path = tmp_path / f"{hit['instance']}.dcm"
    path.write_bytes(orthanc.instance_file(hit["instance"]))
    dump = dsrdump(path)
    for needle in ("Score", "Threshold Value", "Impression", verdict, model_name, model_version):
        assert needle in dump, f"dsrdump of the SR lacks {needle!r}:\n{dump}"
    assert re.search(r"Score.*=\s*\"?[-+0-9.eE]+", dump), f"no numeric score in dsrdump:\n{dump}"
    return {"score": score, "threshold": threshold, "verdict": verdict, "model": f"{model_name} {model_version}",
            "scores": len(by_concept["Score"])}


def _check_sc_colour(orthanc: OrthancServer, hit: dict[str, Any]) -> float:
    assert hit["tags"].get("Manufacturer") == MANUFACTURER
    png = orthanc.instance_preview_png(hit["instance"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "SC preview is not a PNG"
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    spread = image.max(axis=2) - image.min(axis=2)
    coloured = float((spread > 60).mean())
    assert coloured > 0.01, f"SC preview has almost no colour: {coloured:.4%} of pixels with R,G,B apart"
    return coloured


# tests ----------------------------------------------------------------------------------------------------


def test_orthanc_routes_series_and_gets_sr_and_overlay_back(
    orthanc: OrthancServer, medgru_service: MedgruService, dicom_corpus: Path, tmp_path: Path
):
    assert ORTHANC_MODALITY_NAME in orthanc.modalities_list()
    orthanc.echo(ORTHANC_MODALITY_NAME)  # Orthanc (AE ORTHANC) may talk to our listener

    covered: dict[str, dict[str, Any]] = {}
    sources = {"brain": BRAIN_SERIES, "chest": CHEST_SERIES, "knee": KNEE_SERIES}
    for label, rel in sources.items():
        files = _files(dicom_corpus, rel)
        head = _header(files[0])
        answers = orthanc.upload_files(files)
        series_ids = {a["ParentSeries"] for a in answers}
        assert len(series_ids) == 1, f"{rel} is not one series in Orthanc: {series_ids}"
        study_id = answers[0]["ParentStudy"]
        covered[label] = {
            "files": len(files),
            "series_id": series_ids.pop(),
            "study_id": study_id,
            "study_uid": head.StudyInstanceUID,
            "series_uid": head.SeriesInstanceUID,
            "series_before": {s["ID"] for s in orthanc.study_series(study_id)},
        }

    sent_at: dict[str, float] = {}
    for label in ("brain", "chest", "knee"):
        orthanc.store_to_modality(ORTHANC_MODALITY_NAME, [covered[label]["series_id"]])
        sent_at[label] = time.monotonic()

    finder = ResultFinder(orthanc)

    def diagnostics() -> str:
        lines = []
        for label, c in covered.items():
            lines.append(f"{label}: series {[(s['MainDicomTags'].get('Modality'), s['MainDicomTags'].get('Manufacturer')) for s in orthanc.study_series(c['study_id'])]}")
        return "\n".join(lines) + "\n" + _jobs_report(medgru_service)

    latencies: dict[str, float] = {}
    results: dict[str, dict[str, list]] = {}
    for label in ("brain", "chest"):
        c = covered[label]

        def sr_present(c=c):
            return finder.results(c["study_uid"], c["series_uid"])["SR"]

        _wait_for(
            f"the SR for the {label} series {c['series_uid']}",
            sr_present,
            RESULT_TIMEOUT_S,
            diagnostics,
            abort=lambda c=c: _job_gave_up(medgru_service, c["series_uid"]),
        )
        latencies[label] = time.monotonic() - sent_at[label]

        def both_present(c=c):
            found = finder.results(c["study_uid"], c["series_uid"])
            return found if found["SR"] and found["SC"] else None

        results[label] = _wait_for(f"the SC for the {label} series", both_present, RESULT_TIMEOUT_S, diagnostics)

    summary = {}
    for label in ("brain", "chest"):
        c, found = covered[label], results[label]
        assert len(found["SR"]) == 1 and len(found["SC"]) == 1, f"{label}: {len(found['SR'])} SR, {len(found['SC'])} SC"
        # in the SAME study, as NEW series
        new_ids = {s["ID"] for s in orthanc.study_series(c["study_id"])} - c["series_before"]
        assert {found["SR"][0]["series"]["ID"], found["SC"][0]["series"]["ID"]} <= new_ids
        assert found["SR"][0]["tags"]["StudyInstanceUID"] == c["study_uid"]
        assert found["SC"][0]["tags"]["StudyInstanceUID"] == c["study_uid"]
        sr = _check_sr(orthanc, found["SR"][0], c["series_uid"], tmp_path)
        # the series' score, and for a multi-slice series one more per slice (each scored alone)
        assert sr.pop("scores") == (1 if c["files"] == 1 else 1 + c["files"]), f"{label}: Score items"
        colour = _check_sc_colour(orthanc, found["SC"][0])
        summary[label] = {**sr, "coloured_fraction": round(colour, 4), "sr_latency_s": round(latencies[label], 3)}

    # the knee: no model covers it -> a not_processed job with a reason, and nothing new in its study
    knee = covered["knee"]

    job = _wait_for(
        "a not_processed job for the knee series",
        lambda: _not_processed_job(medgru_service, knee["series_uid"]),
        NOT_PROCESSED_TIMEOUT_S,
        diagnostics,
    )
    assert job.get("state") == "not_processed", job
    assert job.get("reason"), f"the knee's not_processed job gives no reason: {job}"
    assert {s["ID"] for s in orthanc.study_series(knee["study_id"])} == knee["series_before"], (
        f"the knee study got new series: {orthanc.study_series(knee['study_id'])}"
    )

    print(f"\nvia Orthanc: {json.dumps(summary, indent=2)}")
    _record_latency(
        "via_orthanc_store",
        medgru_service,
        {
            "what": "seconds from Orthanc's synchronous /modalities/medgru/store returning to the SR being "
            "visible in Orthanc (includes the quiet period)",
            "series": {label: {"instances": covered[label]["files"], "sr_latency_s": summary[label]["sr_latency_s"],
                               "model": summary[label]["model"]} for label in ("brain", "chest")},
        },
    )


def test_storescu_direct_to_listener_sr_reaches_orthanc(
    netns: NetNamespace, orthanc: OrthancServer, medgru_service: MedgruService, dicom_corpus: Path, tmp_path: Path
):
    files = _files(dicom_corpus, DIRECT_SERIES)
    head = _header(files[0])
    finder = ResultFinder(orthanc)
    assert finder.results(head.StudyInstanceUID, head.SeriesInstanceUID)["SR"] == []

    sent = storescu(netns, medgru_service.port, files, calling=STORESCU_AET, called=MEDGRU_AET)
    last_sent = time.monotonic()
    assert sent.returncode == 0, f"storescu to our listener failed:\n{sent.stdout}\n{sent.stderr}"
    assert "Success" in sent.stdout + sent.stderr, sent.stdout + sent.stderr

    def sr_present():
        return finder.results(head.StudyInstanceUID, head.SeriesInstanceUID)["SR"]

    hits = _wait_for(
        f"the SR for {head.SeriesInstanceUID} in Orthanc",
        sr_present,
        RESULT_TIMEOUT_S,
        lambda: _jobs_report(medgru_service),
        abort=lambda: _job_gave_up(medgru_service, head.SeriesInstanceUID),
    )
    latency = time.monotonic() - last_sent
    sr = _check_sr(orthanc, hits[0], head.SeriesInstanceUID, tmp_path)
    sr.pop("scores")
    print(f"\nstorescu -> MEDGRU -> ORTHANC: SR visible {latency:.2f} s after the last instance was sent "
          f"({len(files)} instance(s), quiet period {QUIET_PERIOD_S} s, model {sr['model']})")
    _record_latency(
        "direct_storescu",
        medgru_service,
        {
            "what": "seconds from DCMTK storescu finishing (last instance sent, association released) to the SR "
            "being visible in Orthanc (includes the quiet period)",
            "instances": len(files),
            "series_uid": head.SeriesInstanceUID,
            "latency_s": round(latency, 3),
            "model": sr["model"],
        },
    )
    assert latency > QUIET_PERIOD_S * 0.9, "the SR came back before the quiet period was over"


def test_a_late_slice_revises_the_result_and_rejects_the_first_in_orthanc(
    netns: NetNamespace, orthanc: OrthancServer, medgru_service: MedgruService, dicom_corpus: Path, tmp_path: Path
):
    """A series is scored, then a late slice arrives: the revised SR names the first as its predecessor and
    an IOCM rejection note (KO) listing the first SR and SC lands in the same study in Orthanc."""
    from pydicom.uid import generate_uid

    series_uid = generate_uid()  # a copy of four Brainix slices as a series of its own
    files = []
    for i, path in enumerate(_files(dicom_corpus, BRAIN_SERIES)[:4]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 901
        files.append(tmp_path / f"slice{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    finder = ResultFinder(orthanc)

    def our_instances(modality: str, needle: str) -> list[dict[str, Any]]:
        """Our instances of ``modality`` in the study that name ``needle`` (a UID) anywhere."""
        study_id = finder.study_id(study_uid)
        found = []
        for series in orthanc.study_series(study_id) if study_id else []:
            if series.get("MainDicomTags", {}).get("Modality") == modality:
                for instance in series.get("Instances", []):
                    tags = orthanc.instance_tags(instance)
                    if tags.get("Manufacturer") == MANUFACTURER and _contains_string(tags, needle):
                        found.append(tags)
        return found

    def first_results() -> dict[str, list[dict[str, Any]]] | None:
        found = finder.results(study_uid, series_uid)
        return found if found["SR"] and found["SC"] else None

    for batch in (files[:3], files[3:]):
        sent = storescu(netns, medgru_service.port, batch, calling=STORESCU_AET, called=MEDGRU_AET)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        if batch is files[3:]:
            break
        first = _wait_for(f"the first SR and SC of {series_uid}", first_results, RESULT_TIMEOUT_S,
                          lambda: _jobs_report(medgru_service),
                          abort=lambda: _job_gave_up(medgru_service, series_uid))
    first_sr = orthanc.instance_tags(first["SR"][0]["instance"])["SOPInstanceUID"]
    first_sc = orthanc.instance_tags(first["SC"][0]["instance"])["SOPInstanceUID"]

    def revised() -> list[dict[str, Any]] | None:
        srs = our_instances("SR", series_uid)
        return srs if len(srs) == 2 and our_instances("KO", first_sr) else None

    srs = _wait_for(f"the revised SR and the rejection note of {series_uid}", revised, RESULT_TIMEOUT_S,
                    lambda: _jobs_report(medgru_service))
    (new_sr,) = [t for t in srs if t["SOPInstanceUID"] != first_sr]
    assert _contains_string(new_sr.get("PredecessorDocumentsSequence", []), first_sr)
    (note,) = our_instances("KO", first_sr)
    assert note["ConceptNameCodeSequence"][0]["CodeValue"] == "113001"  # Rejected for Quality Reasons
    listed = {i["ReferencedSOPInstanceUID"] for s in note["CurrentRequestedProcedureEvidenceSequence"]
              for r in s["ReferencedSeriesSequence"] for i in r["ReferencedSOPSequence"]}
    assert listed == {first_sr, first_sc}
