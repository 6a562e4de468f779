"""MedGRU-SVC training options on small random backbone maps (no images): the self-supervised
reconstruction objective, the label-free Tax & Duin HPO, and the non-saturating score far away."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.api import FrameSequence
from inference.backbone import FEATURE_CHANNELS
from inference.detectors.medgru_svc import MedGRUSVC


def maps(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """``(n, 1, C, 4, 4)`` non-negative maps with low-rank structure (like backbone activations)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, FEATURE_CHANNELS, generator=torch.Generator().manual_seed(99))
    coef = torch.randn(n, 6, 4, 4, generator=g)
    x = torch.einsum("nkhw,kc->nchw", coef, basis) + 0.1 * torch.randn(n, FEATURE_CHANNELS, 4, 4, generator=g)
    return (x.relu() + shift)[:, None]


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=6, batch_size=8,
                    loss="reconstruct", reducer_init="pca", hpo_objective="tax-duin", nu_max=0.2,
                    hpo_trials=8, envelope_samples=500)
    empty = maps(0, 0)
    report = det.fit_features(maps(80, 1), empty, maps(24, 2), empty, maps(24, 3), seed=0)
    return det, report


def test_reconstruction_objective_trains_without_synthetic_anomalies(fitted):
    det, report = fitted
    hist = report["loss_history"]
    assert len(hist) == 6 and hist[-1] < hist[0]
    assert "reconstruct" in report["encoder_objective"]
    assert "hpo_auroc_normal_vs_synthetic" not in report  # nothing synthetic was given


def test_tax_duin_hpo_is_label_free_and_keeps_nu_in_range(fitted):
    det, report = fitted
    hpo = report["hpo"]
    assert hpo["objective"].startswith("Tax & Duin")
    assert 0.01 <= det.nu <= 0.2 and 1e-2 <= det.gamma <= 1e1
    assert hpo["best_error"] == pytest.approx(hpo["heldout_normal_rejection"] + hpo["envelope_acceptance"])
    assert 0.0 <= report["heldout_normal_rejection"] <= 1.0


def test_shifted_maps_score_higher_and_far_inputs_do_not_saturate(fitted):
    det, _ = fitted
    normal = det.score_features(maps(20, 4))
    shifted = det.score_features(maps(20, 5, shift=3.0))
    far = det.score_features(maps(20, 6, shift=30.0))
    assert np.isfinite(far).all()
    assert np.median(shifted) > np.median(normal) and np.median(far) > np.median(shifted)


def test_detect_gives_a_finite_score_and_a_heat_map_for_an_out_of_domain_frame(fitted):
    det, _ = fitted
    frames = np.zeros((2, 64, 64), np.float32)
    frames[:, ::4] = 1.0  # stripes: nothing like the training maps
    d = det.detect(FrameSequence(frames=frames, modality="CR", body_part="CHEST", bits_stored=8))
    assert np.isfinite(d.score) and d.score > d.threshold
    assert d.heatmaps.shape == (2, 64, 64) and d.heatmaps.max() > 0


def test_unknown_objectives_are_rejected():
    with pytest.raises(ValueError, match="hpo_objective"):
        MedGRUSVC(hpo_objective="test-auroc")
    with pytest.raises(ValueError, match="loss"):
        MedGRUSVC(loss="supervised")


