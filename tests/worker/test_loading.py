"""Frame loading on real corpus files: windowing, MONOCHROME1, multi-frame, JPEG 2000, colour, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.api import FrameSequence
from tests.worker.conftest import BRAINIX, KNEE, add_series
from worker.loading import load_sequence
from worker.pixels import FrameLoadError, decode_frame, load_frames

CR_MONO1 = "dwv/data/gdcm-CR-MONO1-10-chest.dcm"
MULTIFRAME = "dwv/data/multiframe-test1.dcm"  # 16 frames, no window
RGB = "pydicom-data/SC_rgb.dcm"
VOI_LUT = "pydicom-data/vlut_04.dcm"
EMPTY_LUTS = "dwv/data/leadtools-8BitsJpegLossyGrayScale.dcm"  # empty Modality LUT and VOI LUT items
CT_SMALL = "pydicom/test_files/CT_small.dcm"  # signed 16-bit, Rescale Slope 1 / Intercept -1024, no window
TRUNCATED = "synthetic_broken/truncated_in_pixeldata.dcm"
BAD_FRAME_COUNT = "pydicom/test_files/badVR.dcm"  # Number of Frames '1A'


def _ref(path: Path, frame: int = 1) -> tuple[Path, str, int]:
    return path, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), frame


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def test_brainix_series_is_windowed_into_unit_range(dicom_corpus):
    files = sorted((dicom_corpus / BRAINIX).glob("*.dcm"))
    frames, bits = load_frames([_ref(p) for p in files])
    assert frames.shape == (len(files), 288, 288) and frames.dtype == np.float32
    assert bits == 12
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    FrameSequence(frames=frames)  # the detector interface accepts it as is
    ds = pydicom.dcmread(files[0])
    raw = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2 LINEAR
    np.testing.assert_allclose(frames[0], expected, atol=1e-5)
    assert 0.02 < frames[0].mean() < 0.9


def test_monochrome1_is_inverted(dicom_corpus):
    path = dicom_corpus / CR_MONO1
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    frames, bits = load_frames([_ref(path)])
    assert bits == int(ds.BitsStored) and frames.shape == (1, ds.Rows, ds.Columns)
    raw = ds.pixel_array.astype(np.float64)
    assert _corr(frames[0], raw) < -0.9  # high stored values (dense) are dark after inversion
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_allclose(frames[0], 1.0 - np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-5)


def test_multiframe_picks_frames_by_number(dicom_corpus):
    path = dicom_corpus / MULTIFRAME
    ds = pydicom.dcmread(path)
    all_frames = ds.pixel_array
    assert all_frames.shape[0] == 16
    _, uid, _ = _ref(path)
    frames, _ = load_frames([(path, uid, 3), (path, uid, 11), (path, uid, 1)])
    assert frames.shape == (3,) + all_frames.shape[1:]
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    # each loaded frame matches its own stored frame, not another one
    for loaded, number in zip(frames, (3, 11, 1)):
        own = _corr(loaded, all_frames[number - 1])
        assert own > 0.99
        other = 12 if number != 12 else 2
        assert own > _corr(loaded, all_frames[other - 1]) or np.array_equal(all_frames[number - 1], all_frames[other - 1])
    with pytest.raises(FrameLoadError, match=uid):
        load_frames([(path, uid, 17)])


def test_mr_without_voi_is_shown_over_its_own_range(dicom_corpus):
    """A 12-bit MR frame with no VOI: minimum to maximum, as the brain model's training images were
    exported (benchmarks/results/mr_no_voi_window.md), not the percentile window of other modalities."""
    path = dicom_corpus / "pydicom-data/emri_small.dcm"  # 12-bit MR, no Window Center/Width, no VOI LUT
    ds = pydicom.dcmread(path)
    assert int(ds.BitsStored) == 12 and "WindowCenter" not in ds and "VOILUTSequence" not in ds
    frames, _ = load_frames([_ref(path, 2)])
    f = frames[0]
    raw = ds.pixel_array[1].astype(np.float64)
    np.testing.assert_allclose(f, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)
    # only the brightest pixel reaches white; the percentile window would have saturated about 0.5 %
    assert (f >= 1.0 - 1e-6).sum() == (raw == raw.max()).sum()
    assert np.percentile(raw, 99.5) < raw.max()


def test_eight_bit_corpus_image_without_voi_keeps_its_stored_range(dicom_corpus):
    path = dicom_corpus / MULTIFRAME  # 8-bit MR, no Window Center/Width, no VOI LUT, no rescale
    frames, _ = load_frames([_ref(path, 8)])
    raw = pydicom.dcmread(path).pixel_array[7].astype(np.float64)
    assert raw.max() < 255  # the robust window would have stretched it to 1.0
    np.testing.assert_allclose(frames[0], raw / 255.0, atol=1e-6)


def _secondary_capture(tmp_path: Path, pixels: np.ndarray, bits: int, **extra) -> Path:
    """``pixels`` in an uncompressed MONOCHROME2 Secondary Capture written to disk, with no VOI."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.Rows, ds.Columns = "OT", *pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint8 if bits <= 8 else np.uint16)).tobytes()
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_eight_bit_image_without_voi_keeps_its_stored_range(tmp_path):
    """An 8-bit image with no VOI is a rendering already: v / 255, as training reads its image files,
    not stretched by the robust window (which would map this image's 40..200 onto 0..1)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(40, 201, size=(32, 48)).astype(np.uint8)
    frames, bits = load_frames([_ref(_secondary_capture(tmp_path, pixels, 8))])
    assert bits == 8
    np.testing.assert_allclose(frames[0], pixels / 255.0, atol=1e-6)
    assert frames[0].min() >= 40 / 255 - 1e-6 and frames[0].max() <= 200 / 255 + 1e-6
    # a rescale makes the values something other than a rendering: the robust window applies again
    rescaled, _ = load_frames([_ref(_secondary_capture(tmp_path, pixels, 8, RescaleSlope=2, RescaleIntercept=-10))])
    lo, hi = np.percentile(pixels * 2.0 - 10, [0.5, 99.5])
    np.testing.assert_allclose(rescaled[0], np.clip((pixels * 2.0 - 10 - lo) / (hi - lo), 0, 1), atol=1e-5)
    # deeper raw values without a VOI keep the robust window
    deep = (pixels.astype(np.uint16) * 16)
    frames12, bits12 = load_frames([_ref(_secondary_capture(tmp_path, deep, 12))])
    lo, hi = np.percentile(deep.astype(np.float64), [0.5, 99.5])
    assert bits12 == 12
    np.testing.assert_allclose(frames12[0], np.clip((deep - lo) / (hi - lo), 0, 1), atol=1e-5)
    # deep values with a bright tail (3 pixels of 1,536): the percentile window saturates the tail, while an
    # MR frame is shown over its own range, minimum to maximum
    tail = deep.copy()
    tail[0, :3] = 4000
    ot, _ = load_frames([_ref(_secondary_capture(tmp_path, tail, 12))])
    mr, _ = load_frames([_ref(_secondary_capture(tmp_path, tail, 12, Modality="MR"))])
    np.testing.assert_allclose(mr[0], (tail - tail.min()) / float(tail.max() - tail.min()), atol=1e-6)
    assert (ot[0] >= 1.0 - 1e-6).sum() > 3 and (mr[0] >= 1.0 - 1e-6).sum() == 3
    # a window of its own still wins over both
    windowed, _ = load_frames([_ref(_secondary_capture(tmp_path, deep, 12, Modality="MR", WindowCenter=2047.5,
                                                       WindowWidth=4095, VOILUTFunction="LINEAR_EXACT"))])
    np.testing.assert_allclose(windowed[0], deep / 4095.0, atol=1e-6)


def test_training_image_scores_alike_as_file_and_as_dicom(data_root, tmp_path):
    """A Kermany image scored by the bundled chest model: read as training reads it (the JPEG file) and as
    the service reads it (its pixels in an 8-bit Secondary Capture without VOI), the same frame and score."""
    import cv2

    from inference.api import load_model
    from training.manifest import load_frames as load_training_image

    repo = Path(__file__).resolve().parents[2]
    jpeg = sorted((data_root / "kermany_cxr" / "test" / "NORMAL").glob("*.jpeg"))[0]
    as_file = load_training_image(jpeg)
    pixels = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    as_dicom, bits = load_frames([_ref(_secondary_capture(tmp_path, pixels, 8))])
    np.testing.assert_array_equal(as_dicom[0], as_file.frames[0])
    det = load_model(repo / "inference" / "bundled" / "chest-cxr")
    served = FrameSequence(frames=as_dicom, modality="DX", bits_stored=bits)
    np.testing.assert_allclose(det.score_batch([served]), det.score_batch([as_file]), rtol=1e-6)


def test_enhanced_multiframe_uses_functional_groups(dicom_corpus):
    # shared groups: Rescale Intercept -1024, window 49/102 (a CT soft-tissue window)
    path = dicom_corpus / "pydicom-data/eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and "RescaleIntercept" not in ds
    frames, _ = load_frames([_ref(path, 2)])
    hu = ds.pixel_array[1].astype(np.float64) * 1.0 - 1024.0
    np.testing.assert_allclose(frames[0], np.clip((hu - 48.5) / 101.0 + 0.5, 0, 1), atol=1e-5)
    # per-frame groups: frame 1 has its own window (16/128); the file also lacks Pixel Representation and
    # Samples per Pixel, which the loader assumes (unsigned, 1) as other readers do
    path = dicom_corpus / "orthanc-tests/MultiframeWindowing.dcm"
    ds = pydicom.dcmread(path)
    frames, _ = load_frames([_ref(path, 1)])
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    raw = ds.pixel_array[0].astype(np.float64)
    np.testing.assert_allclose(frames[0], np.clip((raw - 15.5) / 127.0 + 0.5, 0, 1), atol=1e-5)


def test_jpeg2000_series_decodes(dicom_corpus):
    files = sorted((dicom_corpus / KNEE).glob("*.dcm"))[:3]
    ts = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
    frames, bits = load_frames([_ref(p) for p in files])
    assert frames.shape[0] == 3 and bits == 12
    assert frames.min() >= 0.0 and frames.max() <= 1.0 and frames.std() > 0.05


def test_colour_becomes_grey(dicom_corpus):
    path = dicom_corpus / RGB
    ds = pydicom.dcmread(path)
    frames, _ = load_frames([_ref(path)])
    rgb = ds.pixel_array.astype(np.float64) / 255.0
    np.testing.assert_allclose(frames[0], rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-5)


def test_voi_lut_sequence_is_applied(dicom_corpus):
    path = dicom_corpus / VOI_LUT
    frames, _ = load_frames([_ref(path)])
    assert frames.min() >= 0.0 and frames.max() <= 1.0 and frames.std() > 0.01


def _voi_lut_item(first_mapped: int, entries: int, bits: int) -> pydicom.Dataset:
    """A VOI LUT Sequence item mapping ``entries`` input values from ``first_mapped`` linearly onto
    ``0..2**bits - 1``."""
    item = pydicom.Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    item["LUTDescriptor"].VR = "SS" if first_mapped < 0 else "US"
    item.LUTData = [int(v) for v in np.linspace(0, 2 ** bits - 1, entries)]
    item["LUTData"].VR = "US"
    return item


def test_voi_lut_sequence_maps_rescaled_values(dicom_corpus):
    """The VOI LUT's input is the modality LUT's output (PS3.3 C.11.2.1.1): on a CT with Rescale Intercept
    -1024 a LUT whose first mapped value is -800 HU looks up HU, not stored values; HU below the first
    mapped value take the first entry, HU past the last one the last entry."""
    ds = pydicom.dcmread(dicom_corpus / CT_SMALL)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024.0
    item = _voi_lut_item(-800, 1024, 12)  # HU -800..223
    ds.VOILUTSequence = [item]
    hu = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert hu.min() < -800 and hu.max() > 223  # both clipping ends are exercised
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = lut[np.clip(hu + 800, 0, 1023)] / 4095.0
    got = decode_frame(ds, 1, str(ds.SOPInstanceUID))
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_eight_bit_voi_lut_of_4096_entries(tmp_path):
    """A 12-bit image with a VOI LUT of 4096 entries onto 8 bits (as CR and DX carry): every input finds its
    own entry. pydicom 3.0.2's apply_voi indexed in uint8 and sent input 256 to entry 0, 1023 to 255's."""
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    ds = pydicom.dcmread(_secondary_capture(tmp_path, stored, 12))
    ds.VOILUTSequence = [_voi_lut_item(0, 4096, 8)]
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    got = decode_frame(ds, 1, str(ds.SOPInstanceUID))
    np.testing.assert_allclose(got, lut[stored] / 255.0, atol=1e-9)
    assert got.ravel()[16] == lut[256] / 255.0 > 0.05  # input 256: entry 256 (15 of 255), not entry 0
    assert np.all(np.diff(got.ravel()) >= 0)  # monotone, as the LUT


def test_modality_lut_as_ow_words(tmp_path):
    """A Modality LUT whose LUT Data is OW (raw words, read in the data set's byte order) with a negative
    first mapped value; a window then maps its output."""
    stored = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    ds = pydicom.dcmread(_secondary_capture(tmp_path, stored, 12, WindowCenter=1000, WindowWidth=2001))
    item = pydicom.Dataset()
    item.LUTDescriptor = [200, 10, 16]
    table = (np.arange(200, dtype=np.uint16) * 10)
    item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
    ds.ModalityLUTSequence = [item]
    modality = table[np.clip(stored.astype(np.int64) - 10, 0, 199)].astype(np.float64)
    got = decode_frame(ds, 1, str(ds.SOPInstanceUID))
    np.testing.assert_allclose(got, np.clip((modality - 999.5) / 2000.0 + 0.5, 0, 1), atol=1e-9)


def _empty_lut_item() -> pydicom.Dataset:
    """A LUT Sequence item whose LUT Descriptor and LUT Data are present but empty, as some archives write."""
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", None)
    item.add_new("LUTData", "US", None)
    return item


def test_empty_lut_items_fall_back(dicom_corpus, tmp_path):
    """A Modality LUT or VOI LUT Sequence item without LUT Descriptor or LUT Data is no LUT: the rescale and
    the other VOI paths apply, as if the sequence were absent, instead of failing the job."""
    rng = np.random.default_rng(1)
    deep = rng.integers(100, 4000, size=(16, 24)).astype(np.uint16)
    ds = pydicom.dcmread(_secondary_capture(tmp_path, deep, 12, RescaleSlope=2, RescaleIntercept=-100,
                                            WindowCenter=1000, WindowWidth=2001))
    ds.ModalityLUTSequence = [_empty_lut_item()]
    got = decode_frame(ds, 1, str(ds.SOPInstanceUID))
    np.testing.assert_allclose(got, np.clip((deep * 2.0 - 100 - 999.5) / 2000.0 + 0.5, 0, 1), atol=1e-9)
    pixels = deep.astype(np.uint8)
    ds = pydicom.dcmread(_secondary_capture(tmp_path, pixels, 8))
    ds.VOILUTSequence = [_empty_lut_item()]
    np.testing.assert_allclose(decode_frame(ds, 1, str(ds.SOPInstanceUID)), pixels / 255.0, atol=1e-9)
    # a real file with both: 8 bits, no rescale, no window values, so shown over its stored range
    path = dicom_corpus / EMPTY_LUTS
    ds = pydicom.dcmread(path)
    assert ds.ModalityLUTSequence[0].LUTDescriptor is None and ds.VOILUTSequence[0].LUTData is None
    frames, bits = load_frames([_ref(path)])
    assert bits == 8
    np.testing.assert_allclose(frames[0], ds.pixel_array / 255.0, atol=1e-6)


def test_frames_of_other_sizes_are_resized_to_the_first(dicom_corpus):
    brain = sorted((dicom_corpus / BRAINIX).glob("*.dcm"))[0]
    cr = dicom_corpus / CR_MONO1
    frames, _ = load_frames([_ref(brain), _ref(cr)])
    assert frames.shape == (2, 288, 288)
    assert frames[1].std() > 0.05


def test_decoding_failure_names_the_instance(dicom_corpus, tmp_path):
    path = dicom_corpus / TRUNCATED
    uid = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
    with pytest.raises(FrameLoadError) as err:
        load_frames([(path, uid, 1)])
    assert uid in str(err.value) and err.value.sop_instance_uid == uid
    missing = tmp_path / "gone.dcm"
    with pytest.raises(FrameLoadError, match="missing") as err:
        load_frames([(missing, "1.2.3.4", 1)])
    assert "1.2.3.4" in str(err.value)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not DICOM at all" * 10)
    with pytest.raises(FrameLoadError, match="5.6.7"):
        load_frames([(garbage, "5.6.7", 1)])


def test_unreadable_number_of_frames_names_the_instance(dicom_corpus):
    """A Number of Frames that is not a number fails the frame with a FrameLoadError naming the instance,
    like every other loading failure, not with a bare ValueError."""
    path = dicom_corpus / BAD_FRAME_COUNT
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    with pytest.raises(FrameLoadError, match="Number of Frames") as err:
        load_frames([(path, uid, 1)])
    assert err.value.sop_instance_uid == uid and "1A" in str(err.value)


def test_load_sequence_from_database(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings()
    add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=5)
    from storage.models import SequenceRecord

    with session_factory() as s:
        seq = s.query(SequenceRecord).one()
        fs = load_sequence(settings, s, seq.id)
        refs = [tuple(r) for r in seq.frame_refs]
        series_uid = seq.series.series_uid
    assert fs.frames.shape == (5, 288, 288)
    assert (fs.modality, fs.body_part, fs.series_uid, fs.bits_stored) == ("MR", "BRAIN", series_uid, 12)
    assert list(fs.frame_refs) == refs
    # instance order: the first frame is instance number 1
    first = pydicom.dcmread(dicom_corpus / BRAINIX / "IM-0001-0001.dcm", stop_before_pixels=True)
    assert fs.frame_refs[0][0] == first.SOPInstanceUID
    assert fs.context_frames == 0 and list(fs.judged) == [0, 1, 2, 3, 4]


def test_a_prior_studys_leading_frames_are_context(worker_settings, session_factory, dicom_corpus):
    """A sequence led by another series' frames (a prior study's, as the assembler prepends them with
    ``settings.add_prior_study``) is loaded whole, with those frames marked as context: the verdict
    judges the current series' frames only."""
    from storage.models import Instance, SequenceRecord, Series, SeriesState

    settings = worker_settings()
    add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=5)
    with session_factory() as s:
        seq = s.query(SequenceRecord).one()
        current = seq.series
        prior = Series(series_uid="1.2.826.0.1.3680043.8.498.7", study=current.study, modality="MR",
                       body_part="BRAIN", state=SeriesState.ASSEMBLED)
        s.add(prior)
        s.flush()
        for uid, _ in seq.frame_refs[:2]:  # the first two instances become the prior's
            s.query(Instance).filter_by(sop_instance_uid=uid).one().series_fk = prior.id
        s.commit()
        fs = load_sequence(settings, s, seq.id)
    assert fs.length == 5 and fs.context_frames == 2 and list(fs.judged) == [2, 3, 4]
