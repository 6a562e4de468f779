"""Shared helpers of the reporting tests: source files, windowing, hand-made detections, dicom3tools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.valuerep import validate_value

from inference.api import Detection, ModelCard, Scope

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")

MR_SERIES_GLOB = "orthanc-tests/Brainix/Flair/*.dcm"
DX_FILE = "highdicom/dx_image.dcm"
CR_FILE = "dwv/data/gdcm-CR-MONO1-10-chest.dcm"

# dciodvfy warnings we accept, each with the reason. Anything else (and any Error) fails the test.
ACCEPTED_WARNINGS = (
    # patient / referring physician names are copied verbatim from the source ("BRAINIX", "Anonymized")
    re.compile(r"^Warning - Value dubious for this VR - \((0x0010,0x0010|0x0008,0x0090)\) PN .* - Retired Person Name form$"),
    # our private coding scheme for cluster labels, declared in CodingSchemeIdentificationSequence
    re.compile(r"^Warning - Unrecognized defined term <99MEDGRU> for value 1 of attribute <Coding Scheme Designator>$"),
    # SC only: dciodvfy requires Laterality (Type 2C, absent is an Error) for an SC; our sources carry no
    # laterality, so it is present and empty (= unknown), which draws this generic reminder
    re.compile(r"^Warning - is only permitted to be empty when actually unknown; should be absent \(not empty\) "
               r"if an unpaired body part, and have a value if a paired body part - attribute <Laterality>$"),
    # the CR source has no PatientID / StudyDate / StudyTime / StudyID; Type 2, copied as empty
    re.compile(r"^Warning - Missing attribute or value that would be needed to build DICOMDIR - "
               r"(Patient ID|Study Date|Study Time|Study ID)$"),
)


def card(version: str = "1.2.0", name: str = "medgru-svc") -> ModelCard:
    return ModelCard(name=name, version=version, detector="test", scope=Scope(modalities=("MR", "DX", "CR")))


def blob(shape: tuple[int, int], cy: float = 0.4, cx: float = 0.6, sigma: float = 0.12) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-(((yy - cy * h) / (sigma * h)) ** 2 + ((xx - cx * w) / (sigma * w)) ** 2)).astype(np.float32)


def detection(heatmaps: np.ndarray, *, score: float = 0.8731, threshold: float = 0.5123,
              cluster: str | None = "consolidation", c: ModelCard | None = None,
              frame_scores: tuple[float, ...] = ()) -> Detection:
    c = c or card()
    return Detection(score=score, threshold=threshold, is_anomaly=score > threshold, heatmaps=heatmaps,
                     model_name=c.name, model_version=c.version, cluster_label=cluster,
                     frame_scores=frame_scores)


def windowed(ds: pydicom.Dataset) -> np.ndarray:
    """The frame(s) as the pipeline hands them to detectors: the worker's own decoder (modality LUT, VOI or
    its fallbacks, MONOCHROME1 inverted, [0, 1]); ``(H, W)``, or ``(F, H, W)`` for a multi-frame instance."""
    from worker.pixels import decode_frame

    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = [decode_frame(ds, i + 1, str(ds.SOPInstanceUID)).astype(np.float32) for i in range(n)]
    return frames[0] if n == 1 else np.stack(frames)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, unexpected warnings) reported by dciodvfy for ``path``."""
    assert DCIODVFY.is_file(), f"{DCIODVFY} (dicom3tools) is required"
    # errors="replace": dciodvfy echoes an invalid value's raw bytes, which need not be UTF-8
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, errors="replace",
                          timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")
                and not any(p.match(ln.strip()) for p in ACCEPTED_WARNINGS)]
    return errors, warnings


def dsrdump(path: Path) -> str:
    assert DSRDUMP.is_file(), f"{DSRDUMP} (DCMTK) is required"
    proc = subprocess.run([str(DSRDUMP), str(path)], capture_output=True, timeout=120,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode("latin-1")


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def strict_read(path: Path) -> pydicom.Dataset:
    """Read with pydicom's strict reading, then validate every text value against its VR (raises)."""
    with pydicom.config.strict_reading():
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            if elem.VR not in _TEXT_VRS or elem.value is None or elem.value == "":
                continue
            values = elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]
            for v in values:
                validate_value(elem.VR, str(v), pydicom.config.RAISE)
    return ds
