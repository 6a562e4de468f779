"""Reading benchmark manifests and image folders into :class:`~inference.api.FrameSequence` objects.

A manifest is a CSV (UTF-8, with or without the byte-order mark Excel writes) with at least the columns
``path`` and ``label``; ``split`` and ``group`` are optional. Paths are relative to the folder that holds
the CSV. A label of ``"normal"``, ``"0"``, ``"notumor"``, ``"no_tumor"`` or ``"healthy"`` (any case,
surrounding blanks ignored; :data:`training.metrics.NORMAL_LABELS`) means a normal image; any other label
names the anomaly class.
The same rule holds for the label folders of an image folder (a brain MRI set's ``notumor``), and for
every command: ``train`` (and ``--supervised``), ``calibrate`` and ``evaluate`` agree on what is normal.

A folder of images is read as ``<folder>/<label>/*.{png,jpg,jpeg,dcm}`` or ``<folder>/<split>/<label>/*``.

Image files are 8-bit greyscale (or RGB with R = G = B) JPEG/PNG: they become one frame (``T = 1``),
float32 in ``[0, 1]``, ``bits_stored = 8``, no modality. A ``.dcm`` file (in a manifest or a folder) is read
by the service's own pixel pipeline (:mod:`worker.pixels`), with its bits stored, modality and every frame
of a multi-frame instance, so that a model calibrated or evaluated on a site's DICOM normals sees them as
the running service will. Training sees images, one frame each: :func:`expand_frames` turns a multi-frame
DICOM row into one row per frame (``ManifestRow.frame``), which :func:`load_frames` reads alone.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from inference.api import FrameSequence
from training.metrics import is_normal_label

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: files read as DICOM, through the service's own pixel pipeline (:mod:`worker.pixels`)
DICOM_SUFFIXES = (".dcm",)
REQUIRED_COLUMNS = ("path", "label")


class InputDataError(ValueError):
    """A manifest, folder or image file that cannot be read; the message names it. The ``medgru``
    commands report it as an error (exit status 2) instead of a traceback."""


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest. ``path`` is absolute."""

    path: Path
    label: str
    split: str | None = None
    group: str | None = None
    #: one frame (1-based) of a multi-frame DICOM file, from :func:`expand_frames`; None: the whole file
    frame: int | None = None

    @property
    def is_normal(self) -> bool:
        """The metrics' rule (:func:`training.metrics.is_normal_label`), so that the rows train and
        calibrate use are the rows evaluate counts as normal."""
        return is_normal_label(self.label)


def read_manifest(csv_path: Path) -> list[ManifestRow]:
    """Rows of a manifest CSV; paths resolved against the CSV's folder.

    Raises ``ValueError`` naming the missing column or the bad row (1-based line number).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputDataError(f"manifest {csv_path} not found")
    base = csv_path.resolve().parent
    rows: list[ManifestRow] = []
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which utf-8 keeps in the first column's name
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in fields]
        if missing:
            raise InputDataError(f"manifest {csv_path} lacks column(s) {', '.join(missing)}; it has {fields}")
        for lineno, raw in enumerate(reader, start=2):
            rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not rec.get("path"):
                raise InputDataError(f"manifest {csv_path} line {lineno}: empty path")
            if not rec.get("label"):
                raise InputDataError(f"manifest {csv_path} line {lineno}: empty label for {rec['path']}")
            p = Path(rec["path"])
            if not p.is_absolute():
                p = base / p
            rows.append(
                ManifestRow(
                    path=p.resolve(),
                    label=rec["label"],
                    split=rec.get("split") or None,
                    group=rec.get("group") or None,
                )
            )
    return rows


def _skipped(p: Path) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, macOS's ``._x.jpeg``) and macOS's ``__MACOSX`` folder: copies
    and metadata, never images of a class."""
    return p.name.startswith(".") or p.name == "__MACOSX"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not _skipped(p) and p.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _skipped(p))


def _with_images(folders: list[Path]) -> list[Path]:
    """Those of ``folders`` that hold an image somewhere below them (hidden entries left out): a folder of
    notes or an empty one loses no image, so it is no reason to refuse a layout."""
    def holds(d: Path) -> bool:
        return bool(_images_in(d)) or any(holds(c) for c in _subdirs(d))
    return [d for d in folders if holds(d)]


