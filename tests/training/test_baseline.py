"""``medgru train --detector knn-effnet`` on a small slice of real data gives a loadable default-style model."""

import csv

import numpy as np

from inference.api import ModelCard, Scope, load_model
from medgru.cli import main
from training.baseline import grouped_holdout
from training.manifest import load_frames, read_manifest


def _slice(data_root, tmp_path, n_normal=10, n_anomaly=2):
    src = data_root / "kermany_cxr" / "manifest.csv"
    rows = read_manifest(src)
    normals = [r for r in rows if r.split == "train" and r.is_normal][:n_normal]
    anomalies = [r for r in rows if r.split == "train" and not r.is_normal][:n_anomaly]
    out = tmp_path / "slice.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "group"])
        for r in normals + anomalies:
            w.writerow([str(r.path), r.label, "train", r.group or ""])
    return out, normals, anomalies


def test_grouped_holdout_keeps_groups_on_one_side():
    class R:
        def __init__(self, g):
            self.group = g

    rows = [R(g) for g in "aabbccddeeff"]
    fit, cal = grouped_holdout(rows, 0.34, seed=0)
    assert sorted(fit + cal) == list(range(12)) and cal
    assert not {rows[i].group for i in fit} & {rows[i].group for i in cal}


def test_train_knn_through_the_cli(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGRU_HOME", str(tmp_path / "home"))
    manifest, normals, anomalies = _slice(data_root, tmp_path)
    out = tmp_path / "knn"
    rc = main(["train", "--detector", "knn-effnet", "--manifest", str(manifest), "--out", str(out),
               "--name", "knn-test", "--version", "0.1", "--modalities", "CR,DX", "--body-parts", "CHEST",
               "--target-fpr", "0.1"])
    assert rc == 0
    card = ModelCard.read(out)
    assert card.detector == "knn-effnet" and card.name == "knn-test" and card.version == "0.1"
    assert card.params["alpha"] == 0.1  # --target-fpr reaches the k-NN's conformal threshold
    assert card.scope.covers("DX", "CHEST") and not card.scope.covers("MR", "BRAIN")
    # only the 10 normals were used (memorised + held out for calibration); the anomalies never
    import re

    counts = [int(n) for n in re.findall(r"(\d+) (?:training-split|grouped held-out)", card.training_data)]
    assert sum(counts) == 10, card.training_data
    det = load_model(out)  # checksums verified
    assert det.alpha == 0.1
    seqs = [load_frames(r.path) for r in normals[:2] + anomalies]
    scores = det.score_batch(seqs)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    # a memorised training normal is closer to the bank than an unseen pneumonia image
    assert scores[:2].min() < scores[2:].max()


def test_knn_cli_passes_target_fpr_and_names_the_model_after_its_detector(tmp_path, monkeypatch):
    """``--target-fpr`` was dropped on the k-NN path (its threshold stayed at 5 %), and without ``--name`` a
    k-NN model was called ``medgru-svc``. ``train_knn`` is replaced: no backbone pass."""
    import training.baseline

    calls = []

    def fake_train_knn(normals, out, **kwargs):
        calls.append(kwargs)
        return ModelCard(name=kwargs["name"], version=kwargs["version"], detector="knn-effnet",
                         scope=Scope(modalities=("OT",)))

    monkeypatch.setattr(training.baseline, "train_knn", fake_train_knn)
    monkeypatch.setenv("MEDGRU_HOME", str(tmp_path / "home"))
    for i in range(3):
        (tmp_path / "data" / "normal").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "normal" / f"{i}.png").write_bytes(b"never read")
    base = ["train", "--detector", "knn-effnet", "--folder", str(tmp_path / "data")]
    assert main(base + ["--out", str(tmp_path / "a"), "--target-fpr", "0.01"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--name", "knn-site"]) == 0
    assert calls[0]["params"]["alpha"] == 0.01 and calls[0]["name"] == "knn-effnet"
    assert calls[1]["params"]["alpha"] == 0.05 and calls[1]["name"] == "knn-site"


def test_train_patch_gan_through_the_cli_and_evaluate_it(data_root, tmp_path, monkeypatch):
    """``medgru train --detector patch-gan`` on a tiny brain MRI slice: the options reach the detector, only the
    train split's normals are used, the folder loads with its checksums; ``medgru evaluate`` then scores the
    test split and draws the heat-map gallery from the detector's maps."""
    import json
    import re

    monkeypatch.setenv("MEDGRU_HOME", str(tmp_path / "home"))
    rows = read_manifest(data_root / "brain_mri" / "manifest.csv")
    pick = {("train", True): 10, ("train", False): 2, ("test", True): 4, ("test", False): 4}
    chosen = []
    for (split, normal), n in pick.items():
        chosen += [r for r in rows if r.split == split and r.is_normal == normal][:n]
    manifest = tmp_path / "slice.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for r in chosen:
            w.writerow([str(r.path), r.label, r.split])
    out = tmp_path / "pg"
    rc = main(["train", "--detector", "patch-gan", "--manifest", str(manifest), "--out", str(out),
               "--modalities", "MR", "--body-parts", "BRAIN", "--image-size", "32", "--patch-size", "8",
               "--base-channels", "4", "--epochs", "2", "--batch-size", "4", "--adv-weight", "0.05",
               "--target-fpr", "0.2", "--knn-calibration-fraction", "0.3"])
    assert rc == 0
    card = ModelCard.read(out)
    assert card.detector == "patch-gan" and card.name == "patch-gan" and card.version == "1.0.0"
    assert {k: card.params[k] for k in ("image_size", "patch_size", "base_channels", "epochs", "batch_size",
                                        "adv_weight", "alpha")} == {
        "image_size": 32, "patch_size": 8, "base_channels": 4, "epochs": 2, "batch_size": 4, "adv_weight": 0.05,
        "alpha": 0.2}
    counts = [int(n) for n in re.findall(r"(\d+) (?:training-split|grouped held-out)", card.training_data)]
    assert counts == [7, 3], card.training_data  # the 10 train normals; no anomaly, no test image
    assert set(card.files) == {"patch_gan.npz", "calibration.json", "training.json"}
    training = json.loads((out / "training.json").read_text())
    assert len(training["history"]) == 2 and training["command_args"]["out"] == "pg"
    det = load_model(out)  # checksums verified
    assert det.calibration_scores.size == 3

    report = tmp_path / "report"
    assert main(["evaluate", "--manifest", str(manifest), "--model", str(out), "--out", str(report),
                 "--bootstrap", "20", "--gallery", "1"]) == 0
    m = json.loads((report / "metrics.json").read_text())
    assert m["model"]["detector"] == "patch-gan" and m["n_normal"] == 4 and m["n_anomaly"] == 4
    assert 0.0 <= m["auroc"] <= 1.0 and (report / "gradcam_gallery.png").is_file()
