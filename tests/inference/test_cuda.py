"""The detectors on a CUDA GPU give the CPU's findings: bundled models, the k-NN baseline, a model trained
on the GPU and loaded on the CPU, and the worker's model registry, which uses the GPU by default.

CI has no GPU, so these are deselected by default (``addopts`` in pyproject.toml) and run on a machine with
one: ``python -m pytest -m cuda tests/inference/test_cuda.py`` (``benchmarks/device/gpu_figures.sh`` does
so). Asked for where torch sees no GPU, they fail: a GPU check that skips would pass on every machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.api import FrameSequence, ModelCard, Scope, discover_model_dirs, load_model, sha256_file
from medgru.settings import BUNDLED_MODELS_DIR
from tests.inference.test_detector_contract import texture

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def gpu():
    assert torch.cuda.is_available(), f"-m cuda asked for, but torch {torch.__version__} sees no CUDA GPU"


def textures(t: int = 8, size: int = 224, seed: int = 0) -> FrameSequence:
    return FrameSequence(frames=texture(seed, t, size), modality="MR", body_part="BRAIN", bits_stored=8)


def same_finding(cpu, gpu, rel: float = 1e-3) -> None:
    assert gpu.score == pytest.approx(cpu.score, rel=rel, abs=1e-6)
    if abs(cpu.score - cpu.threshold) > rel * max(abs(cpu.threshold), 1e-6):
        assert gpu.is_anomaly == cpu.is_anomaly
    assert gpu.heatmaps.shape == cpu.heatmaps.shape
    if cpu.heatmaps.std() > 0:
        assert np.corrcoef(cpu.heatmaps.ravel(), gpu.heatmaps.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("model_dir", discover_model_dirs([BUNDLED_MODELS_DIR]), ids=lambda p: p.name)
def test_a_bundled_model_scores_and_explains_on_the_gpu_as_on_the_cpu_and_comes_back(model_dir):
    det = load_model(model_dir)
    seqs = [textures(seed=s) for s in range(3)]
    cpu = [det.detect(s, explain=True) for s in seqs]
    det.to("cuda")
    gpu = [det.detect(s, explain=True) for s in seqs]
    assert np.allclose(det.score_batch(seqs), [g.score for g in gpu], rtol=1e-4)
    for c, g in zip(cpu, gpu):
        same_finding(c, g)
    det.to("cpu")
    assert det.detect(seqs[0], explain=False).score == pytest.approx(cpu[0].score, rel=1e-6)


@pytest.mark.parametrize("model_dir", discover_model_dirs([BUNDLED_MODELS_DIR]), ids=lambda p: p.name)
def test_grouped_gpu_scoring_of_mixed_lengths_gives_the_cpus_scores_in_order(model_dir):
    det = load_model(model_dir)
    seqs = [textures(t=t, seed=s) for s, t in enumerate((1, 8, 1, 3, 8, 1))]
    cpu = det.score_batch(seqs)  # one at a time
    det.to("cuda")
    gpu = det.score_batch(seqs)  # grouped by length on a GPU
    assert gpu == pytest.approx(cpu, rel=1e-3, abs=1e-6)
    assert gpu[::-1] == pytest.approx(det.score_batch(seqs[::-1]), rel=1e-5, abs=1e-7)
    det.to("cpu")

def test_the_knn_baseline_on_the_gpu_gives_the_cpus_findings(tmp_path):
    from inference.api import get_detector_class

    det = get_detector_class("knn-effnet")(name="knn-cuda")
    normals = [textures(1, seed=100 + i) for i in range(40)]
    det.fit(normals[:30], validation=normals[30:], seed=0)
    seqs = [textures(2, seed=s) for s in range(3)]
    cpu = [det.detect(s, explain=True) for s in seqs]
    det.to("cuda")
    for s, c in zip(seqs, cpu):
        same_finding(c, det.detect(s, explain=True))


def test_a_medgru_model_trained_on_the_gpu_loads_and_scores_the_same_on_the_cpu(tmp_path):
    from inference.detectors.medgru_svc import MedGRUSVC
    from tests.inference.test_medgru_svc import maps

    det = MedGRUSVC(input_size=64, hidden_channels=8, reduce_channels=16, epochs=3, batch_size=8,
                    loss="reconstruct", reducer_init="pca", hpo_objective="tax-duin", nu_max=0.2,
                    hpo_trials=3, envelope_samples=200, device="cuda")
    empty = maps(0, 0)
    det.fit_features(maps(40, 1), empty, maps(12, 2), empty, maps(12, 3), seed=0)
    assert next(det.encoder.parameters()).is_cuda
    files = det.save(tmp_path)
    ModelCard(name="trained-on-gpu", version="0.0.1", detector="medgru-svc", scope=Scope(modalities=("CR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=det.portable_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.device == "cpu" and not next(loaded.encoder.parameters()).is_cuda
    x = maps(8, 21)
    on_cpu, on_gpu = loaded.score_features(x), det.score_features(x)
    # cuDNN convolves in TF32 by default: scores agree to about 1e-4 of their spread (seen on an H200), not
    # to float32's last digits; the order of the cases is the same
    assert np.abs(on_cpu - on_gpu).max() <= 1e-3 * np.ptp(on_gpu)
    assert (np.argsort(on_cpu) == np.argsort(on_gpu)).all()


def test_the_workers_registry_puts_the_bundled_models_on_the_gpu_by_default():
    from worker.models import ModelRegistry

    registry = ModelRegistry([BUNDLED_MODELS_DIR])  # device "auto", as the settings' default
    for model_dir, _card in registry.cards:
        det = registry.get(model_dir)
        assert det.device == "cuda" and next(det.encoder.parameters()).is_cuda
        finding = det.detect(textures(seed=7), explain=True)
        assert finding.heatmaps.shape == (8, 224, 224) and np.isfinite(finding.score)