def test_auto_cluster_gamma_is_chosen_at_fit_and_saved_as_a_float(tmp_path):
    from inference.api import ModelCard, Scope, load_model, sha256_file

    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=1, batch_size=8,
                    loss="reconstruct", hpo_trials=0)
    assert det.cluster_gamma == "auto" and det.get_params()["cluster_gamma"] == "auto"
    empty = maps(0, 0)
    pool = torch.cat([maps(30, 7, shift=3.0), maps(30, 8, shift=30.0)])  # two kinds of "anomaly"
    report = det.fit_features(maps(40, 1), empty, maps(12, 2), empty, maps(12, 3), seed=0, cluster_pool=pool)
    info = report["clusters"]
    assert info["gamma_choice"] == "auto" and isinstance(info["gamma"], float)
    trace = info["trace"]
    assert info["gamma"] == trace["gamma"] and info["gamma"] in trace["gammas"]
    assert len(trace["counts"]) == len(trace["gammas"]) == len(trace["per_gamma"])
    assert sum(info["sizes"].values()) == info["pool"] <= 60
    assert list(info["sizes"]) == det.clusters.names
    assert isinstance(det.clusters.gamma, float) and det.clusters.gamma == info["gamma"]

    files = det.save(tmp_path)
    ModelCard(name="auto-svc", version="0.0.1", detector="medgru-svc", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=det.get_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.cluster_gamma == "auto"
    assert isinstance(loaded.clusters.gamma, float) and loaded.clusters.gamma == info["gamma"]
    assert loaded.fit_report["clusters"]["trace"]["counts"] == trace["counts"]
    probe = det.embed_features(pool[:5])
    assert loaded.clusters.predict(probe) == det.clusters.predict(probe)


def test_fixed_cluster_gamma_is_still_accepted_and_validated():
    det = MedGRUSVC(cluster_gamma=2.0)
    assert det.cluster_gamma == 2.0 and det.get_params()["cluster_gamma"] == 2.0
    assert MedGRUSVC(cluster_gamma="AUTO").cluster_gamma == "auto"
    for bad in (0.0, -1.0, "wide", float("nan")):
        with pytest.raises(ValueError):
            MedGRUSVC(cluster_gamma=bad)


def test_a_model_folder_with_a_fixed_cluster_gamma_loads_unchanged(tmp_path):
    """Folders saved before "auto" existed carry a float cluster_gamma in their params."""
    from inference.api import ModelCard, Scope, load_model, sha256_file

    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=1, batch_size=8,
                    loss="reconstruct", hpo_trials=0, cluster_gamma=1.0)
    empty = maps(0, 0)
    det.fit_features(maps(40, 1), empty, maps(12, 2), empty, maps(12, 3), seed=0,
                     cluster_pool=maps(30, 7, shift=3.0))
    files = det.save(tmp_path)
    ModelCard(name="fixed-svc", version="3.0.0", detector="medgru-svc", scope=Scope(modalities=("MR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=det.get_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.cluster_gamma == 1.0
    assert loaded.clusters is not None and isinstance(loaded.clusters.gamma, float) and loaded.clusters.gamma == 1.0


def test_the_bundled_brain_model_has_an_auto_chosen_float_cluster_width():
    from pathlib import Path

    from inference.api import load_model

    folder = Path(__file__).resolve().parents[2] / "inference" / "bundled" / "brain-mr"
    det = load_model(folder)
    assert det.card.detector == "medgru-svc" and det.cluster_gamma == "auto"
    assert det.clusters is not None and isinstance(det.clusters.gamma, float)
    assert det.fit_report["clusters"]["gamma"] == det.clusters.gamma


def placed(m: torch.Tensor, col: int) -> torch.Tensor:
    """``(n, 1, C, 4, 4)`` maps placed at columns ``col .. col+3`` of a zero ``(n, 1, C, 4, 12)`` map."""
    out = torch.zeros(*m.shape[:-1], 12)
    out[..., col:col + 4] = m
    return out


def test_flatten_embedding_keeps_position_trains_explains_and_round_trips(tmp_path):
    """``embedding="flatten"``: h_T pooled to a grid and flattened. The same content moved sideways
    (two empty columns from every edge, so the 3x3 ConvGRU sees the same windows) keeps its GAP
    embedding, so a GAP model cannot see the move; the flattened one scores it as anomalous."""
    from inference.api import ModelCard, Scope, load_model, sha256_file

    with pytest.raises(ValueError):
        MedGRUSVC(embedding="max")
    with pytest.raises(ValueError):
        MedGRUSVC(embedding="flatten", flatten_grid=-1)
    empty = maps(0, 0)
    train, moved = placed(maps(60, 1), 2), placed(maps(20, 4), 6)
    held = placed(maps(20, 4), 2)  # the moved maps where the normals have them
    fitted = {}
    for emb in ("gap", "flatten"):
        torch.manual_seed(0)
        det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=2, batch_size=8,
                        loss="reconstruct", reducer_init="pca", hpo_trials=0, embedding=emb, flatten_grid=2,
                        whiten=True)
        det.fit_features(train, empty, train[:12], empty, train[12:24], seed=0)
        fitted[emb] = det
    gap, flat = fitted["gap"], fitted["flatten"]
    assert gap.embed_features(train[:3]).shape == (3, 8) and flat.embed_features(train[:3]).shape == (3, 2 * 2 * 8)
    assert np.allclose(gap.embed_features(moved), gap.embed_features(held), atol=1e-5)
    assert np.allclose(gap.score_features(moved), gap.score_features(held), atol=1e-4)
    assert not np.allclose(flat.embed_features(moved), flat.embed_features(held), atol=1e-3)
    assert np.median(flat.score_features(moved)) > np.quantile(flat.score_features(held), 0.95)

    frames = np.zeros((1, 64, 64), np.float32)
    frames[:, ::4] = 1.0
    seq = FrameSequence(frames=frames, modality="CR", body_part="CHEST", bits_stored=8)
    d = flat.detect(seq)
    assert np.isfinite(d.score) and d.heatmaps.shape == (1, 64, 64)
    assert d.score == pytest.approx(float(flat.score_features(flat.sequence_features(seq)[None])[0]), abs=1e-4)

    files = flat.save(tmp_path)
    ModelCard(name="flat", version="0.0.1", detector="medgru-svc", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=flat.get_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.embedding == "flatten" and loaded.flatten_grid == 2
    assert np.allclose(loaded.score_features(moved), flat.score_features(moved))


def test_the_cluster_pool_is_capped_by_a_seeded_subset_and_saved_compactly(tmp_path):
    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=1, batch_size=8,
                    loss="reconstruct", hpo_trials=0, cluster_gamma=1.0, cluster_max_pool=25, whiten=True)
    empty = maps(0, 0)
    pool = torch.cat([maps(30, 7, shift=3.0), maps(30, 8, shift=30.0)])
    report = det.fit_features(maps(40, 1), empty, maps(12, 2), empty, maps(12, 3), seed=0, cluster_pool=pool)
    info = report["clusters"]
    assert info["pool"] > 25 and info["subsampled_to"] == 25
    assert sum(info["sizes"].values()) == 25 == len(det.clusters.points)
    det.save(tmp_path)
    with np.load(tmp_path / "svdd.npz") as z:
        assert z["svc_points"].dtype == np.float32 and z["svdd_whitener"].dtype == np.float32


def test_denormal_weights_are_flushed_on_load_without_changing_scores(tmp_path):
    from inference.api import ModelCard, Scope, load_model, sha256_file
    from inference.detectors.medgru_svc import flush_denormal_weights_

    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1e-40, 0.5, 0.0], [-3e-39, 2.0, 1e-30]]))
    assert flush_denormal_weights_(lin) == 2
    assert lin.weight.tolist()[0][0] == 0.0 and lin.weight.tolist()[1][0] == 0.0
    assert lin.weight.tolist()[1][2] == pytest.approx(1e-30)  # small but normal: kept

    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=1, batch_size=8,
                    loss="reconstruct", hpo_trials=0)
    empty = maps(0, 0)
    det.fit_features(maps(40, 1), empty, maps(12, 2), empty, maps(12, 3), seed=0)
    with torch.no_grad():
        w = det.encoder.cells[0].W_z.weight
        w.view(-1)[:50] = 1e-41  # what weight decay leaves behind
    probe = maps(10, 5)
    before = det.score_features(probe)
    files = det.save(tmp_path)
    ModelCard(name="dn", version="0.0.1", detector="medgru-svc", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=det.get_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    lw = loaded.encoder.cells[0].W_z.weight
    assert int(((lw != 0) & (lw.abs() < torch.finfo(torch.float32).tiny)).sum()) == 0
    assert np.allclose(loaded.score_features(probe), before, rtol=0, atol=1e-9)
    assert torch.load(tmp_path / "encoder.pt", weights_only=True)["cells.0.W_z.weight"].view(-1)[0] != 0  # file as saved


def test_grad_cam_leaves_the_weights_alone_and_matches_a_pass_with_weight_gradients(fitted):
    from inference.gradcam import grad_cam

    det, _ = fitted
    frames = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    seq = FrameSequence(frames=frames, modality="CR", body_part="CHEST", bits_stored=8)
    params = list(det.encoder.parameters())
    grads = [None if p.grad is None else p.grad.clone() for p in params]  # whatever training left there
    d = det.detect(seq)
    assert all(p.requires_grad for p in params)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, params))
    feats = det.sequence_features(seq)
    own_score, own_heat, _ = det._explain(feats, (64, 64))  # the sequence's Grad-CAM as detect computes one
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, params))
    score, heat = grad_cam(det.encoder.cells[-1], lambda: det._torch_boundary(det.embed(det.encoder(feats[None].float()))),
                           (64, 64))  # the plain way: weight gradients computed too
    assert own_score == pytest.approx(score, abs=1e-6)
    assert np.allclose(own_heat, heat, atol=1e-5)
    assert d.extras["sequence_score"] == pytest.approx(score, abs=1e-5)  # kept for reading beside the verdict


