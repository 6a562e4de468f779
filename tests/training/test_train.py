"""A tiny end-to-end ``medgru train`` on a slice of the real Kermany data."""

import json
from pathlib import Path

import numpy as np
import pytest

from inference.api import ModelCard, load_model
from medgru.cli import build_parser
from training.manifest import load_frames, read_manifest
from training.train import group_split, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("train")
    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    normals = [r for r in rows if r.split == "train" and r.is_normal][:16]
    test = [r for r in rows if r.split == "test" and r.is_normal][:3] + \
           [r for r in rows if r.split == "test" and not r.is_normal][:3]
    lines = ["path,label,split,group"] + [f"{r.path},{r.label},{r.split},{r.group or ''}" for r in normals + test]
    (tmp / "slice.csv").write_text("\n".join(lines) + "\n")
    out = tmp / "model"
    args = build_parser().parse_args([
        "train", "--manifest", str(tmp / "slice.csv"), "--out", str(out), "--name", "tiny-chest",
        "--version", "0.0.1", "--input-size", "64", "--epochs", "2", "--hpo-trials", "3",
        "--hidden-channels", "8", "--reduce-channels", "16", "--batch-size", "4",
        "--report-split", "test", "--cache", str(tmp / "cache"), "--modalities", "CR,DX",
        "--body-parts", "CHEST",
    ])
    from medgru.settings import Settings

    settings = Settings(home=tmp / "home", data_root=data_root)
    assert run(args, settings) == 0
    return out, test, args, settings


def test_cluster_gamma_option_defaults_to_auto_and_reaches_the_detector():
    from training.train import detector_from_args

    base = ["train", "--manifest", "m.csv", "--out", "o"]
    args = build_parser().parse_args(base)
    assert args.cluster_gamma == "auto" and detector_from_args(args).cluster_gamma == "auto"
    args = build_parser().parse_args(base + ["--cluster-gamma", "2.5"])
    assert args.cluster_gamma == 2.5 and detector_from_args(args).get_params()["cluster_gamma"] == 2.5
    for bad in ("0", "-1", "wide"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + ["--cluster-gamma", bad])


def test_device_option_defaults_to_the_cpu_and_refuses_a_gpu_that_is_not_there(monkeypatch):
    import torch

    from training.train import detector_from_args

    base = ["train", "--manifest", "m.csv", "--out", "o"]
    assert detector_from_args(build_parser().parse_args(base)).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detector_from_args(build_parser().parse_args(base + ["--device", "auto"])).device == "cpu"
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        detector_from_args(build_parser().parse_args(base + ["--device", "cuda"]))


def test_gpu_maps_and_checkpoints_are_kept_apart_from_the_cpus(tmp_path):
    """A feature cache or checkpoint written on a GPU (TF32 maps) must never feed a CPU run, which has to
    rebuild the bundled models bit for bit; CPU runs keep the keys they had before --device existed."""
    from inference.backbone import backbone_info
    from inference.detectors.medgru_svc import MedGRUSVC
    from training.train import FeatureCache

    cpu, gpu = MedGRUSVC(), MedGRUSVC()
    gpu.device = "cuda:1"  # a name only: no GPU is needed to compute keys
    cpu_key = FeatureCache(tmp_path, cpu)._prep_key()
    assert cpu_key == {"size": cpu.input_size, "clip": cpu.clip_limit, "tile": cpu.tile_grid,
                       "bb": backbone_info(), "v": 2}
    assert FeatureCache(tmp_path, gpu)._prep_key() == {**cpu_key, "device": "cuda"}


@pytest.mark.slow
def test_model_folder_is_complete_and_loadable(trained):
    out, test, _, _ = trained
    card = ModelCard.read(out)
    assert card.detector == "medgru-svc" and card.name == "tiny-chest" and card.version == "0.0.1"
    assert card.scope.covers("DX", "CHEST") and not card.scope.covers("MR", "BRAIN")
    assert set(card.files) >= {"encoder.pt", "svdd.npz", "meta.json", "training.json"}
    assert "NOT FOR DIAGNOSTIC USE" in " ".join(card.limitations)
    assert card.params["input_size"] == 64
    assert "auroc" in card.metrics["test_metrics"]
    machine_root = str(Path(__file__).resolve().parents[3]) + "/"  # the folder above the checkout
    assert machine_root not in (out / "training.json").read_text()
    env = json.loads((out / "training.json").read_text())["environment"]
    assert env["numpy"] == np.__version__ and env["scikit-learn"] != "absent" and env["optuna"] != "absent"
    det = load_model(out)
    seq = load_frames(test[-1])
    d = det.detect(seq)
    assert d.model_name == "tiny-chest" and d.model_version == "0.0.1"
    assert d.heatmaps.shape == seq.frames.shape and d.heatmaps.dtype == np.float32
    assert d.is_anomaly == (d.score > d.threshold)
    scores = det.score_batch([load_frames(r) for r in test])
    assert scores.shape == (6,) and np.isfinite(scores).all()


