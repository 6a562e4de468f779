"""DICOM pixels to the frames a detector reads: the greyscale pipeline of the service, with no database.

Used by the worker (:mod:`worker.loading`, frames of an assembled sequence from the spool) and by training,
evaluation and calibration for ``.dcm`` files named in a manifest or found in a folder, so that a model is
trained, calibrated and served on frames made the same way.

Each frame goes through the DICOM greyscale pipeline up to (but not including) the presentation step:

1. decode the stored pixels (pydicom + pylibjpeg/Pillow); a multi-frame instance yields the frame named
   by the sequence's 1-based frame number;
2. colour images (RGB, YBR_*, PALETTE COLOR) are turned into grey luminance (ITU-R BT.601 weights) and
   scaled by their stored bit depth; no modality LUT or window applies to them;
3. greyscale images: the modality LUT (Modality LUT Sequence, else Rescale Slope/Intercept, taken from the
   top level or from the enhanced multi-frame functional groups);
4. the VOI: the first window (Window Center/Width with its VOI LUT Function: LINEAR, LINEAR_EXACT,
   SIGMOID), else the first VOI LUT Sequence item; an image with neither is either a rendering already
   (at most 8 bits stored, no modality rescale: a secondary capture, an exported screen), shown over its
   stored range (v / 255, as training reads its image files), or raw scanner or detector values: an MR
   frame is shown from its minimum to its maximum (the brain model's training images are min-max
   exports; ``benchmarks/results/mr_no_voi_window.md``), any other a robust window from the 0.5th to the
   99.5th percentile of that frame (raw CR/DX/CT values carry collimation and direct-exposure tails);
5. MONOCHROME1 inverted so that high values are bright;
6. frames whose size differs from the first frame's are resized to it (area interpolation when shrinking,
   linear when growing).

Every failure raises :class:`FrameLoadError` naming the SOP Instance UID, what went wrong and what
happens to it (the job fails; its spool file is left as is).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import UID

log = logging.getLogger(__name__)

#: robust window used when a greyscale image of more than 8 bits carries no VOI of its own
ROBUST_PERCENTILES = (0.5, 99.5)
#: modalities whose frames without a VOI are shown over their own range (minimum to maximum) instead
MIN_MAX_MODALITIES = frozenset({"MR"})
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class FrameLoadError(RuntimeError):
    """A frame of a sequence could not be loaded; the message names the SOP Instance UID."""

    def __init__(self, sop_instance_uid: str, message: str):
        self.sop_instance_uid = sop_instance_uid
        super().__init__(f"SOP Instance {sop_instance_uid}: {message}")


# ------------------------------------------------------------------------------------ DICOM helpers
def _first(value: Any) -> Any:
    """The first value of a possibly multi-valued element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _functional_item(ds: Dataset, index: int, sequence_keyword: str) -> Dataset | None:
    """``sequence_keyword``'s first item for frame ``index`` (0-based) in an enhanced multi-frame dataset:
    the per-frame functional group first, then the shared one."""
    for groups_kw, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups is None or len(groups) <= i:
            continue
        seq = groups[i].get(sequence_keyword)
        if seq is not None and len(seq):
            return seq[0]
    return None


def _lut_item(ds: Dataset, sequence_keyword: str) -> Dataset | None:
    """The first item of the LUT Sequence ``sequence_keyword`` when it holds a LUT (a three-value LUT
    Descriptor and LUT Data), else None: some files carry an item with both empty, which is no LUT at
    all, so the rescale or the other VOI paths apply as if the sequence were absent."""
    seq = ds.get(sequence_keyword)
    if not seq:
        return None
    item = seq[0]
    descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
    if not isinstance(descriptor, Sequence) or len(descriptor) != 3 or data is None or not len(data):
        return None
    return item