def test_reduced_skip_block_is_the_gap_of_the_convgru_input_z_scored_explained_and_saved(tmp_path):
    """``skip="reduced"``: the embedding is [GAP(h_T), GAP over frames and positions of the reduced frames],
    z-scored on the training normals; detect() scores (and explains) the same embedding; the model
    folder keeps the z-score."""
    from inference.api import ModelCard, Scope, load_model, sha256_file

    with pytest.raises(ValueError):
        MedGRUSVC(skip="maps")
    torch.manual_seed(0)
    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=2, batch_size=8,
                    loss="reconstruct", reducer_init="pca", hpo_trials=0, whiten=True, skip="reduced")
    empty = maps(0, 0)
    train = torch.cat([maps(40, 1), maps(40, 5)], dim=1)  # T = 2
    det.fit_features(train, empty, train[:12], empty, train[12:24], seed=0)
    e = det.embed_features(train)
    assert e.shape == (40, 8 + 16) == (40, det.embedding_dim)
    sd = e.std(0)
    live = sd > 1e-3  # columns that vary on the normals (a never-firing ReLU channel stays constant)
    assert live.sum() >= 8 and np.allclose(e.mean(0), 0, atol=1e-4) and np.allclose(sd[live], 1, atol=1e-3)
    scale = det._embed_scale.numpy()
    assert scale.min() >= 1e-3 * np.median(scale) * 0.999  # no division by ~0 for a constant column

    x = maps(5, 9, shift=0.5)
    e_raw = det.embed_features(x) * det._embed_scale.numpy() + det._embed_shift.numpy()
    with torch.no_grad():
        red = det.encoder.reducer(x[:, 0].float()).mean(dim=(2, 3)).numpy()
        hid = det.embed(det.encoder(x.float())).numpy()
    assert np.allclose(e_raw[:, 8:], red, atol=1e-4) and np.allclose(e_raw[:, :8], hid, atol=1e-4)
    assert det.embed_features(x, hidden_only=True).shape == (5, 8)

    frames = np.zeros((2, 64, 64), np.float32)
    frames[:, 20:40, 10:30] = 1.0
    seq = FrameSequence(frames=frames, modality="MR", body_part="BRAIN", bits_stored=8)
    d = det.detect(seq)
    assert d.score == pytest.approx(float(det.score_features(det.sequence_features(seq)[None])[0]), rel=1e-5)
    assert d.heatmaps.shape == (2, 64, 64) and float(d.heatmaps.max()) == pytest.approx(1.0)

    files = det.save(tmp_path)
    ModelCard(name="skip", version="0.0.1", detector="medgru-svc", scope=Scope(modalities=("MR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=det.get_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.skip == "reduced"
    assert np.allclose(loaded.score_features(x), det.score_features(x))
    assert loaded.detect(seq).score == pytest.approx(d.score, rel=1e-6)


# ------------------------------------------------------------------------ resumable training checkpoints
def _small(epochs: int = 4) -> MedGRUSVC:
    return MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=epochs, batch_size=8,
                     loss="reconstruct", reducer_init="pca", hpo_objective="tax-duin", nu_max=0.2,
                     hpo_trials=3, envelope_samples=200)


def _fit_args(train_seed: int = 1):
    empty = maps(0, 0)
    return maps(40, train_seed), empty, maps(12, 2), empty, maps(12, 3)


def _interrupt_after(epochs_done: int):
    """A progress wrapper that stops the run as Ctrl-C would, once ``epochs_done`` epochs are complete."""
    def progress(it):
        for i, epoch in enumerate(it):
            if i == epochs_done:
                raise KeyboardInterrupt
            yield epoch
    return progress


def _same_encoder(a: MedGRUSVC, b: MedGRUSVC) -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_interrupted_training_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path):
    ref = _small()
    ref_report = ref.fit_features(*_fit_args(), seed=0, checkpoint=tmp_path / "ref.pt")
    ck = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        _small().fit_features(*_fit_args(), seed=0, checkpoint=ck, progress=_interrupt_after(2))
    assert torch.load(ck, weights_only=True)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []

    det = _small()
    report = det.fit_features(*_fit_args(), seed=0, checkpoint=ck)
    assert report["resumed_from_epoch"] == 2
    assert report["loss_history"] == ref_report["loss_history"] and len(report["loss_history"]) == 4
    assert _same_encoder(det, ref)
    assert det.threshold == ref.threshold
    np.testing.assert_array_equal(det.score_features(maps(8, 4)), ref.score_features(maps(8, 4)))


def test_a_checkpoint_of_other_data_or_an_unreadable_one_is_not_resumed(tmp_path, caplog):
    ref = _small(epochs=2)
    ref.fit_features(*_fit_args(), seed=0)  # no checkpoint at all
    ck = tmp_path / "run.pt"
    _small(epochs=2).fit_features(*_fit_args(train_seed=7), seed=0, checkpoint=ck)  # same shapes, other maps
    det = _small(epochs=2)
    with caplog.at_level("WARNING", logger="inference.detectors.medgru_svc"):
        report = det.fit_features(*_fit_args(), seed=0, checkpoint=ck)
    assert "resumed_from_epoch" not in report and "another training run" in caplog.text
    assert _same_encoder(det, ref)

    for junk in (b"", b"not a checkpoint", ck.read_bytes()[:100]):  # empty, foreign, truncated
        ck.write_bytes(junk)
        caplog.clear()
        det = _small(epochs=2)
        with caplog.at_level("WARNING", logger="inference.detectors.medgru_svc"):
            report = det.fit_features(*_fit_args(), seed=0, checkpoint=ck)
        assert "resumed_from_epoch" not in report and "unreadable" in caplog.text
        assert _same_encoder(det, ref)
        assert torch.load(ck, weights_only=True)["epoch"] == 2  # rewritten whole


def test_the_fingerprint_follows_data_seed_and_training_parameters_only():
    args = _fit_args()
    base = _small().training_fingerprint(args[0], args[1], 0)
    assert base == _small().training_fingerprint(args[0].clone(), args[1], 0)
    assert base != _small().training_fingerprint(_fit_args(train_seed=7)[0], args[1], 0)
    assert base != _small().training_fingerprint(args[0], args[1], 1)
    assert base != _small(epochs=5).training_fingerprint(args[0], args[1], 0)
    other = _small()
    other.gamma, other.nu, other.target_fpr = 3.0, 0.3, 0.01  # chosen after the encoder is trained
    assert base == other.training_fingerprint(args[0], args[1], 0)


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    ck = tmp_path / "run.pt"
    MedGRUSVC._save_checkpoint({"epoch": 1, "w": torch.ones(3)}, ck)

    def dies_while_writing(state, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_while_writing)
    with pytest.raises(OSError, match="disk full"):
        MedGRUSVC._save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, ck)
    monkeypatch.undo()
    st = torch.load(ck, weights_only=True)
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_training_flushes_denormals_on_every_worker_thread_and_leaves_the_callers_mode():
    from inference.detectors.medgru_svc import run_denormals_flushed

    tiny = torch.tensor([1e-38], dtype=torch.float32)
    big = torch.full((1 << 20,), 1e-38, dtype=torch.float32)  # large enough to be split over the threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert float(tiny * 1e-2) != 0.0  # a denormal result, kept outside
        (big * 1e-2).sum()  # the caller's worker pool exists before the flush is asked for

        def body(cancel):
            assert not cancel.is_set()
            return float(tiny * 1e-2), int(((big * 1e-2) != 0).sum()), torch.get_num_threads()

        assert run_denormals_flushed(body) == (0.0, 0, 2)  # every element flushed, whichever thread had it
        assert float(tiny * 1e-2) != 0.0  # the caller's mode is as it was
        with pytest.raises(RuntimeError, match="training failed"):
            run_denormals_flushed(lambda cancel: (_ for _ in ()).throw(RuntimeError("training failed")))
        with torch.no_grad():
            assert run_denormals_flushed(lambda cancel: torch.is_grad_enabled()) is False
    finally:
        torch.set_num_threads(threads)

    seen: list[float] = []  # the training loop runs inside it
    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=1, batch_size=8,
                    loss="reconstruct", hpo_trials=0)
    det.encoder = det._new_encoder()
    empty = maps(0, 0)
    det._train_encoder(maps(16, 1), empty, np.random.default_rng(0), report={}, checkpoint=None,
                       progress=lambda it: (seen.append(float(tiny * 1e-2)) or e for e in it))
    assert seen == [0.0]