@pytest.mark.slow
def test_eight_frame_sequence_is_scored(trained):
    out, test, _, _ = trained
    det = load_model(out)
    from inference.api import FrameSequence

    frames = np.concatenate([load_frames(r).frames for r in test] + [load_frames(test[0]).frames] * 2)
    d = det.detect(FrameSequence(frames=frames))
    assert d.heatmaps.shape == (8, 224, 224) and len(d.frame_scores) == 8


@pytest.mark.slow
def test_checksum_is_verified(trained, tmp_path):
    out, _, _, _ = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "svdd.npz", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match="checksum"):
        load_model(copy)


@pytest.mark.slow
def test_rerun_uses_the_feature_cache_and_is_deterministic(trained, tmp_path):
    out, _, args, settings = trained
    args.out = tmp_path / "again"
    assert run(args, settings) == 0
    a = json.loads((out / "meta.json").read_text())["fit_report"]
    b = json.loads((args.out / "meta.json").read_text())["fit_report"]
    assert b["threshold"] == pytest.approx(a["threshold"])
    # the same arguments and images find the first run's finished encoder checkpoint and resume there
    assert "resumed_from_epoch" not in a and b["resumed_from_epoch"] == 2
    assert b["loss_history"] == a["loss_history"]


@pytest.mark.slow
def test_ctrl_c_during_training_says_where_it_stopped_and_the_same_command_resumes(trained, tmp_path,
                                                                                  monkeypatch, caplog):
    import tqdm

    import argparse

    _, _, shared_args, settings = trained
    args = argparse.Namespace(**vars(shared_args))  # the fixture's own arguments stay as they are
    args.cache = tmp_path / "cache"  # a run of its own: no finished checkpoint to find
    args.out = tmp_path / "model"
    real = tqdm.tqdm

    def ctrl_c_in_epoch_2(it=None, *a, desc="", **kw):
        if desc != "ConvGRU epochs":
            return real(it, *a, desc=desc, **kw)

        def epochs():
            for i, e in enumerate(it):
                if i == 1:
                    raise KeyboardInterrupt
                yield e
        return epochs()

    monkeypatch.setattr(tqdm, "tqdm", ctrl_c_in_epoch_2)
    with caplog.at_level("ERROR", logger="training.train"):
        assert run(args, settings) == 130
    assert "after 1 of 2 ConvGRU epochs (checkpoint kept)" in caplog.text and not args.out.exists()
    monkeypatch.undo()
    assert run(args, settings) == 0
    assert json.loads((args.out / "meta.json").read_text())["fit_report"]["resumed_from_epoch"] == 1


@pytest.mark.slow
def test_other_images_of_the_same_count_get_a_checkpoint_of_their_own(tmp_path, data_root):
    from medgru.settings import Settings
    from training.train import prepare

    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    normals = [r for r in rows if r.split == "train" and r.is_normal]
    settings = Settings(home=tmp_path / "home", data_root=data_root)
    csv = tmp_path / "normals.csv"  # one manifest, edited between the runs
    args = build_parser().parse_args([
        "train", "--manifest", str(csv), "--out", str(tmp_path / "m"), "--input-size", "64",
        "--cache", str(tmp_path / "cache"), "--loss", "reconstruct"])
    keys = []
    for chosen in (normals[:10], normals[:9] + normals[10:11], normals[:10]):
        csv.write_text("path,label\n" + "".join(f"{r.path},{r.label}\n" for r in chosen))
        keys.append(prepare(args, settings).checkpoint)
    assert keys[0] != keys[1] and keys[2] == keys[0]


