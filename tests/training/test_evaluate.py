"""``medgru evaluate`` end to end on a tiny model trained in the test, plus its row/fold helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.api import FrameSequence, ModelCard, Scope, get_detector_class, sha256_file
from medgru.cli import build_parser
from training.evaluate import (command_line, evaluation_rows, limit_rows, make_folds, model_training_args,
                               pick_gallery)
from training.manifest import ManifestRow, load_sequences, read_manifest

REQUIRED_KEYS = ("auroc", "auprc", "sens_at_95_spec", "fpr_at_95_sens", "threshold", "n_normal", "n_anomaly",
                 "per_class_auroc", "accuracy", "f1", "precision", "recall", "specificity",
                 "inference_seconds_per_image", "model_name", "model_version", "dataset", "command", "date")
REPORT_FILES = ("metrics.json", "report.md", "scores.csv", "roc.png", "pr.png", "score_hist.png", "confusion.png",
                "gradcam_gallery.png")


def _train_tiny_model(model_dir: Path, normals, validation) -> None:
    cls = get_detector_class("knn-effnet")
    det = cls(**cls.SMALL_PARAMS)
    det.fit(normals, validation=validation, seed=0)
    files = det.save(model_dir)
    ModelCard(name="tiny-knn", version="0.1", detector="knn-effnet", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(model_dir / f) for f in files}, params=det.get_params(),
              training_data="tiny in-test slice").write(model_dir)


def _evaluate(argv: list[str], settings) -> int:
    args = build_parser().parse_args(["evaluate", *argv])
    return args.func(args, settings)


@pytest.fixture(scope="module")
def kermany_slice(data_root, tmp_path_factory):
    """A manifest of a small real slice: 16 train normals (2 groups per fold at least), 8+8 test images."""
    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    train_norm = [r for r in rows if r.split == "train" and r.label == "normal"][:16]
    test_norm = [r for r in rows if r.split == "test" and r.label == "normal"][:8]
    test_pneu = [r for r in rows if r.split == "test" and r.label == "pneumonia"][:8]
    train_pneu = [r for r in rows if r.split == "train" and r.label == "pneumonia"][:6]
    tmp = tmp_path_factory.mktemp("kslice")
    csv_path = tmp / "manifest.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "split", "label", "group"])
        for r in train_norm + train_pneu + test_norm + test_pneu:
            w.writerow([str(r.path), r.split, r.label, r.group or ""])
    model_dir = tmp / "model"
    model_dir.mkdir()
    seqs = load_sequences(train_norm)
    _train_tiny_model(model_dir, seqs[:12], seqs[12:])
    return csv_path, model_dir


def test_evaluate_manifest_writes_report_with_cv(kermany_slice, make_settings, tmp_path):
    csv_path, model_dir = kermany_slice
    out = tmp_path / "report"
    rc = _evaluate(["--manifest", str(csv_path), "--model", str(model_dir), "--out", str(out), "--cv", "2",
                    "--bootstrap", "50", "--gallery", "2"], make_settings())
    assert rc == 0
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in m, key
    # only the test split is evaluated; train rows (including the 6 train anomalies) are not
    assert m["n_normal"] == 8 and m["n_anomaly"] == 8
    assert set(m["per_class_auroc"]) == {"pneumonia"}
    assert 0.0 <= m["auroc"] <= 1.0
    assert m["model_name"] == "tiny-knn" and m["model"]["detector"] == "knn-effnet"
    assert m["inference_seconds_per_image"] > 0
    assert len(m["cv"]["folds"]) == 2
    assert sum(f["n_calibration"] for f in m["cv"]["folds"]) == 16
    assert m["cv"]["settings"]["grouped_by"] == "group"
    assert "auroc" in m["cv"]["summary"] and m["cv"]["summary"]["auroc"]["n"] == 2
    # the default CV reads no test image: each fold's 8 held-out normals against the 6 train anomalies
    assert m["cv"]["settings"]["on"] == "validation" and m["cv"]["settings"]["n_anomalies"] == 6
    [cv_header] = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| fold |")]
    assert m["cv"]["summary"]["specificity"]["n"] == 0 and "auroc" in cv_header and "specificity" not in cv_header
    md = (out / "report.md").read_text()
    assert "medgru evaluate --manifest" in md and "2-fold cross-validation" in md
    # the lesion-blind style baseline, fitted on the 16 + 6 train rows, scored on the 16 test rows
    sb = m["style_baseline"]
    assert sb["n_train_normal"] == 16 and sb["n_train_anomaly"] == 6 and 0.0 <= sb["auroc"] <= 1.0
    assert "## Style baseline" in md and f"{sb['auroc']:.3f}" in md
    with open(out / "scores.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 16


def _write_png(path: Path, frame: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), (frame * 255).round().astype(np.uint8))


def test_evaluate_folder_without_split_uses_all_rows_and_reports_classes(make_settings, tmp_path):
    from tests.inference.test_detector_contract import texture, with_blob

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    q = lambda f: np.round(f * 255) / 255  # noqa: E731  (what a PNG round trip keeps)
    _train_tiny_model(model_dir, [FrameSequence(q(texture(i)).astype(np.float32)) for i in range(12)],
                      [FrameSequence(q(texture(50 + i)).astype(np.float32)) for i in range(6)])
    folder = tmp_path / "images"
    for i in range(6):
        _write_png(folder / "normal" / f"n{i}.png", texture(500 + i)[0])
        _write_png(folder / "blob" / f"b{i}.png", with_blob(texture(600 + i), seed=i)[0])
        _write_png(folder / "bigblob" / f"c{i}.png", with_blob(with_blob(texture(700 + i), seed=i), seed=i + 9)[0])
    out = tmp_path / "report"
    rc = _evaluate(["--folder", str(folder), "--model", str(model_dir), "--out", str(out), "--bootstrap", "20"],
                   make_settings())
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_normal"] == 6 and m["n_anomaly"] == 12
    assert set(m["per_class_auroc"]) == {"blob", "bigblob"}
    assert m["auroc"] > 0.5  # the planted blobs rank above the normals
    assert (out / "gradcam_gallery.png").is_file()
    # a folder without splits has no train split to fit the style baseline on: said, not invented
    assert m["style_baseline"] == {"auroc": None, "skipped": "the manifest has no train split"}
    assert "Not computed: the manifest has no train split." in (out / "report.md").read_text()


def test_evaluate_refuses_a_single_class(make_settings, tmp_path, kermany_slice):
    _, model_dir = kermany_slice
    folder = tmp_path / "only_normals"
    from tests.inference.test_detector_contract import texture

    for i in range(3):
        _write_png(folder / "normal" / f"n{i}.png", texture(i)[0])
    rc = _evaluate(["--folder", str(folder), "--model", str(model_dir), "--out", str(tmp_path / "r")],
                   make_settings())
    assert rc == 2
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_evaluate_on_a_gpu_that_is_not_there_exits_2(make_settings, tmp_path, kermany_slice, capsys, monkeypatch):
    import torch

    _, model_dir = kermany_slice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = _evaluate(["--folder", str(tmp_path), "--model", str(model_dir), "--out", str(tmp_path / "r"),
                    "--device", "cuda"], make_settings())
    assert rc == 2 and "sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------------------------- helpers
def _row(label, split=None, group=None, name="x"):
    return ManifestRow(path=Path("/d") / f"{name}.png", label=label, split=split, group=group)


def test_evaluation_rows_prefers_test_split():
    rows = [_row("normal", "train"), _row("pneumonia", "test"), _row("normal", "test")]
    assert [r.split for r in evaluation_rows(rows)] == ["test", "test"]
    nosplit = [_row("normal"), _row("x")]
    assert evaluation_rows(nosplit) == nosplit
    with pytest.raises(ValueError, match="no 'test' split"):
        evaluation_rows([_row("normal", "train"), _row("x", "val")])


def test_limit_rows_is_stratified_and_reproducible():
    rows = [_row("normal", name=f"n{i}") for i in range(60)] + [_row("glioma", name=f"g{i}") for i in range(40)]
    sub = limit_rows(rows, 10, seed=3)
    assert sum(r.label == "normal" for r in sub) == 6 and sum(r.label == "glioma" for r in sub) == 4
    assert sub == limit_rows(rows, 10, seed=3)
    assert limit_rows(rows, 0) == rows


def test_make_folds_never_splits_a_group():
    rows = [_row("normal", "train", group=f"p{i // 3}", name=str(i)) for i in range(30)]
    folds = make_folds(rows, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))
    for f in folds:
        groups = {rows[i].group for i in f}
        others = {rows[i].group for g in folds if g is not f for i in g}
        assert not groups & others
    ungrouped = make_folds([_row("normal", name=str(i)) for i in range(10)], 5, seed=0)
    assert [len(f) for f in ungrouped] == [2] * 5


def test_the_gallery_shows_the_frame_that_decided_a_multi_frame_row():
    """MedGRU-SVC explains a series by its highest frame's Grad-CAM (the other frames' maps are zero): the
    gallery shows that frame, not the first."""
    from tests.inference.test_detector_contract import texture, with_blob
    from training.evaluate import gallery_frame

    cls = get_detector_class("medgru-svc")
    det = cls(**cls.SMALL_PARAMS)
    det.fit([FrameSequence(texture(i)) for i in range(12)], validation=[FrameSequence(texture(50 + i)) for i in range(6)])
    frames = np.concatenate([texture(900), texture(901), with_blob(texture(902), seed=4)])
    d = det.detect(FrameSequence(frames), explain=True)
    k = gallery_frame(d)
    assert k == int(np.argmax(d.frame_scores)) == 2
    alone = det.detect(FrameSequence(frames[2:3]), explain=True)  # the series' heat map is that frame's own
    np.testing.assert_allclose(d.heatmaps[k], alone.heatmaps[0], atol=1e-5)
    assert not d.heatmaps[:2].any()
    assert gallery_frame(det.detect(FrameSequence(frames[:1]), explain=False)) == 0


def test_pick_gallery_kinds():
    scores = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.05])
    normal = np.array([False, False, False, True, True, True])
    picks = pick_gallery(scores, normal, 0.5, 2)
    assert picks == [("true_positive", 0), ("true_positive", 1), ("false_positive", 3), ("false_negative", 2)]


def test_command_line_has_no_machine_paths(make_settings, tmp_path):
    settings = make_settings()
    args = build_parser().parse_args(["evaluate", "--manifest", str(settings.data_root / "kermany_cxr" / "manifest.csv"),
                                      "--out", str(tmp_path / "r"), "--cv", "5"])
    cmd = command_line(args, settings)
    assert cmd.startswith("medgru evaluate --manifest $MEDGRU_DATA_ROOT/kermany_cxr/manifest.csv")
    assert "--cv 5" in cmd
    assert str(settings.data_root) not in cmd


def test_cv_twins_repeat_the_models_reframed_copies():
    from inference.augment import ReframeParams, reframe
    from training.evaluate import reframe_augment

    assert reframe_augment({}, 0) is None and reframe_augment({"reframe_copies": 0}, 0) is None
    args = {"reframe_copies": 2, "reframe_scale": 0.1, "reframe_shift": 0.05, "reframe_rotate": 3.0}
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    frames = [(0.1 + 0.8 * np.exp(-((yy - c) ** 2 + (xx - 32) ** 2) / 300.0)).astype(np.float32) for c in (20, 40)]
    seqs = [FrameSequence(frames=f[None]) for f in frames]
    aug = reframe_augment(args, 3)
    out = aug(seqs)
    assert len(out) == 4 and "2 randomly re-framed copies" in aug.description
    params = ReframeParams(scale=0.1, shift=0.05, rotate=3.0)
    for k in range(2):  # copy k of the fold with seed 3 uses medgru train's generator seed 3*1000+500+k
        rng = np.random.default_rng(3 * 1000 + 500 + k)
        for i, f in enumerate(frames):
            np.testing.assert_array_equal(out[2 * k + i].frames[0], reframe(f, rng, params))
    # a model trained with blurred copies: its twins blur theirs the same way, and say so
    blurred = reframe_augment({**args, "reframe_blur": 1.5}, 3)
    assert "blur of sigma 0-1.5" in blurred.description and "blur" not in aug.description
    params = ReframeParams(scale=0.1, shift=0.05, rotate=3.0, blur=1.5)
    rng = np.random.default_rng(3 * 1000 + 500)
    np.testing.assert_array_equal(blurred(seqs)[0].frames[0], reframe(frames[0], rng, params))


def test_cv_of_a_model_trained_with_reframed_copies_trains_its_twins_with_them(tmp_path, monkeypatch):
    from training import evaluate as E

    seen: list[int] = []

    class Twin:
        def __init__(self, **params):
            pass

        def fit(self, normals, *, validation=(), seed=0, cluster_pool=(), augment=None):
            seen.append(len(augment(normals)) if augment is not None else 0)
            self.threshold = 0.5

    monkeypatch.setattr("inference.api.get_detector_class", lambda name: Twin)
    monkeypatch.setattr(E, "score_all", lambda det, seqs, batch: (np.linspace(0, 1, len(seqs)), 0.0))
    monkeypatch.setattr("training.manifest.load_sequences",
                        lambda rows, workers=2: [FrameSequence(frames=np.full((1, 8, 8), 0.5, np.float32))
                                                 for _ in rows])
    rows = [ManifestRow(path=Path(f"n{i}.png"), label="normal", split="train", group=f"g{i}") for i in range(6)]
    card = ModelCard(name="m", version="1", detector="twin", scope=Scope(modalities=("CR",)))
    test_seqs = [FrameSequence(frames=np.full((1, 8, 8), 0.5, np.float32))] * 4
    classes = ["normal", "normal", "pneumonia", "pneumonia"]
    (tmp_path / "training.json").write_text(json.dumps({"command_args": {
        "reframe_copies": 2, "reframe_scale": 0.15, "reframe_shift": 0.06, "reframe_rotate": 5.0}}))
    folds, settings = E.run_cv(card, rows, test_seqs, classes, k=3, seed=0, batch=4, workers=1, n_boot=0,
                               training_args=model_training_args(tmp_path))
    assert seen == [8, 8, 8]  # 4 fit normals a fold, 2 copies each
    assert "2 randomly re-framed copies" in settings["description"]
    seen.clear()
    E.run_cv(card, rows, test_seqs, classes, k=3, seed=0, batch=4, workers=1, n_boot=0,
             training_args=model_training_args(tmp_path / "absent"))
    assert seen == [0, 0, 0]


def test_validation_cv_reads_no_test_image(monkeypatch):
    """--cv-on validation scores each twin on its held-out fold's normals against a seeded sample of the
    train split's anomalies, the same for every fold; the test sequences are never scored."""
    from training import evaluate as E

    scored: list[list[float]] = []

    class Twin:
        def __init__(self, **params):
            pass

        def fit(self, normals, *, validation=(), seed=0, cluster_pool=()):
            self.threshold = 0.5

    def score_all(det, seqs, batch):  # a sequence's score is its grey level: anomalies (0.9) above normals
        values = [float(s.frames[0, 0, 0]) for s in seqs]
        scored.append(values)
        return np.asarray(values), 0.0

    monkeypatch.setattr("inference.api.get_detector_class", lambda name: Twin)
    monkeypatch.setattr(E, "score_all", score_all)
    monkeypatch.setattr("training.manifest.load_sequences",
                        lambda rows, workers=2: [FrameSequence(frames=np.full(
                            (1, 8, 8), 0.9 if r.label != "normal" else 0.1 + 0.01 * int(r.path.stem[1:]),
                            np.float32)) for r in rows])
    rows = ([ManifestRow(path=Path(f"n{i}.png"), label="normal", split="train", group=f"g{i}") for i in range(6)]
            + [ManifestRow(path=Path(f"a{i}.png"), label="pneumonia", split="train") for i in range(10)])
    card = ModelCard(name="m", version="1", detector="twin", scope=Scope(modalities=("CR",)))
    test_seqs = [FrameSequence(frames=np.full((1, 8, 8), 0.3, np.float32))] * 4  # grey 0.3: never scored
    folds, settings = E.run_cv(card, rows, test_seqs, ["normal", "normal", "pneumonia", "pneumonia"], k=3,
                               seed=0, batch=4, workers=1, n_boot=0, on="validation", n_anomalies=4)
    def has_test(values):
        return any(abs(v - 0.3) < 1e-6 for v in values)

    assert len(scored) == 3 and not any(has_test(values) for values in scored)
    assert all(len(v) == 2 + 4 and sorted(v)[2:] == [pytest.approx(0.9)] * 4 for v in scored)  # 2 held + 4
    assert all(f["auroc"] == 1.0 and "specificity" not in f for f in folds)
    assert settings["on"] == "validation" and settings["n_anomalies"] == 4
    assert "no test image is read" in settings["description"]
    with pytest.raises(ValueError, match="needs anomalies in the train split"):
        E.run_cv(card, rows[:6], test_seqs, ["normal"] * 4, k=3, seed=0, batch=4, workers=1, n_boot=0,
                 on="validation")
    _, test_settings = E.run_cv(card, rows, test_seqs, ["normal", "normal", "pneumonia", "pneumonia"], k=3,
                                seed=0, batch=4, workers=1, n_boot=0, on="test")
    assert "not to choose a recipe by" in test_settings["description"] and has_test(scored[-1])


