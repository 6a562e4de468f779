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