def test_a_gpu_run_gets_a_checkpoint_of_its_own_and_cpu_runs_keep_theirs(tmp_path, data_root, monkeypatch):
    import torch

    import inference.device
    from medgru.settings import Settings
    from training.train import FeatureCache, prepare

    normals = [r for r in read_manifest(data_root / "kermany_cxr" / "manifest.csv")
               if r.split == "train" and r.is_normal][:10]
    csv = tmp_path / "normals.csv"
    csv.write_text("path,label\n" + "".join(f"{r.path},{r.label}\n" for r in normals))
    settings = Settings(home=tmp_path / "home", data_root=data_root)
    base = ["train", "--manifest", str(csv), "--out", str(tmp_path / "m"), "--input-size", "64",
            "--cache", str(tmp_path / "cache"), "--loss", "reconstruct"]
    cpu = prepare(build_parser().parse_args(base), settings).checkpoint
    assert prepare(build_parser().parse_args(base + ["--device", "cpu"]), settings).checkpoint == cpu
    # a GPU run, without a GPU: the device is only named, and no maps are computed
    monkeypatch.setattr(inference.device, "resolve_device", lambda d: "cuda:0")
    monkeypatch.setattr(FeatureCache, "features", lambda self, rows, **kw: torch.zeros(len(rows), 1, 1, 1, 1))
    gpu = prepare(build_parser().parse_args(base + ["--device", "cuda"]), settings).checkpoint
    assert gpu != cpu


def test_group_split_keeps_groups_together():
    from training.manifest import ManifestRow

    rows = [ManifestRow(path=Path(f"/x/{i}.png"), label="normal", group=f"p{i // 3}") for i in range(30)]
    parts = group_split(rows, [0.2, 0.2], seed=0)
    assert sum(len(p) for p in parts) == 30
    groups = [{r.group for r in p} for p in parts]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert all(len(p) > 0 for p in parts)


@pytest.mark.slow
def test_self_supervised_label_free_recipe(trained, tmp_path):
    """``--loss reconstruct --hpo-objective consistent-volume --whiten``: no synthetic training set, a
    label-free HPO whose choice is consistent on the held-out normals, a whitened log-score boundary."""
    _, test, args, settings = trained
    args.out, args.cache = tmp_path / "ssl", tmp_path / "cache"  # a fresh cache: see what this run makes
    args.loss, args.hpo_objective, args.whiten, args.nu_max = "reconstruct", "consistent-volume", True, 0.2
    assert run(args, settings) == 0
    card = ModelCard.read(args.out)
    assert card.params["loss"] == "reconstruct" and card.params["whiten"] is True
    hpo = card.metrics["hpo"]
    assert hpo["objective"].startswith("Tax & Muller") and 0.01 <= hpo["nu"] <= 0.2
    report = json.loads((args.out / "meta.json").read_text())["fit_report"]
    assert "reconstruct" in report["encoder_objective"]
    assert not list((args.cache).glob("fit_synthetic-*"))  # no outlier exposure set was made
    with np.load(args.out / "svdd.npz") as z:
        assert "svdd_whitener" in z.files and int(z["svdd_score_form"][0]) == 0  # log form
    det = load_model(args.out)
    d = det.detect(load_frames(test[-1]))
    assert np.isfinite(d.score) and d.heatmaps.max() > 0


def _slice_with_anomalies(tmp, data_root, n_anomalies: int = 8) -> Path:
    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    normals = [r for r in rows if r.split == "train" and r.is_normal][:16]
    anomalies = [r for r in rows if r.split == "train" and not r.is_normal][:n_anomalies]
    test = [r for r in rows if r.split == "test" and r.is_normal][:3] + \
           [r for r in rows if r.split == "test" and not r.is_normal][:3]
    lines = ["path,label,split,group"] + [f"{r.path},{r.label},{r.split},{r.group or ''}"
                                          for r in normals + anomalies + test]
    (tmp / "slice.csv").write_text("\n".join(lines) + "\n")
    return tmp / "slice.csv"


def _tiny_args(manifest: Path, out: Path, cache: Path, *extra: str):
    return build_parser().parse_args([
        "train", "--manifest", str(manifest), "--out", str(out), "--name", "tiny-sup", "--version", "0.0.1",
        "--input-size", "64", "--epochs", "1", "--hpo-trials", "2", "--hidden-channels", "8",
        "--reduce-channels", "16", "--batch-size", "4", "--cache", str(cache), *extra])


