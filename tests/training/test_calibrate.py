"""``medgru calibrate`` on a tiny k-NN model and synthetic normals written as PNG files.

The expected threshold is recomputed here from the source model's scores with the conformal rank written
out (not with :func:`inference.api.conformal_threshold`), so a wrong rank or wrong rows is caught.
"""

from __future__ import annotations

import csv
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.api import FrameSequence, ModelCard, Scope, get_detector_class, load_model, sha256_file
from medgru.cli import build_parser
from training.calibrate import calibrated_version
from training.manifest import load_sequences, read_manifest, rows_from_folder

SIZE = 64


def texture(seed: int, *, sigma: float = 3.0, lo: float = 0.2, span: float = 0.5) -> np.ndarray:
    """A smooth random texture ``(SIZE, SIZE)`` in ``[lo, lo + span]``: synthetic 'normal anatomy'."""
    rng = np.random.default_rng(seed)
    n = cv2.GaussianBlur(rng.normal(size=(SIZE, SIZE)).astype(np.float32), (0, 0), sigma)
    n = (n - n.min()) / (n.max() - n.min() + 1e-6)
    return (lo + span * n).astype(np.float32)


def with_blob(frame: np.ndarray) -> np.ndarray:
    out = frame.copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out[((yy - SIZE // 2) ** 2 + (xx - SIZE // 3) ** 2) <= (SIZE // 5) ** 2] = 1.0
    return out


def write_png(path: Path, frame: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.round(frame * 255.0).astype(np.uint8))
    return path


def site_normal(seed: int) -> np.ndarray:
    """A 'local site' normal: finer texture, brighter and wider range than the training normals."""
    return texture(seed, sigma=2.0, lo=0.3, span=0.6)


def expected_threshold(scores: np.ndarray, alpha: float) -> float:
    s = np.sort(scores)
    return float(s[math.ceil((len(s) + 1) * (1.0 - alpha)) - 1])


def tree_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source_model(tmp_path_factory) -> Path:
    """A tiny fitted knn-effnet model folder, with an extra card-listed file its ``save`` does not write."""
    model_dir = tmp_path_factory.mktemp("calib") / "model"
    cls = get_detector_class("knn-effnet")
    det = cls(**cls.SMALL_PARAMS)
    det.fit([FrameSequence(frames=texture(i)[None]) for i in range(16)],
            validation=[FrameSequence(frames=texture(100 + i)[None]) for i in range(8)], seed=0)
    files = det.save(model_dir)
    (model_dir / "training.json").write_text(json.dumps({"note": "written by the trainer"}) + "\n")
    files.append("training.json")
    ModelCard(name="tiny-knn", version="0.1", detector="knn-effnet", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(model_dir / f) for f in files}, params=det.get_params()).write(model_dir)
    return model_dir


def calibrate(argv: list[str], settings) -> int:
    args = build_parser().parse_args(["calibrate", *argv])
    return args.func(args, settings)


def source_scores(model_dir: Path, rows) -> np.ndarray:
    return np.asarray(load_model(model_dir).score_batch(load_sequences(rows)), dtype=np.float64)


def test_calibrate_folder_writes_a_new_verified_model(source_model, make_settings, tmp_path, capsys):
    site = tmp_path / "site-normals"
    for i in range(40):
        write_png(site / "normal" / f"n{i:02d}.png", site_normal(500 + i))
    before = tree_digests(source_model)
    old = load_model(source_model)
    out = tmp_path / "calibrated"

    assert calibrate(["--model", str(source_model), "--folder", str(site), "--out", str(out)], make_settings()) == 0

    assert tree_digests(source_model) == before  # the source folder is untouched
    scores = source_scores(source_model, rows_from_folder(site))
    want = expected_threshold(scores, 0.05)  # n = 40: the 39th smallest score
    assert want != pytest.approx(old.threshold)

    new = load_model(out, verify=True)
    assert new.threshold == pytest.approx(want, rel=1e-9)
    probe = load_sequences(rows_from_folder(site)[:4])
    np.testing.assert_allclose(new.score_batch(probe), old.score_batch(probe), rtol=1e-6)  # same model otherwise
    d = new.detect(probe[0], explain=False)
    assert d.threshold == pytest.approx(want, rel=1e-9) and d.model_version == new.card.version

    card = ModelCard.read(out)
    assert re.fullmatch(r"0\.1\+cal\.\d{12}", card.version), card.version
    assert (card.name, card.detector, dict(card.params)) == (old.card.name, old.card.detector, dict(old.card.params))
    assert set(card.files) == {"knn_effnet.npz", "training.json", "calibration.json"}
    assert (out / "training.json").read_text() == (source_model / "training.json").read_text()
    # the site's scores are kept beside its threshold: a series of T frames gets their quantile at 5 % / T
    np.testing.assert_allclose(new.calibration_scores, np.sort(scores), rtol=1e-6)
    assert new.series_threshold(2) == pytest.approx(expected_threshold(scores, 0.025), rel=1e-9)
    assert new.series_threshold(2) > new.threshold
    assert card.calibration["n_images"] == 40
    assert card.files["knn_effnet.npz"] != old.card.files["knn_effnet.npz"]  # the threshold is in it
    cal = card.calibration
    assert cal["n_normals"] == 40 and cal["target_fpr"] == 0.05
    assert cal["old_threshold"] == pytest.approx(old.threshold, rel=1e-12)
    assert cal["new_threshold"] == pytest.approx(want, rel=1e-9)
    assert cal["old_threshold_fpr_on_these_normals"] == pytest.approx(float((scores > old.threshold).mean()))
    assert cal["source"] == "site-normals"
    assert cal["calibrated_from_version"] == "0.1"
    date = datetime.strptime(cal["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - date).total_seconds()) < 3600
    assert str(tmp_path) not in (out / "card.json").read_text()  # no machine paths in the card
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    printed = capsys.readouterr()
    assert "40 normals" in printed.out and f"{old.threshold:.6g}" in printed.out and f"{want:.6g}" in printed.out
    assert "40 scores cover a series of up to 2 frames at 0.05" in printed.out  # 0.05 x 41 = 2.05
    assert (cal["longest_series_covered"], cal["source_longest_series_covered"]) == (2, None)  # a folder
    assert "warning" not in printed.err  # from before the scores were kept: nothing to compare with

    again = tmp_path / "recalibrated"  # 25 normals after 40: a shorter series covered, and said so
    assert calibrate(["--model", str(out), "--folder", str(site_subset(site, tmp_path, 25)), "--out", str(again)],
                     make_settings()) == 0
    printed = capsys.readouterr()
    assert "25 scores cover a series of up to 1 frame at 0.05" in printed.out
    assert "calibration covered series of up to 2 frames; 39 normal images would cover as many" in printed.err


def site_subset(site: Path, tmp_path: Path, n: int) -> Path:
    """A folder with the first ``n`` of the site's normal PNGs."""
    import shutil

    sub = tmp_path / f"site-{n}"
    (sub / "normal").mkdir(parents=True)
    for f in sorted((site / "normal").iterdir())[:n]:
        shutil.copy(f, sub / "normal" / f.name)
    return sub


def test_too_few_normals_exit_2_and_no_output(source_model, make_settings, tmp_path, capsys):
    few = tmp_path / "few"
    for i in range(18):  # one short of the 19 a 5 % conformal threshold needs
        write_png(few / "normal" / f"n{i:02d}.png", site_normal(700 + i))
    write_png(few / "pneumonia" / "a0.png", with_blob(site_normal(799)))  # anomalies do not count
    before = tree_digests(source_model)
    out = tmp_path / "calibrated"

    assert calibrate(["--model", str(source_model), "--folder", str(few), "--out", str(out)], make_settings()) == 2

    err = capsys.readouterr().err
    assert "18 normal" in err and "at least 19" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".calibrated")]
    assert tree_digests(source_model) == before


def test_refuses_to_write_into_the_source_or_an_existing_folder(source_model, make_settings, tmp_path, capsys):
    site = tmp_path / "site"
    for i in range(20):
        write_png(site / "normal" / f"n{i:02d}.png", site_normal(900 + i))
    before = tree_digests(source_model)
    for out in (source_model, source_model / "inner"):
        assert calibrate(["--model", str(source_model), "--folder", str(site), "--out", str(out)],
                         make_settings()) == 2
    assert tree_digests(source_model) == before
    assert "never overwrites" in capsys.readouterr().err


def test_manifest_uses_only_the_normal_rows_of_the_split(source_model, make_settings, tmp_path):
    data = tmp_path / "data"
    lines: list[tuple[str, str, str]] = []
    for i in range(20):  # the site's normals, labelled both ways
        name = write_png(data / f"t{i:02d}.png", site_normal(1000 + i)).name
        lines.append((name, "normal" if i % 2 else "0", "test"))
    for i in range(5):  # anomalies of the same split: never used
        name = write_png(data / f"a{i}.png", with_blob(site_normal(1100 + i))).name
        lines.append((name, "pneumonia" if i % 2 else "1", "test"))
    for i in range(10):  # normals of another split: not used with --split test
        name = write_png(data / f"o{i}.png", texture(1200 + i, sigma=1.0, lo=0.0, span=1.0)).name
        lines.append((name, "normal", "train"))
    manifest = data / "site.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(lines)
    out = tmp_path / "calibrated"

    rc = calibrate(["--model", str(source_model), "--manifest", str(manifest), "--split", "test", "--out", str(out),
                    "--version", "0.1-site"], make_settings())

    assert rc == 0
    rows = read_manifest(manifest)
    normals = [r for r in rows if r.split == "test" and r.label in ("normal", "0")]
    assert len(normals) == 20
    want = expected_threshold(source_scores(source_model, normals), 0.05)
    card = ModelCard.read(out)
    assert card.version == "0.1-site"
    assert card.calibration["n_normals"] == 20 and card.calibration["split"] == "test"
    assert card.calibration["source"] == "site.csv"
    assert card.calibration["new_threshold"] == pytest.approx(want, rel=1e-9)
    assert load_model(out, verify=True).threshold == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("old, new", [
    ("0.1", "0.1+cal.202501021304"),
    ("1.0.0+cal.202401010000", "1.0.0+cal.202501021304"),
    ("1.0.0+build.7", "1.0.0+build.7.cal.202501021304"),
    ("1.0.0+build.7.cal.202401010000", "1.0.0+build.7.cal.202501021304"),
])
def test_calibrated_version(old, new):
    assert calibrated_version(old, datetime(2025, 1, 2, 13, 4, 59, tzinfo=timezone.utc)) == new


def test_a_gpu_asked_for_where_there_is_none_exits_2_and_writes_nothing(source_model, make_settings, tmp_path,
                                                                         capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    normals = tmp_path / "normals"
    for i in range(20):
        write_png(normals / "normal" / f"n{i:02d}.png", site_normal(900 + i))
    out = tmp_path / "calibrated"
    for how in (["--device", "cuda"], []):  # the flag, and the setting it defaults to
        settings = make_settings(device="cpu" if how else "cuda")
        assert calibrate(["--model", str(source_model), "--folder", str(normals), "--out", str(out), *how],
                         settings) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err and not out.exists()


def write_dicom(path: Path, frame: np.ndarray, *, modality: str = "CR") -> Path:
    """``frame`` (or a stack of frames) as an 8-bit MONOCHROME2 Secondary Capture with no window: the
    service reads it as v / 255, the grey values of the PNG :func:`write_png` makes of the same frame."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = frame.shape[-2:]
    if frame.ndim == 3:  # a multi-frame instance
        ds.NumberOfFrames = frame.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.round(frame * 255.0).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_calibrate_on_dicom_normals_matches_the_same_images_as_png(source_model, make_settings, tmp_path):
    png, dcm = tmp_path / "png", tmp_path / "dcm"
    for i in range(25):
        frame = site_normal(1300 + i)
        write_png(png / "normal" / f"n{i:02d}.png", frame)
        write_dicom(dcm / "normal" / f"n{i:02d}.dcm", frame)
    rows = rows_from_folder(dcm)
    assert len(rows) == 25 and all(r.path.suffix == ".dcm" for r in rows)
    seq = load_sequences(rows[:1])[0]
    assert (seq.modality, seq.body_part, seq.bits_stored, seq.frames.shape) == ("CR", "CHEST", 8, (1, SIZE, SIZE))

    outs = {}
    for name, folder in (("png", png), ("dcm", dcm)):
        outs[name] = tmp_path / f"calibrated-{name}"
        assert calibrate(["--model", str(source_model), "--folder", str(folder), "--out", str(outs[name]),
                          "--version", f"0.1-{name}"], make_settings()) == 0
    thr = {k: ModelCard.read(v).calibration["new_threshold"] for k, v in outs.items()}
    assert thr["dcm"] == pytest.approx(thr["png"], rel=1e-9)
    assert thr["dcm"] != pytest.approx(load_model(source_model).threshold)


def test_calibrate_scores_each_frame_of_a_multi_frame_normal_alone(source_model, make_settings, tmp_path):
    """The service judges a series by its frames scored alone, so the calibration scores are frame scores:
    10 normals of 3 frames each give 30 scores, those of the 30 frames as single images."""
    png, dcm = tmp_path / "png", tmp_path / "dcm"
    for i in range(10):
        stack = np.stack([site_normal(1400 + 3 * i + k) for k in range(3)])
        write_dicom(dcm / "normal" / f"n{i:02d}.dcm", stack)
        for k in range(3):
            write_png(png / "normal" / f"n{i:02d}-{k}.png", stack[k])
    out = tmp_path / "calibrated"
    assert calibrate(["--model", str(source_model), "--folder", str(dcm), "--out", str(out)], make_settings()) == 0
    card = ModelCard.read(out)
    assert (card.calibration["n_normals"], card.calibration["n_images"]) == (10, 30)
    singles = source_scores(source_model, rows_from_folder(png))
    np.testing.assert_allclose(load_model(out).calibration_scores, np.sort(singles), rtol=1e-6)
    assert card.calibration["new_threshold"] == pytest.approx(expected_threshold(singles, 0.05), rel=1e-9)


def test_a_broken_dicom_file_is_a_named_error(tmp_path):
    bad = tmp_path / "normal" / "broken.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not DICOM")
    with pytest.raises(ValueError, match="broken.dcm"):
        load_sequences(rows_from_folder(tmp_path))


def test_a_tampered_source_model_is_an_error_not_a_traceback(source_model, make_settings, tmp_path, capsys):
    site = tmp_path / "site-normals"
    for i in range(25):
        write_png(site / "normal" / f"n{i:02d}.png", site_normal(700 + i))
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(source_model, tampered)
    (tampered / "training.json").write_text("{}\n")  # its checksum on the card no longer matches
    out = tmp_path / "calibrated"
    assert calibrate(["--model", str(tampered), "--folder", str(site), "--out", str(out)], make_settings()) == 2
    assert "checksum of training.json" in capsys.readouterr().err and not out.exists()
