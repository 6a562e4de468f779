"""The patient and study attributes a result object copies from its source: character set and logging."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pydicom
import pytest

from reporting.sc import build_overlay_sc
from reporting.sr import build_sr
from tests.reporting import helpers as h

LATIN1_NAME = "Müller^Jürgen"


def _latin1_source(dicom_corpus: Path, charset: str | None) -> pydicom.Dataset:
    """The DX corpus image with a Latin-1 patient name as an archive holds it: the name's bytes are
    ISO 8859-1 and the file declares ``charset`` (or nothing). The bytes are decoded by pydicom only
    when read, under the declared character set, as for a received instance."""
    ds = pydicom.dcmread(dicom_corpus / h.DX_FILE)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = LATIN1_NAME
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = pydicom.dcmread(io.BytesIO(buf.getvalue()))  # PatientName stays undecoded bytes until read
    if charset is None:
        del raw.SpecificCharacterSet
    else:
        raw.SpecificCharacterSet = charset
    return raw


@pytest.mark.parametrize("charset,written", [
    ("ISO_IR 100", "ISO_IR 100"),
    ("ISO 2022 IR 100", "ISO_IR 100"),  # a defined term: Latin-1 with code extensions, written as Latin-1
    ("ISO_IR 999", "ISO_IR 192"),  # unknown: the text pydicom decoded is written as UTF-8
    (None, "ISO_IR 192"),  # none declared, yet not ASCII: same
])
def test_non_ascii_names_keep_a_character_set(charset: str | None, written: str, dicom_corpus: Path,
                                              tmp_path: Path) -> None:
    """A Latin-1 patient name is never written without a Specific Character Set that covers it: SR and SC
    pass dciodvfy (it reports 'Character invalid for character repertoire' otherwise) and read back."""
    src = _latin1_source(dicom_corpus, charset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warning about the unknown character set
        decoded = str(src.PatientName)
        frame = h.windowed(src)
        heat = h.blob(frame.shape)
        det = h.detection(heat[None])
        objects = {"sr": build_sr([src], det, h.card()),
                   "sc": build_overlay_sc(src, frame, heat, det, h.card())}
    assert decoded == LATIN1_NAME
    for kind, obj in objects.items():
        path = tmp_path / f"{kind}.dcm"
        obj.save_as(path, enforce_file_format=True)
        errors, unexpected = h.dciodvfy(path)
        assert errors == [], f"{kind}:\n" + "\n".join(errors)
        assert unexpected == [], f"{kind}:\n" + "\n".join(unexpected)
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == written, kind
        assert str(back.PatientName) == LATIN1_NAME, kind


# invalid for their VR, so left empty and logged; each is patient data the log must not quote
INVALID_PATIENT_VALUES = {
    "PatientBirthDate": "1961-04-23",  # ISO form, not a DA
    "PatientID": "NHS 943 476 5919 / MRN 0043 / " * 3,  # longer than an LO
    "PatientSex": "0000",
    "AccessionNumber": "ACC-2024-000123-EXTRA-LONG",  # longer than an SH
    "StudyDescription": "Knie rechts, Verdacht auf Ruptur des vorderen Kreuzbandes nach Sturz",  # > LO
}


def test_invalid_values_are_logged_without_the_value(dicom_corpus: Path, caplog) -> None:
    """An invalid patient or study value is left empty and logged by keyword, VR and the source's SOP
    Instance UID only: logs carry UIDs, never patient data."""
    src = pydicom.dcmread(dicom_corpus / h.DX_FILE, stop_before_pixels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warnings on assignment (not our log)
        for keyword, value in INVALID_PATIENT_VALUES.items():
            setattr(src, keyword, value)
    caplog.set_level(logging.DEBUG, logger="reporting")
    sr = build_sr([src], h.detection(h.blob((32, 32))[None]), h.card())

    for keyword in INVALID_PATIENT_VALUES:
        assert sr.get(keyword, "") == "", keyword
    records = [r for r in caplog.records if r.name.startswith("reporting") and r.levelno >= logging.WARNING]
    logged = "\n".join(r.getMessage() for r in records)
    for keyword, value in INVALID_PATIENT_VALUES.items():
        assert f"{keyword} " in logged and str(src.SOPInstanceUID) in logged
        assert value[:8] not in logged, f"{keyword}: {logged}"
    assert "0000" not in logged
    assert "invalid for VR DA" in logged and "PatientSex (VR CS)" in logged


def test_declared_default_repertoire_is_written_as_absent(dicom_corpus: Path, tmp_path: Path) -> None:
    """"ISO_IR 6" (written by many modalities) is not a defined term: the default repertoire is declared by
    leaving Specific Character Set out (PS3.3 Table C.12-2; dciodvfy: "Unrecognized defined term"). The SC
    and SR leave it out, and stay valid."""
    src = pydicom.dcmread(dicom_corpus / h.DX_FILE)
    src.SpecificCharacterSet = "ISO_IR 6"
    frame = h.windowed(src)
    heat = h.blob(frame.shape)
    det = h.detection(heat[None])
    objects = {"sc": build_overlay_sc(src, frame, heat, det, h.card()), "sr": build_sr([src], det, h.card())}
    for kind, obj in objects.items():
        assert "SpecificCharacterSet" not in obj, kind
        path = tmp_path / f"{kind}.dcm"
        obj.save_as(path, enforce_file_format=True)
        errors, unexpected = h.dciodvfy(path)
        assert errors == [] and unexpected == [], f"{kind}:\n" + "\n".join(errors + unexpected)