def test_an_interruption_while_training_cancels_the_training_thread_and_is_raised():
    import signal
    import threading

    from inference.detectors.medgru_svc import run_denormals_flushed

    seen: list[bool] = []

    def body(cancel):
        # Ctrl-C goes to the process, and any of its threads may take it: here the training thread does
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        seen.append(cancel.wait(30))

    # Python's own Ctrl-C handler, whatever this process inherited (a background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_denormals_flushed(body)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [True]


def test_fit_augments_the_training_share_only(monkeypatch):
    from inference.api import FrameSequence

    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=1, loss="reconstruct",
                    hpo_trials=0)
    normals = [FrameSequence(frames=np.full((1, 32, 32), (i + 1) / 100, np.float32)) for i in range(20)]
    calibration = [FrameSequence(frames=np.full((1, 32, 32), 0.9, np.float32)) for _ in range(4)]
    monkeypatch.setattr(det, "sequence_features",
                        lambda s: torch.full((1, 2, 1, 1), round(float(s.frames.mean()), 4), dtype=torch.float64))
    got: dict = {}
    monkeypatch.setattr(det, "fit_features",
                        lambda train, syn, hpo_n, hpo_s, cal, **kw: got.update(train=train, hpo=hpo_n, cal=cal))
    given: list = []

    def augment(train):
        given.append(list(train))
        return [FrameSequence(frames=np.full((1, 32, 32), 0.5, np.float32)) for _ in train]

    det.fit(normals, validation=calibration, seed=0, augment=augment)
    assert len(given) == 1
    n_train = len(given[0])
    assert got["train"].shape[0] == 2 * n_train and n_train + got["hpo"].shape[0] == 20
    train_vals = {round(float(s.frames.mean()), 4) for s in given[0]}
    hpo_vals = set(got["hpo"][:, 0, 0, 0, 0].tolist())
    assert train_vals.isdisjoint(hpo_vals)  # augment saw the training share, not the HPO normals
    assert 0.5 in set(got["train"][:, 0, 0, 0, 0].tolist())  # the copies train the model
    assert 0.5 not in hpo_vals and set(got["cal"][:, 0, 0, 0, 0].tolist()) == {0.9}