@pytest.mark.slow
def test_supervised_mode_uses_the_labelled_train_anomalies_and_says_so(tmp_path, data_root):
    from medgru.settings import Settings

    manifest = _slice_with_anomalies(tmp_path, data_root, n_anomalies=8)
    settings = Settings(home=tmp_path / "home", data_root=data_root)
    out = tmp_path / "sup"
    args = _tiny_args(manifest, out, tmp_path / "cache", "--supervised", "--loss", "hsc")
    assert run(args, settings) == 0
    card = ModelCard.read(out)
    assert card.metrics["supervised"]["labelled_anomalies"] == 8
    assert card.metrics["supervised"]["by_label"] == {"pneumonia": 8}
    assert card.description.startswith("SUPERVISED MODE")
    assert any(lim.startswith("Supervised: trained with 8 labelled anomalies") for lim in card.limitations)
    assert "8 labelled anomalies" in card.training_data
    assert load_model(out).threshold is not None

    unsup = tmp_path / "unsup"  # the same slice without --supervised: labels unused, nothing claimed
    assert run(_tiny_args(manifest, unsup, tmp_path / "cache", "--loss", "reconstruct"), settings) == 0
    card_u = ModelCard.read(unsup)
    assert "supervised" not in card_u.metrics and not card_u.description.startswith("SUPERVISED")


def test_supervised_mode_refuses_a_normals_only_objective(tmp_path, data_root):
    from medgru.settings import Settings

    manifest = _slice_with_anomalies(tmp_path, data_root, n_anomalies=4)
    settings = Settings(home=tmp_path / "home", data_root=data_root)
    out = tmp_path / "sup"
    assert run(_tiny_args(manifest, out, tmp_path / "cache", "--supervised", "--loss", "reconstruct"), settings) == 2
    assert not out.exists()


def test_the_card_description_names_the_embedding_and_the_kernel():
    from inference.detectors.medgru_svc import MedGRUSVC
    from training.train import medgru_description

    bb = {"weights_package": "w==1", "architecture_package": "a==1"}
    gap = medgru_description(MedGRUSVC(), bb)
    assert "global average pooling" in gap and "whitened" not in gap
    flat = medgru_description(MedGRUSVC(embedding="flatten", flatten_grid=3, hidden_channels=128, whiten=True), bb)
    assert "average-pooled to 3x3 and flattened (1152-d)" in flat and "whitened (Ledoit-Wolf)" in flat
    assert "global average pooling" not in flat
    assert "skip" not in flat
    skip = medgru_description(MedGRUSVC(hidden_channels=128, reduce_channels=256, skip="reduced"), bb)
    assert "GAP of the reduced frames" in skip and "384-d" in skip and "skip path's first-order term" in skip