def rows_from_folder(folder: Path) -> list[ManifestRow]:
    """Rows for ``<folder>/<label>/*.{png,jpg,jpeg,dcm}``, or ``<folder>/<split>/<label>/*`` when the
    sub-folders themselves hold only folders. Hidden entries and ``__MACOSX`` are left out. A layout whose
    images would be read under the wrong label, or not at all, is refused: a label folder that also holds
    folders, and a split folder named like the normal label (``normal/<patient>/*``)."""
    from training.metrics import is_normal_label

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise InputDataError(f"{folder} is not a folder")
    layout = "expected <label>/*.png|jpg|jpeg|dcm or <split>/<label>/*"
    rows: list[ManifestRow] = []
    for sub in _subdirs(folder):
        images = _images_in(sub)
        subdirs = _subdirs(sub)
        if images:
            subdirs = _with_images(subdirs)
        if images and subdirs:
            raise InputDataError(f"{sub} holds images and folders ({subdirs[0].name}...), whose images would "
                                 f"not be read; {layout}")
        if images:
            rows.extend(ManifestRow(path=p, label=sub.name) for p in images)
        elif subdirs:  # <split>/<label>/
            if is_normal_label(sub.name):
                raise InputDataError(f"{sub} holds folders ({subdirs[0].name}...): read as a split, its images "
                                     f"would be labelled by folder name, none of them normal; {layout}")
            for lab in subdirs:
                deeper = _with_images(_subdirs(lab))
                if deeper:
                    raise InputDataError(f"{lab} holds folders ({deeper[0].name}...), whose images would not be "
                                         f"read; {layout}")
                rows.extend(ManifestRow(path=p, label=lab.name, split=sub.name) for p in _images_in(lab))
    if not rows:
        raise InputDataError(f"no images found under {folder} (expected <label>/*.png|jpg|jpeg|dcm)")
    return rows


def read_image(path: Path) -> np.ndarray:
    """An 8-bit image file as float32 greyscale ``(H, W)`` in ``[0, 1]``."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputDataError(f"cannot read image {path}")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint16:
        return (img.astype(np.float32) / 65535.0).clip(0.0, 1.0)
    if img.dtype != np.uint8:
        raise InputDataError(f"image {path} has unsupported dtype {img.dtype}")
    return img.astype(np.float32) / 255.0


def expand_frames(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """``rows`` with each multi-frame DICOM row replaced by one row per frame (``frame`` 1..n, the same
    label, split and group; without a group, the file is the group, so that a grouped split keeps its frames
    together). Other rows are kept as they are, in order; only DICOM headers are read. A file whose header
    cannot be read is kept whole: loading it names the problem."""
    import pydicom

    out: list[ManifestRow] = []
    for row in rows:
        n = 1
        if row.frame is None and row.path.suffix.lower() in DICOM_SUFFIXES:
            try:
                n = int(pydicom.dcmread(row.path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
            except Exception:  # noqa: BLE001 - any unreadable header: kept whole, load_frames names the error
                n = 1
        if n > 1:
            group = row.group or str(row.path)
            out += [ManifestRow(row.path, row.label, row.split, group, frame=i) for i in range(1, n + 1)]
        else:
            out.append(row)
    return out


def load_dicom(path: Path, frame: int | None = None) -> FrameSequence:
    """A DICOM file as the service reads it (:mod:`worker.pixels`: modality LUT, VOI or the fallback window,
    MONOCHROME1 inverted, colour to luminance): every frame of a multi-frame instance in order (or frame
    ``frame`` alone, 1-based), with its bits stored, modality and body part. A file pydicom cannot read,
    whose pixels it cannot decode, or without that frame, raises :class:`InputDataError` naming the file."""
    import pydicom

    from worker.pixels import FrameLoadError, load_frames as dicom_frames

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise InputDataError(f"cannot read DICOM image {path}: not readable DICOM ({type(exc).__name__}: {exc})"
                             ) from exc
    uid = str(ds.get("SOPInstanceUID", "") or path.name)
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
        numbers = list(range(1, n + 1)) if frame is None else [int(frame)]
        if not 1 <= numbers[0] <= n:
            raise ValueError(f"no frame {frame}: the file has {n}")
        frames, bits = dicom_frames([(path, uid, i) for i in numbers], datasets={path: ds})
    except (FrameLoadError, ValueError, TypeError) as exc:
        raise InputDataError(f"cannot read DICOM image {path}: {exc}") from exc
    return FrameSequence(frames=frames, modality=str(ds.get("Modality", "") or ""),
                         body_part=str(ds.get("BodyPartExamined", "") or ""), bits_stored=bits,
                         series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                         frame_refs=tuple((uid, i) for i in numbers))


def load_frames(row_or_path: ManifestRow | Path | str) -> FrameSequence:
    """One file as a :class:`FrameSequence`: an image file as one frame (``T = 1``, ``bits_stored = 8``,
    grey value / 255), a ``.dcm`` file by :func:`load_dicom` (only the row's ``frame`` where it has one)."""
    path = row_or_path.path if isinstance(row_or_path, ManifestRow) else Path(row_or_path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return load_dicom(path, row_or_path.frame if isinstance(row_or_path, ManifestRow) else None)
    frame = read_image(path)
    return FrameSequence(frames=frame[None], modality="", bits_stored=8)


def load_sequences(rows: Iterable[ManifestRow | Path], workers: int = 2) -> list[FrameSequence]:
    """Load many images (threads: cv2 releases the GIL while decoding). Order is kept."""
    rows = list(rows)
    if workers <= 1 or len(rows) < 8:
        return [load_frames(r) for r in rows]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load_frames, rows))


def split_rows(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    """Rows of one split (case-insensitive)."""
    s = split.lower()
    return [r for r in rows if (r.split or "").lower() == s]


def rows_of_split(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    """Rows of ``split`` when the rows carry splits; all rows otherwise."""
    return split_rows(rows, split) if any(r.split for r in rows) else list(rows)