# ------------------------------------------------------------------ reducer start and whitened target
def _reducer_rows(det: MedGRUSVC, train: torch.Tensor) -> torch.Tensor:
    """The reducer's first half of rows (before the ReLU) on the training feature vectors."""
    det.encoder = det._new_encoder()
    det._pca_init_reducer(train, mix=det.reducer_init == "pca-mix")
    conv = det.encoder.reducer[0]
    x = train[:, -1].permute(0, 2, 3, 1).reshape(-1, train.shape[2])
    k = conv.out_channels // 2
    with torch.no_grad():
        return x @ conv.weight[:k, :, 0, 0].T + conv.bias[:k]


def test_feature_pca_whitens_the_feature_vectors_of_the_last_frame():
    from inference.detectors.medgru_svc import feature_pca

    train = maps(60, 11)
    mean, comps, sd = feature_pca(train)
    x = train[:, -1].permute(0, 2, 3, 1).reshape(-1, train.shape[2])
    assert torch.allclose(mean, x.mean(0), atol=1e-5)
    assert (sd[:-1] >= sd[1:]).all()  # by decreasing variance
    z = (x - mean) @ (comps / sd[:, None]).T
    cov = torch.cov(z.T.double())
    assert torch.allclose(torch.diagonal(cov), torch.ones(len(sd), dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize("init", ["pca", "pca-mix"])
def test_the_pca_reducer_starts_from_whitened_uncorrelated_directions(init):
    train = maps(60, 12)
    rows = _reducer_rows(MedGRUSVC(hidden_channels=8, reduce_channels=16, reducer_init=init), train)
    cov = torch.cov(rows.T.double())
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=2e-2)
    assert torch.allclose(rows.mean(0).double(), torch.zeros(8, dtype=torch.float64), atol=1e-3)


def test_pca_mix_keeps_the_low_variance_directions_that_pca_drops():
    from inference.detectors.medgru_svc import feature_pca

    train = maps(60, 13)
    _, comps, _ = feature_pca(train)
    trailing = comps[8:]  # the directions the leading 8 components leave out
    share = {}
    for init in ("pca", "pca-mix"):
        det = MedGRUSVC(hidden_channels=8, reduce_channels=16, reducer_init=init)
        _reducer_rows(det, train)
        w = det.encoder.reducer[0].weight[:8, :, 0, 0].detach()
        share[init] = float((w @ trailing.T).norm() / w.norm())
    assert share["pca"] < 1e-3
    assert share["pca-mix"] > 0.5  # most of the reducer's weight lies on the trailing directions


def test_pca_mix_is_deterministic_and_leaves_the_global_random_state_alone():
    train = maps(40, 14)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = _reducer_rows(MedGRUSVC(hidden_channels=8, reduce_channels=16, reducer_init="pca-mix"), train)
    torch.set_rng_state(before)
    b = _reducer_rows(MedGRUSVC(hidden_channels=8, reduce_channels=16, reducer_init="pca-mix"), train)
    assert torch.equal(a, b)


def test_whitened_reconstruction_trains_on_normals_only_and_ranks_shifted_maps_higher():
    torch.manual_seed(0)
    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=6, batch_size=8,
                    loss="reconstruct-whitened", reducer_init="pca-mix", hpo_objective="tax-duin",
                    nu_max=0.2, hpo_trials=4, envelope_samples=300)
    empty = maps(0, 0)
    report = det.fit_features(maps(80, 1), empty, maps(24, 2), empty, maps(24, 3), seed=0)
    hist = report["loss_history"]
    assert len(hist) == 6 and hist[-1] < hist[0]
    # the whitened target has unit variance per direction: an untrained decoder starts near 1 per entry
    assert 0.5 < hist[0] < 3.0
    assert np.median(det.score_features(maps(20, 5, shift=3.0))) > np.median(det.score_features(maps(20, 4)))


