from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from inference.api import FrameSequence
from training.manifest import InputDataError, ManifestRow, load_frames, load_sequences, read_manifest, rows_from_folder


def _png(path: Path, value: int = 100, rgb: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((12, 10), value, np.uint8)
    img[0, 0] = 255
    if rgb:
        img = np.stack([img] * 3, axis=-1)
    assert cv2.imwrite(str(path), img)
    return path


def test_read_manifest_resolves_paths_and_labels(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    (tmp_path / "m.csv").write_text("path,label,split,group\nimgs/a.png,NORMAL,train,p1\nimgs/b.png,pneumonia,test,\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert rows[0] == ManifestRow(path=(tmp_path / "imgs" / "a.png").resolve(), label="NORMAL", split="train", group="p1")
    assert rows[0].path.is_absolute() and rows[0].is_normal
    assert rows[1].split == "test" and rows[1].group is None and not rows[1].is_normal


def test_zero_label_is_normal_and_split_is_optional(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("label,path\n0,a.png\n1,a.png\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert [r.is_normal for r in rows] == [True, False]
    assert rows[0].split is None


def test_excel_csv_with_a_byte_order_mark_reads(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; it was read into the first column's name
    (``\ufeffpath``) and the manifest refused for lacking ``path``."""
    _png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,split\na.png,normal,train\n", encoding="utf-8-sig")
    assert (tmp_path / "m.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    rows = read_manifest(tmp_path / "m.csv")
    assert rows == [ManifestRow(path=(tmp_path / "a.png").resolve(), label="normal", split="train")]


def test_missing_column_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("path,split\na.png,train\n")
    with pytest.raises(ValueError, match="label"):
        read_manifest(tmp_path / "m.csv")


def test_bad_row_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,normal\n,normal\n")
    with pytest.raises(ValueError, match="line 3"):
        read_manifest(tmp_path / "m.csv")


def test_rows_from_folder_both_layouts(tmp_path):
    _png(tmp_path / "flat" / "normal" / "x.png")
    _png(tmp_path / "flat" / "tumour" / "y.jpg")
    rows = rows_from_folder(tmp_path / "flat")
    assert sorted((r.label, r.split) for r in rows) == [("normal", None), ("tumour", None)]
    _png(tmp_path / "nested" / "train" / "NORMAL" / "x.jpeg")
    _png(tmp_path / "nested" / "test" / "PNEUMONIA" / "y.png")
    rows = rows_from_folder(tmp_path / "nested")
    assert sorted((r.split, r.label, r.is_normal) for r in rows) == [
        ("test", "PNEUMONIA", False), ("train", "NORMAL", True)]
    with pytest.raises(ValueError):
        rows_from_folder(tmp_path / "flat" / "normal")  # no label sub-folders


def test_manifest_rows_use_the_one_normal_label_rule_of_evaluate(tmp_path):
    """A brain MRI folder names its normals ``notumor``: ``medgru evaluate`` (metrics.is_normal_label)
    counted them as normal while train and calibrate (ManifestRow.is_normal) found none, and
    ``--supervised`` would have fed them to the encoder as labelled anomalies."""
    from training.calibrate import select_normals
    from training.metrics import is_normal_label

    labels = ["normal", "0", "notumor", "No_Tumor", "healthy", "glioma", "1"]
    for label in labels:
        _png(tmp_path / "test" / label / "x.png")
    rows = rows_from_folder(tmp_path)
    assert {r.label: r.is_normal for r in rows} == {lab: is_normal_label(lab) for lab in labels}
    assert sorted(r.label for r in select_normals(rows, "test")) == ["0", "No_Tumor", "healthy", "normal", "notumor"]


def test_load_frames_gives_one_greyscale_frame(tmp_path):
    p = _png(tmp_path / "a.png", value=51, rgb=True)
    seq = load_frames(p)
    assert isinstance(seq, FrameSequence)
    assert seq.frames.shape == (1, 12, 10) and seq.frames.dtype == np.float32
    assert seq.bits_stored == 8 and seq.modality == ""
    assert seq.frames[0, 5, 5] == pytest.approx(0.2) and seq.frames[0, 0, 0] == pytest.approx(1.0)
    rows = [ManifestRow(path=_png(tmp_path / f"{i}.png", value=i * 20), label="normal") for i in range(10)]
    seqs = load_sequences(rows, workers=2)
    assert [round(float(s.frames[0, 5, 5]) * 255) for s in seqs] == [i * 20 for i in range(10)]


def test_unreadable_image_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_frames(tmp_path / "bad.png")


def test_real_manifests_read(data_root):
    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    train_normals = [r for r in rows if r.split == "train" and r.is_normal]
    assert len(train_normals) == 1341
    assert all(r.path.is_file() for r in rows[:5])
    brain = read_manifest(data_root / "brain_mri" / "manifest.csv")
    assert {r.label for r in brain} == {"normal", "glioma", "meningioma", "pituitary"}


@pytest.mark.parametrize("rel, frames", [
    ("dwv/data/gdcm-CR-MONO1-10-chest.dcm", 1),  # 10-bit MONOCHROME1 CR
    ("orthanc-tests/MultiframeWindowing.dcm", 4),  # a window per frame
])
def test_dicom_files_are_read_as_the_service_reads_them(dicom_corpus, tmp_path, rel, frames):
    from worker.pixels import load_frames as service_frames

    src = dicom_corpus / rel
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "a.dcm").symlink_to(src)
    rows = rows_from_folder(tmp_path)
    assert [(r.path.name, r.label) for r in rows] == [("a.dcm", "normal")]
    seq = load_sequences(rows)[0]
    ds = pydicom.dcmread(src)
    want, bits = service_frames([(src, ds.SOPInstanceUID, i) for i in range(1, frames + 1)])
    assert seq.frames.shape[0] == frames and seq.bits_stored == bits == int(ds.BitsStored)
    np.testing.assert_array_equal(seq.frames, want)
    assert seq.modality == str(ds.get("Modality", "")) and seq.frame_refs[-1] == (ds.SOPInstanceUID, frames)


def test_expand_frames_gives_training_one_row_per_frame(dicom_corpus, tmp_path):
    """A multi-frame DICOM row becomes one row per frame (same label, its file as the group), each read
    alone exactly as that frame of the whole file; single-frame and image rows are kept as they are."""
    from training.manifest import InputDataError, ManifestRow, expand_frames, load_frames

    multi = dicom_corpus / "orthanc-tests/MultiframeWindowing.dcm"
    single = dicom_corpus / "dwv/data/gdcm-CR-MONO1-10-chest.dcm"
    image = tmp_path / "n.png"
    cv2.imwrite(str(image), np.full((32, 32), 128, np.uint8))
    rows = [ManifestRow(multi, "normal", "train"), ManifestRow(single, "normal", "train", "p1"),
            ManifestRow(image, "normal", "train")]
    out = expand_frames(rows)
    assert [(r.path, r.frame, r.group) for r in out] == (
        [(multi, i, str(multi)) for i in (1, 2, 3, 4)] + [(single, None, "p1"), (image, None, None)])
    whole = load_frames(rows[0])
    for r in out[:4]:
        alone = load_frames(r)
        assert alone.frames.shape[0] == 1 and alone.frame_refs[0][1] == r.frame
        np.testing.assert_array_equal(alone.frames[0], whole.frames[r.frame - 1])
    assert not np.array_equal(whole.frames[0], whole.frames[3])  # the frames differ: each one counts
    with pytest.raises(InputDataError, match="no frame 5: the file has 4"):
        load_frames(ManifestRow(multi, "normal", frame=5))


def test_a_folder_is_read_without_hidden_copies_and_a_misleading_layout_is_refused(tmp_path):
    """Hidden entries and __MACOSX are copies and metadata (a notebook's .ipynb_checkpoints became an anomaly
    class, macOS's ._x.jpeg a normal image); a layout whose images would be read under the wrong label or not
    at all is an error naming the folder."""
    _png(tmp_path / "a" / "normal" / "x.png")
    _png(tmp_path / "a" / "tumour" / "y.png")
    _png(tmp_path / "a" / ".ipynb_checkpoints" / "x-checkpoint.png")
    _png(tmp_path / "a" / "normal" / "._x.png")
    _png(tmp_path / "a" / "__MACOSX" / "normal" / "._x.png")
    assert sorted((r.label, r.path.name) for r in rows_from_folder(tmp_path / "a")) == [
        ("normal", "x.png"), ("tumour", "y.png")]

    _png(tmp_path / "b" / "normal" / "patient1" / "x.png")  # <label>/<patient>/*: not a split
    _png(tmp_path / "b" / "tumour" / "patient2" / "y.png")
    with pytest.raises(InputDataError, match="normal holds folders .*patient1"):
        rows_from_folder(tmp_path / "b")
    _png(tmp_path / "c" / "train" / "tumour" / "sub" / "y.png")  # three levels: sub/ would not be read
    _png(tmp_path / "c" / "train" / "normal" / "x.png")
    with pytest.raises(InputDataError, match="tumour holds folders .*sub"):
        rows_from_folder(tmp_path / "c")
    _png(tmp_path / "d" / "normal" / "x.png")
    _png(tmp_path / "d" / "normal" / "more" / "z.png")
    with pytest.raises(InputDataError, match="normal holds images and folders"):
        rows_from_folder(tmp_path / "d")


def test_a_folder_without_images_beside_the_images_is_no_reason_to_refuse(tmp_path):
    """Found by a review: a label folder holding its images and a folder of notes (or an empty one) loses no image:
    it was read before the layout checks, and was then refused 'whose images would not be read'."""
    import cv2

    img = np.zeros((8, 8), np.uint8)
    flat = tmp_path / "flat"
    for p in (flat / "normal" / "a.png", flat / "tumor" / "b.png",
              tmp_path / "s" / "train" / "normal" / "c.png", tmp_path / "s" / "train" / "tumor" / "d.png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img)
    (flat / "tumor" / "annotations").mkdir()
    (flat / "tumor" / "annotations" / "b.json").write_text("{}")
    (tmp_path / "s" / "train" / "tumor" / "empty").mkdir()
    rows = rows_from_folder(flat)
    assert sorted((r.path.name, r.label) for r in rows) == [("a.png", "normal"), ("b.png", "tumor")]
    rows = rows_from_folder(tmp_path / "s")
    assert sorted((r.path.name, r.label, r.split) for r in rows) == [("c.png", "normal", "train"),
                                                                    ("d.png", "tumor", "train")]