# --------------------------------------------------------------------- the model folder is replaced whole
def _args_with(trained, **changes):
    import argparse

    _, _, shared_args, settings = trained
    args = argparse.Namespace(**vars(shared_args))  # the fixture's own arguments stay as they are
    for k, v in changes.items():
        setattr(args, k, v)
    return args, settings


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_training_into_an_existing_model_folder_replaces_it_whole(trained, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(trained[0], out)
    (out / "stale-from-an-older-model.npz").write_bytes(b"old")
    args, settings = _args_with(trained, out=out, version="0.0.2")
    assert run(args, settings) == 0
    assert not (out / "stale-from-an-older-model.npz").exists()
    assert load_model(out, verify=True).card.version == "0.0.2"
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_failure_while_writing_leaves_the_previous_model_folder_as_it_was(trained, tmp_path, monkeypatch):
    import shutil

    from inference.detectors.medgru_svc import MedGRUSVC

    out = tmp_path / "model"
    shutil.copytree(trained[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(self, model_dir):
        (Path(model_dir) / "encoder.pt").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(MedGRUSVC, "save", disk_full)
    args, settings = _args_with(trained, out=out, version="0.0.3")
    with pytest.raises(OSError, match="disk full"):
        run(args, settings)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_an_out_folder_that_is_not_a_model_folder_is_refused_before_any_work(tmp_path, data_root, caplog):
    from medgru.settings import Settings

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for detector in ("medgru-svc", "knn-effnet", "patch-gan"):
        args = build_parser().parse_args([
            "train", "--manifest", str(data_root / "kermany_cxr" / "manifest.csv"), "--out", str(precious),
            "--detector", detector, "--cache", str(tmp_path / "cache")])
        with caplog.at_level("ERROR", logger="training.train"):
            assert run(args, Settings(home=tmp_path / "home", data_root=data_root)) == 2
        assert "not a model folder" in caplog.text
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "cache").exists()  # no backbone pass, no training


def test_reframe_copies_augment_the_fit_normals_only(tmp_path, data_root):
    import torch

    from medgru.settings import Settings
    from training.train import prepare

    manifest = _slice_with_anomalies(tmp_path, data_root, n_anomalies=0)
    settings = Settings(home=tmp_path / "home", data_root=data_root)
    plain = prepare(_tiny_args(manifest, tmp_path / "p", tmp_path / "cache"), settings)
    aug = prepare(_tiny_args(manifest, tmp_path / "a", tmp_path / "cache", "--reframe-copies", "2"), settings)
    n = len(plain.fit_rows)
    assert len(plain.features["fit"]) == n and len(aug.features["fit"]) == 3 * n
    assert torch.equal(aug.features["fit"][:n], plain.features["fit"])  # the acquired images come first
    copy1, copy2 = aug.features["fit"][n:2 * n].float(), aug.features["fit"][2 * n:].float()
    base = plain.features["fit"].float()
    assert not torch.allclose(copy1, base, atol=1e-2) and not torch.allclose(copy1, copy2, atol=1e-2)
    for key in ("hpo", "cal"):  # held-out normals stay as acquired
        assert torch.equal(aug.features[key], plain.features[key])
    assert aug.checkpoint != plain.checkpoint
    assert len(list((tmp_path / "cache").glob("fit_reframed-*.npy"))) == 2
    # the same command again: the same copies, from the cache
    again = prepare(_tiny_args(manifest, tmp_path / "a", tmp_path / "cache", "--reframe-copies", "2"), settings)
    assert torch.equal(again.features["fit"], aug.features["fit"]) and again.checkpoint == aug.checkpoint
    with pytest.raises(ValueError, match="reframe-copies"):
        prepare(_tiny_args(manifest, tmp_path / "n", tmp_path / "cache", "--reframe-copies", "-1"), settings)
    # blurred copies: the same transforms (same seeds), then blurred; a run of their own, cached apart
    blur = prepare(_tiny_args(manifest, tmp_path / "b", tmp_path / "cache", "--reframe-copies", "2",
                              "--reframe-blur", "1.5"), settings)
    assert torch.equal(blur.features["fit"][:n], plain.features["fit"])
    assert not torch.allclose(blur.features["fit"][n:].float(), aug.features["fit"][n:].float(), atol=1e-2)
    assert blur.checkpoint not in (aug.checkpoint, plain.checkpoint)
    assert len(list((tmp_path / "cache").glob("fit_reframed-*.npy"))) == 4
    with pytest.raises(ValueError, match="reframe-copies"):  # blur without copies would do nothing
        prepare(_tiny_args(manifest, tmp_path / "n", tmp_path / "cache", "--reframe-blur", "1"), settings)


@pytest.mark.slow
def test_a_model_trained_with_reframe_copies_says_so_in_its_card(tmp_path, data_root):
    from medgru.settings import Settings

    manifest = _slice_with_anomalies(tmp_path, data_root, n_anomalies=0)
    settings = Settings(home=tmp_path / "home", data_root=data_root)
    out = tmp_path / "m"
    assert run(_tiny_args(manifest, out, tmp_path / "cache", "--loss", "reconstruct", "--reframe-copies", "1"),
               settings) == 0
    card = ModelCard.read(out)
    assert "augmented with 1 randomly re-framed copies each (zoom 1 +/- 0.15" in card.training_data
    training = json.loads((out / "training.json").read_text())
    assert training["command_args"]["reframe_copies"] == 1
    assert load_model(out).threshold is not None


def test_the_train_command_offers_exactly_the_detectors_objectives_reducer_starts_and_searches():
    from inference.detectors.medgru_svc import HPO_OBJECTIVES, LOSSES, REDUCER_INITS
    from training.train import ENCODER_LOSSES, ENCODER_REDUCER_INITS, HPO_OBJECTIVE_CHOICES

    assert ENCODER_LOSSES == LOSSES and ENCODER_REDUCER_INITS == REDUCER_INITS
    assert HPO_OBJECTIVE_CHOICES == HPO_OBJECTIVES


def test_every_detector_the_train_command_offers_is_registered():
    from inference.api import registered_detectors
    from training.train import DETECTOR_CHOICES

    assert "patch-gan" in DETECTOR_CHOICES
    assert set(DETECTOR_CHOICES) <= set(registered_detectors())
    parser = build_parser()
    for detector in DETECTOR_CHOICES:
        args = parser.parse_args(["train", "--manifest", "m.csv", "--out", "o", "--detector", detector])
        assert args.detector == detector
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--manifest", "m.csv", "--out", "o", "--detector", "no-such-detector"])


def test_multi_frame_dicom_normals_train_one_image_per_frame(tmp_path, dicom_corpus, data_root):
    """Three copies of a 16-frame MR file as normals: 48 training images, not 3 last frames; each file's
    frames stay in one share of the grouped split (fit, HPO, calibration)."""
    from medgru.settings import Settings
    from training.train import prepare

    src = dicom_corpus / "dwv/data/multiframe-test1.dcm"
    (tmp_path / "normal").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "normal" / f"{name}.dcm").symlink_to(src)
    args = build_parser().parse_args([
        "train", "--folder", str(tmp_path), "--out", str(tmp_path / "m"), "--input-size", "64",
        "--cache", str(tmp_path / "cache"), "--loss", "reconstruct"])
    prep = prepare(args, Settings(home=tmp_path / "home", data_root=data_root))
    assert len(prep.normals) == 48 and sorted({r.frame for r in prep.normals}) == list(range(1, 17))
    shares = (prep.fit_rows, prep.hpo_rows, prep.cal_rows)
    assert [len(s) for s in shares] == [16, 16, 16]
    assert all(len({r.path for r in share}) == 1 for share in shares)
    assert len({r.path for r in prep.fit_rows + prep.hpo_rows + prep.cal_rows}) == 3
    fit = prep.features["fit"].float()
    assert fit.shape[0] == 16 and not np.allclose(fit[0].numpy(), fit[-1].numpy())  # 16 different frames


def test_bad_training_input_is_refused_before_any_work(tmp_path, data_root, caplog):
    """A manifest row whose file is missing (of the training split, or of the split --report-split scores
    after training), and normals in too few groups to fill the fit, HPO and calibration shares, are errors
    (exit status 2) named before the backbone pass, not a traceback, or a refusal after hours of training."""
    from medgru.settings import Settings

    rows = read_manifest(data_root / "kermany_cxr" / "manifest.csv")
    normals = [r for r in rows if r.split == "train" and r.is_normal][:12]
    settings = Settings(home=tmp_path / "home", data_root=data_root)

    def attempt(name: str, lines: list[str], *extra: str) -> str:
        (tmp_path / f"{name}.csv").write_text("\n".join(["path,label,split,group", *lines]) + "\n")
        caplog.clear()
        with caplog.at_level("ERROR", logger="training.train"):
            assert run(_tiny_args(tmp_path / f"{name}.csv", tmp_path / name, tmp_path / "cache", *extra),
                       settings) == 2
        assert not (tmp_path / name).exists() and not (tmp_path / "cache").exists()
        return caplog.text

    good = [f"{r.path},normal,train,p{i}" for i, r in enumerate(normals)]
    text = attempt("missing", good + [f"{tmp_path / 'gone.jpeg'},normal,train,p99"])
    assert "1 image file(s)" in text and "gone.jpeg" in text
    text = attempt("missing-test", good + [f"{tmp_path / 'gone-too.jpeg'},pneumonia,test,"], "--report-split", "test")
    assert "gone-too.jpeg" in text
    one_site = [f"{r.path},normal,train,site1" for r in normals]
    text = attempt("one-group", one_site)
    assert "form 1 group(s)" in text and "each share needs images of its own" in text


def test_too_few_calibration_normals_are_named_in_a_warning(tmp_path, data_root, caplog):
    """16 normals leave 2 or 3 for the calibration: the threshold is then their highest score and the target
    false-positive rate is not held; training goes on, and says so."""
    from medgru.settings import Settings
    from training.train import prepare

    manifest = _slice_with_anomalies(tmp_path, data_root, n_anomalies=0)
    with caplog.at_level("WARNING", logger="training.train"):
        prep = prepare(_tiny_args(manifest, tmp_path / "m", tmp_path / "cache"),
                       Settings(home=tmp_path / "home", data_root=data_root))
    n = len(prep.cal_rows)
    assert 0 < n < 19
    assert f"only {n} calibration normals" in caplog.text and f"{1 / (n + 1):.3f}" in caplog.text