def test_unknown_reducer_start_is_rejected():
    with pytest.raises(ValueError, match="reducer_init"):
        MedGRUSVC(reducer_init="ica")


def test_heldout_likelihood_search_is_label_free_and_keeps_its_best_trial():
    from inference.svdd import SVDDBoundary

    det = MedGRUSVC(hpo_objective="heldout-likelihood", hpo_trials=12, nu_max=0.2)
    rng = np.random.default_rng(0)
    e_train, e_hn = rng.normal(size=(150, 8)), rng.normal(size=(40, 8))
    report: dict = {}
    det._tune_boundary(e_train, e_hn, e_hn[:0], seed=0, report=report)  # no anomalies of any kind
    hpo = report["hpo"]
    assert 1e-2 <= det.gamma <= 1e3 and 0.01 <= det.nu <= 0.2
    assert hpo["gamma_range"] == [1e-2, 1e3] and "label-free" in hpo["objective"]
    chosen = SVDDBoundary(gamma=det.gamma, nu=det.nu, whiten=det.whiten).fit(e_train)
    assert hpo["best_mean_heldout_log_likelihood"] == pytest.approx(float(chosen.log_density(e_hn).mean()))
    # the untuned start (gamma 1, nu 0.1) was the first trial: the choice is at least as likely
    start = SVDDBoundary(gamma=1.0, nu=0.1, whiten=det.whiten).fit(e_train)
    assert hpo["best_mean_heldout_log_likelihood"] >= float(start.log_density(e_hn).mean())


