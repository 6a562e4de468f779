"""Load a sequence's frames from the spool into an :class:`inference.api.FrameSequence`.

The frames of an assembled sequence are read from the spool through the DICOM greyscale pipeline of
:mod:`worker.pixels` (decode, modality LUT, VOI or a fallback window, MONOCHROME1 inverted, resized to the
first frame); every failure raises :class:`FrameLoadError` naming the SOP Instance UID.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.api import FrameSequence
from storage.models import Instance, SequenceRecord, Series
from worker.pixels import FrameLoadError, load_frames

log = logging.getLogger(__name__)


def sequence_instances(session: Session, sequence: SequenceRecord) -> dict[str, Instance]:
    """The Instance rows named by a sequence's frame references, by SOP Instance UID."""
    uids = sorted({str(ref[0]) for ref in sequence.frame_refs})
    rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids))).all()
    found = {row.sop_instance_uid: row for row in rows}
    missing = [u for u in uids if u not in found]
    if missing:
        raise FrameLoadError(missing[0], f"is referenced by sequence {sequence.id} but not in the database")
    purged = [row for row in rows if row.purged_at is not None]
    if purged:  # a retried old job: retention removed its files (resend the series from the PACS)
        raise purged_error(purged[0])
    return found


def purged_error(row: Instance) -> FrameLoadError:
    """The error for a frame whose file retention removed (what to do included)."""
    return FrameLoadError(row.sop_instance_uid, f"was removed from the spool by retention on "
                                                f"{row.purged_at:%Y-%m-%d %H:%M} UTC; send the series again, "
                                                f"then retry the job")


def first_purged_instance(session: Session, sequence: SequenceRecord) -> Instance | None:
    """An instance of the sequence whose file retention removed, if any."""
    uids = sorted({str(ref[0]) for ref in sequence.frame_refs})
    return session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids),
                                                  Instance.purged_at.is_not(None)).limit(1)).first()


def context_frame_count(sequence: SequenceRecord, series_of: Mapping[str, int]) -> int:
    """How many leading frames of ``sequence`` belong to another series: a prior study's frames, which the
    assembler prepends with ``settings.add_prior_study``. They are context the ConvGRU reads, not frames
    the verdict judges (:attr:`inference.api.FrameSequence.context_frames`). ``series_of``: each
    referenced SOP Instance UID's series id (:func:`instance_series`)."""
    count = 0
    for uid, _ in sequence.frame_refs:
        if series_of.get(str(uid)) == sequence.series_fk:
            break
        count += 1
    return min(count, max(len(sequence.frame_refs) - 1, 0))


def instance_series(session: Session, sequence: SequenceRecord) -> dict[str, int]:
    """The series id of each instance the sequence references, by SOP Instance UID (purged ones too)."""
    uids = sorted({str(ref[0]) for ref in sequence.frame_refs})
    rows = session.execute(select(Instance.sop_instance_uid, Instance.series_fk)
                           .where(Instance.sop_instance_uid.in_(uids)))
    return {str(uid): int(series_fk) for uid, series_fk in rows}


def load_sequence(settings, session: Session, sequence_id: int) -> FrameSequence:
    """Load the frames of :class:`SequenceRecord` ``sequence_id`` from ``settings.spool_dir``."""
    return load_sequence_with_sources(settings, session, sequence_id)[0]


def load_sequence_with_sources(settings, session: Session, sequence_id: int
                               ) -> tuple[FrameSequence, list[Dataset]]:
    """The sequence's frames and the datasets of its instances (order of first frame), read once."""
    sequence = session.get(SequenceRecord, sequence_id)
    if sequence is None:
        raise LookupError(f"no sequence {sequence_id}")
    series: Series = sequence.series
    instances = sequence_instances(session, sequence)
    refs: list[tuple[Path, str, int]] = []
    for uid, number in sequence.frame_refs:
        inst = instances[str(uid)]
        refs.append((settings.spool_dir / inst.path, inst.sop_instance_uid, int(number)))
    datasets: dict[Path, Dataset] = {}
    frames, bits = load_frames(refs, datasets=datasets)
    log.debug("sequence %s of series %s: %d frames %s", sequence_id, series.series_uid, frames.shape[0],
              frames.shape[1:])
    context = context_frame_count(sequence, {uid: row.series_fk for uid, row in instances.items()})
    fs = FrameSequence(
        frames=frames,
        modality=series.modality or "",
        body_part=series.body_part or "",
        bits_stored=bits,
        series_uid=series.series_uid,
        frame_refs=tuple((str(u), int(n)) for u, n in sequence.frame_refs),
        context_frames=context,
    )
    return fs, list(datasets.values())
