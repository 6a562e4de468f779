"""Patient and study attributes taken from a source image, cleaned so the result object is valid.

Result objects must land in the same patient and study as their source, so the identifying attributes are
copied as they are. Real archives hold values that are not valid for their VR (trailing NUL padding,
``PatientSex = "0000"``, ``StudyDate = "1995.07.20"``); copied blindly they would make our own objects
invalid. The rules here: trailing NUL/space padding is dropped (it is padding, not content); a value still
invalid for its VR is replaced by an empty value (all these attributes are Type 2, so empty is legal) and
a warning names the attribute, its VR and the source instance's UID, never the value (patient data). The
UIDs are never altered: an invalid Study Instance UID is an error, because the result would land in
another study.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from reporting.uids import is_valid_uid

log = logging.getLogger(__name__)

# keyword -> VR; the Patient and General Study module attributes copied into every result object
PATIENT_STUDY_KEYWORDS: dict[str, str] = {
    "PatientName": "PN",
    "PatientID": "LO",
    "IssuerOfPatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "StudyID": "SH",
    "AccessionNumber": "SH",
    "ReferringPhysicianName": "PN",
    "StudyDescription": "LO",
}
# copied only when the source has a (valid) value: Type 3 in the target modules
OPTIONAL_KEYWORDS = frozenset({"IssuerOfPatientID", "StudyDescription"})
PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
_CHARSETS_OK = frozenset({"ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144",
                          "ISO_IR 127", "ISO_IR 126", "ISO_IR 138", "ISO_IR 148", "ISO_IR 13", "ISO_IR 166",
                          "ISO_IR 192", "GB18030", "GBK"})
# a single value may also name one of these with code extensions (PS3.3 Table C.12-3, single-byte, e.g.
# "ISO 2022 IR 100"). Alone, such a term has the same repertoire as its ISO_IR form, and pydicom decodes
# both alike; the result declares the ISO_IR form, because highdicom refuses a single code-extension term.
# The multi-byte ISO 2022 terms (IR 87, 159, 149, 58) are legal only as a second or later value.
_CHARSETS_2022_SINGLE_BYTE: dict[str, str] = {
    f"ISO 2022 IR {n}": f"ISO_IR {n}" for n in (6, 100, 101, 109, 110, 144, 127, 126, 138, 148, 13, 166)}
#: written where the source's character set is absent or unknown but a copied value is not ASCII: UTF-8
#: encodes whatever pydicom decoded, the default repertoire would make the object invalid
UTF8_CHARSET = "ISO_IR 192"


#: SOP classes whose IODs hold a single frame: a Referenced Frame Number to them is an error (dciodvfy),
#: even where a non-conformant instance of one carries Number of Frames > 1
SINGLE_FRAME_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image Storage
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image Storage
})


def referable_frames(ds: Dataset) -> int:
    """How many frames of ``ds`` a reference may name by Referenced Frame Number: its Number of Frames,
    or 0 where it has one frame or its SOP class is a single-frame one (then the instance is referenced
    as a whole)."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    return n if n > 1 and str(ds.get("SOPClassUID", "")) not in SINGLE_FRAME_SOP_CLASSES else 0


def require_dataset(value: Any, name: str) -> Dataset:
    if not isinstance(value, Dataset):
        raise TypeError(f"{name} must be a pydicom Dataset, not {type(value).__name__}")
    return value


def require_attr(ds: Dataset, keyword: str, what: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        uid = ds.get("SOPInstanceUID", "<no SOPInstanceUID>")
        raise ValueError(f"{what} {uid} lacks {keyword}, which the result object needs")
    return value


def require_uid(ds: Dataset, keyword: str, what: str) -> str:
    value = str(require_attr(ds, keyword, what)).rstrip("\x00 ")
    if not is_valid_uid(value):
        uid = ds.get("SOPInstanceUID", "<no SOPInstanceUID>")
        raise ValueError(f"{what} {uid}: {keyword} {value!r} is not a valid UID; no result object built")
    return value


def _clean_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).rstrip("\x00 ")