@pytest.mark.parametrize("command", ["evaluate", "calibrate", "train"])
def test_an_unreadable_input_file_is_an_error_naming_it_not_a_traceback(command, make_settings, tmp_path, capsys,
                                                                        caplog):
    folder = tmp_path / "images"
    for label in ("normal", "pneumonia"):
        (folder / label).mkdir(parents=True)
        for i in range(20):
            cv2.imwrite(str(folder / label / f"{i:02d}.png"), np.full((32, 32), 40 + i, np.uint8))
    (folder / "normal" / "zz-broken.dcm").write_bytes(b"DICM, but not really")
    out = tmp_path / "out"
    extra = {"evaluate": [], "calibrate": ["--model", "inference/bundled/chest-cxr"],
             "train": ["--detector", "knn-effnet"]}[command]
    args = build_parser().parse_args([command, "--folder", str(folder), "--out", str(out), *extra])
    assert args.func(args, make_settings()) == 2
    err = capsys.readouterr().err + "".join(f"error: {r.getMessage()}" for r in caplog.records
                                            if r.levelname == "ERROR")  # train logs its errors
    assert "error: cannot read DICOM image" in err and "zz-broken.dcm" in err and "not readable DICOM" in err
    assert "Traceback" not in err


def test_multi_frame_rows_are_judged_at_threshold_as_the_service_judges_them(data_root, make_settings, tmp_path):
    """A row of T frames is judged as the service judges a series (its highest frame against the series
    threshold of T), so the report's counts at the threshold are the service's verdicts, and the report
    names the series threshold it used."""
    from inference.api import load_model, save_model
    from tests.training.test_calibrate import write_dicom

    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    train = load_sequences([r for r in rows if r.split == "train" and r.label == "normal"][:52])
    cls = get_detector_class("knn-effnet")
    det = cls(**cls.SMALL_PARAMS)
    det.fit(train[:12], validation=train[12:], seed=0)  # 40 calibration normals: 5 % / 4 is a higher rank
    model_dir = tmp_path / "model"
    files = save_model(det, model_dir)
    ModelCard(name="tiny-knn", version="0.1", detector="knn-effnet", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(model_dir / f) for f in files}, params=det.get_params()).write(model_dir)
    det = load_model(model_dir)
    assert det.series_threshold(4) > det.threshold

    manifest = tmp_path / "series.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "split", "label"])
        for label in ("normal", "pneumonia"):
            test = load_sequences([r for r in rows if r.split == "test" and r.label == label][:24])
            for i in range(6):
                stack = np.concatenate([s.frames for s in test[4 * i:4 * i + 4]])
                write_dicom(tmp_path / label / f"s{i}.dcm", stack)
                w.writerow([f"{label}/s{i}.dcm", "test", label])
    series = load_sequences([r for r in read_manifest(manifest)])
    verdicts = [det.detect(s, explain=False) for s in series]
    assert {d.threshold for d in verdicts} == {det.series_threshold(4)}
    between = [det.threshold < d.score <= d.threshold for d in verdicts]
    assert any(between), "no row tells the series threshold from the single-image one"

    out = tmp_path / "report"
    assert _evaluate(["--manifest", str(manifest), "--model", str(model_dir), "--out", str(out), "--bootstrap", "0",
                      "--gallery", "1", "--no-style-baseline"], make_settings()) == 0
    m = json.loads((out / "metrics.json").read_text())
    called = np.array([d.is_anomaly for d in verdicts])
    anomaly = np.array([False] * 6 + [True] * 6)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (int(np.sum(called & anomaly)), int(np.sum(called & ~anomaly)),
                                                   int(np.sum(~called & ~anomaly)), int(np.sum(~called & anomaly)))
    assert m["per_class_flagged_rate"]["normal"] == pytest.approx(float(np.mean(called[~anomaly])))
    assert m["threshold"] == pytest.approx(det.threshold)
    assert m["series_rows"] == [{"frames": 4, "rows": 12, "threshold": pytest.approx(det.series_threshold(4))}]
    assert "| 4 | 12 |" in (out / "report.md").read_text()
    with open(out / "scores.csv", newline="") as fh:  # row by row, the service's verdicts too
        assert [int(r["called_abnormal"]) for r in csv.DictReader(fh)] == [int(c) for c in called]