def _modality_lut(arr: np.ndarray, ds: Dataset, index: int) -> tuple[np.ndarray, bool]:
    """The modality LUT's output, and whether it changed the stored values (a LUT or a rescale)."""
    item = _lut_item(ds, "ModalityLUTSequence")
    if item is not None:
        return _lut_lookup(arr, ds, item), True
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        item = _functional_item(ds, index, "PixelValueTransformationSequence")
        if item is not None:
            slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    out = arr.astype(np.float64)
    slope = float(_first(slope)) if slope not in (None, "") else 1.0
    intercept = float(_first(intercept)) if intercept not in (None, "") else 0.0
    if slope != 1.0 or intercept != 0.0:
        return out * slope + intercept, True
    return out, False


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / max(width, 1e-6), -60.0, 60.0)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    width = max(width, 1.0)  # LINEAR requires width >= 1
    if width == 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _padding_mask(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The stored pixels that are padding (Pixel Padding Value, up to Pixel Padding Range Limit; PS3.3
    C.7.5.1.1.2), or None where there are none (or every pixel is one, which is no image to mask)."""
    pad, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    try:
        values = [int(_first(v)) for v in (pad, limit) if v not in (None, "")]
    except (TypeError, ValueError):
        return None
    if pad in (None, "") or not values:
        return None
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:  # a US-read value of a signed image
        bits = int(ds.get("BitsAllocated", 16) or 16)
        values = [v - 2 ** bits if v >= 2 ** (bits - 1) else v for v in values]
    lo, hi = min(values), max(values)
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() and not mask.all() else None


def _robust_window(values: np.ndarray, percentiles: tuple[float, float] = ROBUST_PERCENTILES,
                   padding: np.ndarray | None = None) -> np.ndarray:
    """``values`` onto [0, 1] between two percentiles of the pixels that are not ``padding``."""
    sample = values[~padding] if padding is not None else values
    lo, hi = np.percentile(sample, percentiles)
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    if not hi > lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _stored_range(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """An image of at most 8 stored bits: its values over the stored range (``v / 255`` for unsigned
    8-bit pixels), or None for a deeper image."""
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 1 <= bits <= 8:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo = -float(2 ** (bits - 1)) if signed else 0.0
    return np.clip((values - lo) / float(2 ** bits - 1), 0.0, 1.0)


def _lut_table(ds: Dataset, item: Dataset) -> np.ndarray:
    """The entries of a LUT item (:func:`_lut_item`): LUT Data as read (US / SS), or unpacked from OW words
    in the data set's byte order."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        little = UID(str(ts)).is_little_endian if ts else True
        return np.frombuffer(bytes(data), dtype="<u2" if little else ">u2", count=len(data) // 2).astype(np.float64)
    return np.asarray([data] if np.isscalar(data) else list(data), dtype=np.float64)


def _lut_lookup(values: np.ndarray, ds: Dataset, item: Dataset) -> np.ndarray:
    """``values`` through a Modality or VOI LUT item (PS3.3 C.11.1.1, C.11.2.1.1): floored (as pydicom
    truncates), a value below the first mapped one takes the first entry, one past the last the last.

    The lookup is ours, not pydicom's: pydicom 3.0.2's ``apply_voi`` builds its indices in the LUT's output
    type, so an 8-bit LUT of more than 256 entries (a 12-bit CR mapped to 8 bits) wrapped input 256 to
    entry 0, and ``apply_modality_lut`` builds them in the pixels' type."""
    table = _lut_table(ds, item)
    first = int(item.LUTDescriptor[1])
    entries = min(int(item.LUTDescriptor[0]) or 2 ** 16, len(table))
    index = np.clip(np.floor(values).astype(np.int64) - first, 0, entries - 1)
    return table[index]


def _voi(values: np.ndarray, ds: Dataset, index: int, rescaled: bool,
         padding: np.ndarray | None = None) -> np.ndarray:
    center, width, function = ds.get("WindowCenter"), ds.get("WindowWidth"), ds.get("VOILUTFunction", "")
    if center is None or width is None:
        item = _functional_item(ds, index, "FrameVOILUTSequence")
        if item is not None:
            center, width = item.get("WindowCenter"), item.get("WindowWidth")
            function = item.get("VOILUTFunction", function)
    if center not in (None, "") and width not in (None, ""):
        try:
            c, w = float(_first(center)), float(_first(width))
        except (TypeError, ValueError):
            c = w = float("nan")
        if np.isfinite(c) and np.isfinite(w) and w > 0:
            return _window(values, c, w, str(function or ""))
    lut_item = _lut_item(ds, "VOILUTSequence")
    if lut_item is not None:
        # the VOI LUT maps the modality-LUT output (a rescale's too, not the stored values); its descriptor
        # gives the output bit depth
        out = _lut_lookup(values, ds, lut_item)
        bits = int(lut_item.LUTDescriptor[2])
        top = float(2 ** bits - 1) if bits > 0 else float(out.max() or 1.0)
        if out.max() > top:  # descriptors lie sometimes; fall back to the actual range
            top = float(out.max())
        return np.clip(out / top, 0.0, 1.0)
    if not rescaled:
        # no VOI, no rescale, at most 8 bits: a rendering already; stretching it would show the model an
        # image that its training files never were (benchmarks/serving_consistency.py measures this)
        rendered = _stored_range(values, ds)
        if rendered is not None:
            return rendered
    if str(ds.get("Modality", "")).upper() in MIN_MAX_MODALITIES:
        return _robust_window(values, (0.0, 100.0), padding)
    return _robust_window(values, padding=padding)


def _to_grey(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """A decoded colour frame as grey in [0, 1]."""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # 8 or 16 bit RGB
        top = 255.0 if arr.dtype == np.uint8 else 65535.0
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
        top = float(2 ** bits - 1)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] >= 3:
        arr = arr[..., :3] @ _LUMA
    elif arr.ndim == 3:
        arr = arr[..., 0]
    return np.clip(arr / top, 0.0, 1.0)


def frame_to_unit(arr: np.ndarray, ds: Dataset, index: int = 0) -> np.ndarray:
    """One decoded frame (as pydicom returns it) → float64 greyscale in ``[0, 1]``, display orientation."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in _COLOUR or photometric == "PALETTE COLOR" or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        return _to_grey(arr, ds, photometric)
    values, rescaled = _modality_lut(arr, ds, index)
    # padding (the outside of a CT's round field, a detector's masked border) is no part of the image: the
    # fallback windows are measured without it (a -2000 padding stretched an MR's minimum-to-maximum window
    # to twice the anatomy's range, washing it out), and it is shown black
    padding = _padding_mask(arr, ds)
    out = _voi(values, ds, index, rescaled, padding)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    if padding is not None:
        out = np.where(padding, 0.0, out)
    return out


def _resize(frame: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if frame.shape == (h, w):
        return frame
    shrinking = frame.shape[0] * frame.shape[1] > h * w
    out = cv2.resize(frame.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------- the loader
def read_dataset(path: Path, sop_instance_uid: str) -> Dataset:
    if not Path(path).is_file():
        raise FrameLoadError(sop_instance_uid, f"spool file {path} is missing; the job cannot read this frame")
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise FrameLoadError(
            sop_instance_uid, f"spool file {path} is not readable DICOM ({type(exc).__name__}: {exc}); "
            "the job cannot read this frame"
        ) from exc


def _fill_missing_pixel_attributes(ds: Dataset, sop_instance_uid: str) -> None:
    """Type 1 Image Pixel attributes some archives' files lack, set to what other readers assume
    (unsigned; one sample for MONOCHROME); a warning names the instance."""
    if "PixelData" not in ds:
        return
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if "PixelRepresentation" not in ds:
        log.warning("SOP Instance %s lacks Pixel Representation; decoded as unsigned", sop_instance_uid)
        ds.PixelRepresentation = 0
    if "SamplesPerPixel" not in ds and photometric.startswith("MONOCHROME"):
        log.warning("SOP Instance %s lacks Samples per Pixel; decoded as 1 (%s)", sop_instance_uid, photometric)
        ds.SamplesPerPixel = 1


def decode_frame(ds: Dataset, frame_number: int, sop_instance_uid: str) -> np.ndarray:
    """Decode the 1-based ``frame_number`` of ``ds`` into greyscale ``[0, 1]`` (float64, H×W)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise FrameLoadError(sop_instance_uid, "has no pixel data; the job cannot use it as a frame")
    _fill_missing_pixel_attributes(ds, sop_instance_uid)
    frames_value: Any = "?"
    try:
        frames_value = ds.get("NumberOfFrames", 1)
        n_frames = int(frames_value or 1)
    except (TypeError, ValueError) as exc:  # an IS value pydicom kept as text, such as '1A'
        raise FrameLoadError(
            sop_instance_uid, f"Number of Frames {frames_value!r} is not a number; "
            "the job cannot tell which frame to read"
        ) from exc
    if not 1 <= frame_number <= n_frames:
        raise FrameLoadError(sop_instance_uid, f"frame {frame_number} requested but the instance has {n_frames}")
    try:
        arr = pixel_array(ds, index=frame_number - 1) if n_frames > 1 else ds.pixel_array
        arr = np.asarray(arr)
        if n_frames == 1 and arr.ndim >= 3 and arr.shape[0] == 1:
            arr = arr[0]
        out = frame_to_unit(arr, ds, frame_number - 1)
    except FrameLoadError:
        raise
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise FrameLoadError(
            sop_instance_uid,
            f"cannot decode frame {frame_number} (transfer syntax {ts}): {type(exc).__name__}: {exc}",
        ) from exc
    if out.ndim != 2 or out.shape[0] < 2 or out.shape[1] < 2:
        raise FrameLoadError(sop_instance_uid, f"frame {frame_number} has unusable shape {out.shape}")
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return out


def load_frames(refs: Sequence[tuple[Path, str, int]], *, datasets: dict[Path, Dataset] | None = None
                ) -> tuple[np.ndarray, int]:
    """Frames named by ``(path, sop_instance_uid, frame_number)`` → ``(T, H, W)`` float32 and bits stored.

    Files are read once each however many frames they give (into ``datasets``, by path, in order of
    first use, when the caller passes a dict). Frames are resized to the first one's size.
    """
    if not refs:
        raise ValueError("a sequence needs at least one frame")
    cache: dict[Path, Dataset] = datasets if datasets is not None else {}
    frames: list[np.ndarray] = []
    bits_stored = 8
    for i, (path, uid, number) in enumerate(refs):
        ds = cache.get(path)
        if ds is None:
            ds = cache[path] = read_dataset(path, uid)
        frame = decode_frame(ds, int(number), uid)
        if i == 0:
            bits_stored = int(ds.get("BitsStored", 8) or 8)
            shape = frame.shape
        else:
            frame = _resize(frame, shape)
        frames.append(frame.astype(np.float32))
    stack = np.clip(np.stack(frames, axis=0), 0.0, 1.0).astype(np.float32)
    return stack, bits_stored