_LEGACY_DA = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")  # ACR-NEMA "1995.07.20"
_LEGACY_TM = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?$")  # ACR-NEMA "11:22:07"


def _modernise(vr: str, value: str) -> str:
    """Rewrite the ACR-NEMA date/time forms that old archives still hold into DICOM DA/TM."""
    if vr == "DA" and (m := _LEGACY_DA.match(value)):
        return "".join(m.groups())
    if vr == "TM" and (m := _LEGACY_TM.match(value)):
        return "".join(g for g in m.groups() if g)
    return value


def _is_valid(vr: str, value: str) -> bool:
    try:
        validate_value(vr, value, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class SourceInfo:
    """What a result object copies from (and says about) its source image."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    attributes: dict[str, str]  # keyword -> cleaned value, for PATIENT_STUDY_KEYWORDS
    specific_character_set: str | None

    def apply_to(self, target: Dataset) -> None:
        """Write the patient and study attributes (exact copies, cleaned) into ``target``."""
        if self.specific_character_set:
            target.SpecificCharacterSet = self.specific_character_set
        for keyword, value in self.attributes.items():
            if keyword in OPTIONAL_KEYWORDS and not value:
                if keyword in target:
                    del target[keyword]
                continue
            setattr(target, keyword, value)
        target.StudyInstanceUID = self.study_instance_uid


def source_info(ds: Dataset, what: str = "source instance", *, patient_study: bool = True) -> SourceInfo:
    """Validate a source image dataset and extract the attributes a result object copies.

    With ``patient_study=False`` only the UIDs and the modality are read (for the other instances of a
    sequence, whose patient and study attributes are not copied).
    """
    require_dataset(ds, what)
    sop_uid = require_uid(ds, "SOPInstanceUID", what)
    info_attrs: dict[str, str] = {}
    for keyword, vr in (PATIENT_STUDY_KEYWORDS.items() if patient_study else ()):
        raw = ds.get(keyword)
        value = _modernise(vr, _clean_text(raw))
        if keyword == "PatientSex" and value and value.upper() not in PATIENT_SEX_VALUES:
            log.warning("source %s: PatientSex (VR CS) is not M, F or O; the result leaves it empty", sop_uid)
            value = ""
        elif value and not _is_valid(vr, value):
            # the value itself is patient data: the log names the attribute, never its value
            log.warning("source %s: %s is invalid for VR %s; the result leaves it empty", sop_uid, keyword, vr)
            value = ""
        info_attrs[keyword] = value
    charset = ds.get("SpecificCharacterSet")
    if isinstance(charset, pydicom.multival.MultiValue):
        charset_text: str | None = "\\".join(charset)
        if not all(c in _CHARSETS_OK or c.startswith("ISO 2022") or c == "" for c in charset):
            charset_text = None
    else:
        charset_text = _clean_text(charset) or None
        if charset_text == "ISO_IR 6":
            # the default repertoire, declared: Table C.12-2 declares it by absence (dciodvfy: "Unrecognized
            # defined term"); written as absent, so a value that is not ASCII gets UTF-8 below
            charset_text = None
        elif charset_text in _CHARSETS_2022_SINGLE_BYTE:
            charset_text = _CHARSETS_2022_SINGLE_BYTE[charset_text]
        elif charset_text is not None and charset_text not in _CHARSETS_OK:
            log.warning("source %s: unknown SpecificCharacterSet %r dropped (text that is not ASCII is "
                        "written as %s)", sop_uid, charset_text, UTF8_CHARSET)
            charset_text = None
    if charset_text is None and not all(value.isascii() for value in info_attrs.values()):
        charset_text = UTF8_CHARSET
    return SourceInfo(
        study_instance_uid=require_uid(ds, "StudyInstanceUID", what),
        series_instance_uid=require_uid(ds, "SeriesInstanceUID", what),
        sop_instance_uid=sop_uid,
        sop_class_uid=require_uid(ds, "SOPClassUID", what),
        modality=_clean_text(ds.get("Modality")),
        attributes=info_attrs,
        specific_character_set=charset_text,
    )