def test_bad_evaluation_input_is_an_error_before_any_scoring(kermany_slice, make_settings, tmp_path, capsys,
                                                             monkeypatch):
    """No test split, a folder that is no model, a tampered model and a --cv the train normals cannot fill
    are errors (exit status 2) named before the test split is scored, not tracebacks (the --cv one came
    after all the scoring)."""
    import shutil

    import training.evaluate as E

    csv_path, model_dir = kermany_slice
    scored: list[int] = []
    real_score_all = E.score_all
    monkeypatch.setattr(E, "score_all", lambda det, seqs, batch: scored.append(len(seqs)) or real_score_all(
        det, seqs, batch))
    no_test = tmp_path / "no-test.csv"
    no_test.write_text("".join(line for line in csv_path.read_text().splitlines(keepends=True)
                               if ",test," not in line))
    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    card = json.loads((tampered / "card.json").read_text())
    (tampered / next(iter(card["files"]))).write_bytes(b"not the model")
    cases = [
        (["--manifest", str(no_test), "--model", str(model_dir)], "no 'test' split"),
        (["--manifest", str(csv_path), "--model", str(tmp_path)], "has no card.json"),
        (["--manifest", str(csv_path), "--model", str(tampered)], "checksum of"),
        (["--manifest", str(csv_path), "--model", str(model_dir), "--cv", "100"], "--cv 100: need 2 <= K <= 16"),
    ]
    for argv, message in cases:
        out = tmp_path / "report"
        assert _evaluate([*argv, "--out", str(out)], make_settings()) == 2, argv
        assert message in capsys.readouterr().err and not out.exists()
    assert scored == []
