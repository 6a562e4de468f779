"""The greyscale pipeline of worker.pixels on real corpus instances: pixel padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from worker.pixels import decode_frame

MR_SMALL = "pydicom/test_files/MR_small.dcm"  # 64 x 64, signed 16-bit, window 600 / 1600


def _padded_mr(dicom_corpus: Path, pad: int, *, declared: bool = True) -> tuple[pydicom.Dataset, np.ndarray]:
    """MR_small without its window (raw scanner values, as many MR exports are) and with the corners
    outside a circle set to ``pad``, declared as Pixel Padding Value: a reconstruction's padded field."""
    ds = pydicom.dcmread(dicom_corpus / MR_SMALL)
    arr = ds.pixel_array.copy()
    yy, xx = np.mgrid[:arr.shape[0], :arr.shape[1]]
    outside = (yy - 32) ** 2 + (xx - 32) ** 2 > 30 ** 2
    arr[outside] = pad
    ds.PixelData = arr.tobytes()
    if declared:
        ds.PixelPaddingValue = pad
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    return ds, outside


@pytest.mark.parametrize("pad", [-2000, 4000])
def test_padding_is_left_out_of_the_window_and_shown_black(pad: int, dicom_corpus: Path) -> None:
    """A frame without a window is shown from its minimum to its maximum (MR): the padding value was part
    of that range, so a -2000 padding squeezed the anatomy into the top half of the grey scale (0.52 to 1)
    and a 4000 one into the bottom half, for the model and for the overlay SC alike. The window is
    measured on the image alone (as if there were no padding), and the padding is black."""
    ds, outside = _padded_mr(dicom_corpus, pad)
    out = decode_frame(ds, 1, str(ds.SOPInstanceUID))
    ref_ds, _ = _padded_mr(dicom_corpus, 0, declared=False)
    ref_ds.PixelData = pydicom.dcmread(dicom_corpus / MR_SMALL).pixel_array.tobytes()  # no padding at all
    ref = decode_frame(ref_ds, 1, str(ref_ds.SOPInstanceUID))
    inside = ~outside
    assert out[inside].min() == pytest.approx(0.0, abs=0.02) or out[inside].max() == pytest.approx(1.0, abs=0.02)
    assert out[inside].max() - out[inside].min() > 0.9  # the anatomy has the whole grey scale
    assert np.all(out[outside] == 0.0)
    # where the anatomy spans the same values as the unpadded frame, it looks the same
    inner_range = ref[inside].max() - ref[inside].min()
    assert inner_range > 0.9
    assert np.corrcoef(out[inside], ref[inside])[0, 1] > 0.999


def test_undeclared_values_are_not_padding(dicom_corpus: Path) -> None:
    """Only a declared Pixel Padding Value is padding: the same frame without the declaration keeps the
    old window over all its values (the -2000 corners set its minimum)."""
    ds, outside = _padded_mr(dicom_corpus, -2000, declared=False)
    out = decode_frame(ds, 1, str(ds.SOPInstanceUID))
    assert out[~outside].min() > 0.4
