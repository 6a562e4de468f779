"""A rejection note for results that a revised result replaces (IHE IOCM, Key Object Selection).

After a late slice the series is scored again and its new SR and SC are new instances (:mod:`reporting.uids`);
the PACS then holds the earlier ones too, with their older, possibly other verdict. The new SR names the
earlier SRs as its predecessors, but most viewers ignore that. IHE's Imaging Object Change Management
profile gives a PACS the standard way to hide them: a Key Object Selection document titled (113001, DCM,
"Rejected for Quality Reasons") that lists the instances, which an IOCM-capable PACS then hides from its
users (and keeps or deletes by its own policy). A PACS without IOCM stores it as one more object of the
study, so it is sent only where ``settings.reject_revised_results`` is on.

The note lands in the source study, in a series of its own per source series and model version; its SOP
Instance UID derives from the revision (the frames of the new result), so a re-run sends the same note.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from inference.api import ModelCard
from reporting import _source
from reporting.sr import DEVICE_OBSERVER_TYPE, MANUFACTURER
from reporting.uids import DEVICE_OBSERVER, KOS_INSTANCE, KOS_SERIES, derive_uid, input_key, is_valid_uid

__all__ = ["RejectedObject", "build_rejection_note", "REJECTED_FOR_QUALITY_REASONS"]

log = logging.getLogger(__name__)

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # CID 7011, the IOCM title
KOS_SERIES_NUMBER = 9903
KOS_SERIES_DESCRIPTION = "MedGRU results replaced by a revision"


@dataclass(frozen=True)
class RejectedObject:
    """An earlier result object the note rejects (its series is the result series it was sent in)."""

    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def build_rejection_note(source: Dataset, rejected: Sequence[RejectedObject], card: ModelCard, *,
                         frame_refs: Sequence[tuple[str, int]], ae_title: str = "MEDGRU",
                         manufacturer: str = MANUFACTURER) -> hd.ko.KeyObjectSelectionDocument:
    """The IOCM rejection note for ``rejected``, earlier results by ``card``'s model and version on the
    series of ``source`` (a header of the series' current study: the note lands in its study), revised by
    the result computed from ``frame_refs``. ``ValueError`` if there is nothing to reject or a UID is
    invalid."""
    info = _source.source_info(source, "source")
    if not rejected:
        raise ValueError("a rejection note needs at least one object to reject")
    referenced = []
    for obj in dict.fromkeys(rejected):
        for name in ("series_instance_uid", "sop_class_uid", "sop_instance_uid"):
            if not is_valid_uid(getattr(obj, name)):
                raise ValueError(f"rejected object: {name} is not a valid UID")
        ref = Dataset()  # what highdicom reads of a referenced instance, with the study's patient
        ref.StudyInstanceUID = info.study_instance_uid
        ref.SeriesInstanceUID, ref.SOPClassUID = obj.series_instance_uid, obj.sop_class_uid
        ref.SOPInstanceUID = obj.sop_instance_uid
        info.apply_to(ref)
        if "SpecificCharacterSet" in ref:  # highdicom checks evidence[0]'s against a list that lacks legal
            del ref.SpecificCharacterSet  # values ("\\ISO 2022 IR 87"); the note gets it from apply_to below
        referenced.append(ref)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(ae_title, card.name, card.version, DEVICE_OBSERVER),
        name=ae_title, manufacturer_name=manufacturer, model_name=f"{card.name} {card.version}"[:64],
    )
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=referenced,
        observer_device_context=hd.sr.ObserverContext(observer_type=DEVICE_OBSERVER_TYPE,
                                                      observer_identifying_attributes=device),
        description=f"Replaced by a result of {card.name} {card.version} on more frames of the series"[:1024],
    )
    series_uid = info.series_instance_uid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empty placeholder names, set by apply_to below
        note = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=derive_uid(series_uid, card.name, card.version, KOS_SERIES),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=derive_uid(series_uid, card.name, card.version, KOS_INSTANCE, input_key(frame_refs)),
            instance_number=1,
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    note.SeriesDescription = KOS_SERIES_DESCRIPTION
    note.SeriesDate, note.SeriesTime = note.ContentDate, note.ContentTime  # a study list shows series dates
    info.apply_to(note)
    log.info("built rejection note %s for source series %s, model %s %s: %d earlier objects", note.SOPInstanceUID,
             series_uid, card.name, card.version, len(referenced))
    return note