def test_deeper_frames_are_enhanced_at_the_depth_the_model_was_trained_at(fitted):
    """The same windowed pixels from a 12-bit image and from an 8-bit one are preprocessed and scored alike:
    MedGRU-SVC's CLAHE runs at its training depth (8 bits), not at OpenCV's 16-bit histogram, which
    enhances the same pixels differently."""
    from inference.preprocess import clahe

    det, _ = fitted
    y, x = np.mgrid[0:64, 0:64] / 63.0  # a ramp with a faint blob: an image with few grey levels in use
    one = np.rint((0.3 + 0.3 * x + 0.1 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.02)) * 255) / 255
    grey = np.stack([one, one[::-1]]).astype(np.float32)
    as8 = FrameSequence(frames=grey, modality="MR", bits_stored=8)
    as12 = FrameSequence(frames=grey, modality="MR", bits_stored=12)
    assert det.clahe_bits == 8
    np.testing.assert_array_equal(det.preprocess(as12), det.preprocess(as8))
    np.testing.assert_array_equal(det.score_batch([as12]), det.score_batch([as8]))
    # what it guards against: CLAHE at 12 bits is another image
    assert np.abs(clahe(grey[0], bits_stored=12) - clahe(grey[0], bits_stored=8)).max() > 0.05


# ------------------------------------------------------------------------ devices
def test_a_model_folder_never_pins_the_device_it_was_trained_on(tmp_path):
    """A folder trained with ``--device cuda`` must load on a machine without a GPU: the stored params say
    ``cpu``, and a card that names another device anyway is loaded on the CPU."""
    from inference.api import ModelCard, Scope, load_model, sha256_file

    det = _small(epochs=2)
    det.fit_features(*_fit_args(), seed=0)
    det.device = "cuda:1"  # as a GPU run would have it (the tensors stay here: no GPU is needed to check)
    files = det.save(tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["params"]["device"] == "cpu"
    params = {**det.portable_params(), "device": "cuda:1"}  # a card written by hand, or by an older writer
    ModelCard(name="gpu-trained", version="0.0.1", detector="medgru-svc", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=params).write(tmp_path)
    det.device = "cpu"
    loaded = load_model(tmp_path)
    assert loaded.device == "cpu"
    x = maps(6, 11)
    assert np.allclose(loaded.score_features(x), det.score_features(x))


def mixed_lengths() -> list[FrameSequence]:
    rng = np.random.default_rng(7)
    return [FrameSequence(frames=rng.random((t, 40 + 8 * i, 48), dtype=np.float32), bits_stored=8)
            for i, t in enumerate((1, 3, 1, 2, 3, 3))]


def test_grouped_scoring_equals_one_at_a_time_and_keeps_the_order(fitted, monkeypatch):
    from inference.detectors import medgru_svc

    det, _ = fitted
    seqs = mixed_lengths()
    # one led by a prior's frame, its highest: read, not judged
    k = int(np.argmax(det.detect(seqs[4], explain=False).frame_scores))
    frames = np.concatenate([seqs[4].frames[k:k + 1], np.delete(seqs[4].frames, k, axis=0)])
    seqs[4] = FrameSequence(frames=frames, bits_stored=8, context_frames=1)
    one_at_a_time = det.score_batch(seqs)  # the CPU path: each score is detect's, bit for bit
    led = det.detect(seqs[4], explain=False)
    assert int(np.argmax(led.frame_scores)) == 0 and led.score == max(led.frame_scores[1:]) < led.frame_scores[0]
    assert one_at_a_time[1] == det.detect(seqs[1], explain=False).score
    grouped = det.score_grouped(seqs)
    np.testing.assert_allclose(grouped, one_at_a_time, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(one_at_a_time, 4))) == len(seqs)  # distinct scores: a shuffled order would show
    np.testing.assert_allclose(det.score_grouped(seqs[::-1]), one_at_a_time[::-1], rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(medgru_svc, "GROUPED_FRAMES_PER_CALL", 4)  # several calls per length: 1 x T=3, 2 x T=2
    np.testing.assert_allclose(det.score_grouped(seqs), one_at_a_time, rtol=1e-4, atol=1e-6)


CTRL_C_DURING_TRAINING = '''
import os, signal, sys, threading, time
import torch
from inference.detectors.medgru_svc import run_denormals_flushed

started = threading.Event()

def fn(cancel):
    x = torch.randn(16, 16, 32, 32, requires_grad=True)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    opt = torch.optim.Adam(conv.parameters())
    while not cancel.is_set():
        loss = conv(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        started.set()

threading.Thread(target=lambda: (started.wait(), time.sleep(0.3), os.kill(os.getpid(), signal.SIGINT)),
                 daemon=True).start()
try:
    run_denormals_flushed(fn)
except KeyboardInterrupt:
    sys.exit(130)  # as medgru train does: at once, the interpreter finalizing
'''


def test_ctrl_c_during_training_exits_130_not_abort(tmp_path):
    """Ctrl-C stops training and ``medgru train`` exits 130 at once. The training thread was then still running
    torch's thread-local destructors, which take the GIL, while the interpreter finalized: the process died of
    SIGABRT ("terminate called without an active exception"; exit status 134 in a shell, 3 runs of 3)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_DURING_TRAINING)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert done.returncode == 130, done.stderr[-2000:]
