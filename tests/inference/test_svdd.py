import numpy as np
import pytest
import torch

from inference.svdd import (DEFAULT_CLUSTER_GAMMAS, ClusterModel, SVDDBoundary, TorchRBFBoundary,
                            choose_cluster_gamma, default_min_cluster_size, support_vector_clustering)


@pytest.fixture(scope="module")
def fitted():
    x = np.random.default_rng(0).normal(size=(300, 6))
    return x, SVDDBoundary(gamma=1.0, nu=0.1).fit(x)


def test_score_is_negative_inside_and_positive_outside(fitted):
    x, b = fitted
    assert b.score(np.zeros((1, 6)))[0] < 0
    assert b.score(np.full((1, 6), 6.0))[0] > 0
    # nu bounds the share of training points outside the boundary
    assert (b.score(x) > 0).mean() == pytest.approx(0.1, abs=0.05)


def test_score_grows_monotonically_away_from_the_data(fitted):
    _, b = fitted
    direction = np.ones(6) / np.sqrt(6)
    ts = np.linspace(0.0, 8.0, 30)
    s = b.score(ts[:, None] * direction[None])
    assert np.all(np.diff(s) > -1e-9)
    # the score is an increasing function of the squared feature-space distance from the centre
    r2 = b.squared_radius(ts[:, None] * direction[None])
    assert np.all(np.diff(r2) > -1e-9)
    # log form: f(x) = rho exp(-score), and R^2(x) is affine in f(x) (decreasing)
    assert np.corrcoef(np.exp(-s), r2)[0, 1] < -0.999


def test_torch_boundary_matches_and_is_differentiable(fitted):
    x, b = fitted
    tb = TorchRBFBoundary(b)
    e = torch.tensor(x[:5], dtype=torch.float32, requires_grad=True)
    s = tb(e)
    np.testing.assert_allclose(s.detach().numpy(), b.score(x[:5]), rtol=1e-4, atol=1e-4)
    s.sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


def test_state_round_trip(fitted):
    x, b = fitted
    b2 = SVDDBoundary.from_state(b.state())
    np.testing.assert_allclose(b2.score(x[:10]), b.score(x[:10]))


def test_clustering_separates_two_blobs_and_names_them():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(80, 5))
    c = rng.normal(size=(60, 5)) + 9.0
    model = support_vector_clustering(np.r_[a, c], gamma=1.0, nu=0.1, k=8)
    labels = model.labels
    assert len(set(labels[:80])) == 1 and len(set(labels[80:])) == 1
    assert labels[0] != labels[-1]
    assert model.names == ["cluster-1", "cluster-2"]  # by decreasing size
    assert model.predict(np.array([[0.0] * 5, [9.0] * 5])) == ["cluster-1", "cluster-2"]
    again = ClusterModel.from_state(model.state())
    assert again.predict(np.array([[9.0] * 5])) == ["cluster-2"]


def test_one_blob_is_one_cluster():
    x = np.random.default_rng(2).normal(size=(100, 4))
    assert support_vector_clustering(x, gamma=0.5, k=10).names == ["cluster-1"]


def test_log_score_does_not_saturate_far_from_the_data(fitted):
    x, b = fitted
    far = np.array([[50.0] * 6, [100.0] * 6, [1e3] * 6])
    s = b.score(far)
    assert np.isfinite(s).all() and np.all(np.diff(s) > 0)  # still ordered where f(x) underflows to 0
    assert b.decision(far)[0] == 0.0  # the ratio form would be exactly 1 for all three
    legacy = SVDDBoundary.from_state({k: v for k, v in b.state().items() if k != "score_form"})
    assert legacy.score_form == "ratio" and np.all(legacy.score(far) == 1.0)
    e = torch.tensor(far, dtype=torch.float32, requires_grad=True)
    ts = TorchRBFBoundary(b)(e)
    assert torch.isfinite(ts).all()
    ts.sum().backward()
    assert torch.isfinite(e.grad).all() and (e.grad.abs().sum(1) > 0).all()


def test_log_score_is_a_monotone_transform_of_the_ratio_score(fitted):
    x, b = fitted
    ratio = SVDDBoundary.from_state({**b.state(), "score_form": np.array([1])})
    assert ratio.score_form == "ratio"
    r, s = ratio.score(x), b.score(x)
    np.testing.assert_allclose(s, -np.log1p(-r), rtol=1e-9, atol=1e-9)
    assert np.array_equal(np.sign(s), np.sign(r))  # same boundary


def test_whitened_kernel_uses_the_mahalanobis_metric_and_round_trips():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(400, 2))
    x = np.c_[z[:, 0], z[:, 0] + 0.05 * z[:, 1]]  # two almost identical (correlated) dimensions
    w = SVDDBoundary(gamma=0.5, nu=0.1, whiten=True).fit(x)
    d = SVDDBoundary(gamma=0.5, nu=0.1).fit(x)
    off = np.array([[0.3, -0.3]])  # off the correlation axis: unusual, though each coordinate is ordinary
    on = np.array([[2.2, 2.2]])  # along the axis, at the edge of the data
    assert w.score(off)[0] > w.score(on)[0]
    assert d.score(off)[0] < d.score(on)[0]  # per-dimension standardisation misses it
    again = SVDDBoundary.from_state(w.state())
    assert again.whiten and np.allclose(again.score(x[:20]), w.score(x[:20]))
    t = TorchRBFBoundary(w)(torch.tensor(x[:20], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(t, w.score(x[:20]), rtol=1e-3, atol=1e-3)



def test_kernel_space_is_where_the_kernel_is_isotropic():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(2000, 3))
    x = z @ np.array([[2.0, 0.0, 0.0], [1.5, 0.8, 0.0], [0.0, 0.0, 1.0]]) + 5.0  # correlated, unequal scales
    with pytest.raises(RuntimeError):
        SVDDBoundary().kernel_space(x)
    w = SVDDBoundary(gamma=0.5, nu=0.1, whiten=True).fit(x)
    np.testing.assert_allclose(np.cov(w.kernel_space(x), rowvar=False), np.eye(3), atol=0.05)
    d = SVDDBoundary(gamma=0.5, nu=0.1).fit(x)
    np.testing.assert_allclose(d.kernel_space(x), (x - x.mean(0)) / (x.std(0) + 1e-6))
    assert np.abs(np.cov(x, rowvar=False) - np.eye(3)).max() > 1.0  # (the raw embeddings are not)

# ------------------------------------------------------------------ label-free choice of the SVC kernel width
def three_blobs(seed: int, sep: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """3 x 60 points in 16-d: unit Gaussians around centres at distance ``sep`` from the origin in random
    directions (pairwise about ``sep * sqrt(2)`` apart, nearest neighbours about 4 apart)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(3, 16))
    c = sep * c / np.linalg.norm(c, axis=1, keepdims=True)
    return np.concatenate([rng.normal(size=(60, 16)) + ci for ci in c]), np.repeat(np.arange(3), 60)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_gamma_recovers_three_separated_blobs(seed):
    from sklearn.metrics import adjusted_rand_score

    x, y = three_blobs(seed)
    gamma, trace = choose_cluster_gamma(x)
    assert gamma in DEFAULT_CLUSTER_GAMMAS and trace["gamma"] == gamma
    assert trace["clusters"] == 3 and trace["lifetime"] >= 2
    assert len(trace["per_gamma"]) == len(DEFAULT_CLUSTER_GAMMAS) == len(trace["counts"])
    model = support_vector_clustering(x, gamma=gamma)
    assert model.names == ["cluster-1", "cluster-2", "cluster-3"]
    assert adjusted_rand_score(y, model.labels) >= 0.9
    assert model.gamma == gamma


def test_auto_gamma_does_not_invent_clusters_in_one_blob():
    x = np.random.default_rng(4).normal(size=(180, 16))
    gamma, trace = choose_cluster_gamma(x)
    model = support_vector_clustering(x, gamma=gamma)
    assert len(model.names) <= 2 and trace["clusters"] <= 2
    assert trace["clusters"] == 1 and "one cluster" in trace["reason"]


def test_auto_gamma_is_reproducible_and_json_serialisable():
    import json

    x, _ = three_blobs(5, sep=9.0)
    g1, t1 = choose_cluster_gamma(x)
    g2, t2 = choose_cluster_gamma(x.copy())
    assert g1 == g2 and t1 == t2
    assert json.loads(json.dumps(t1)) == t1
    a, b = support_vector_clustering(x, gamma=g1), support_vector_clustering(x, gamma=g2)
    assert np.array_equal(a.labels, b.labels)


def test_a_shattered_sphere_counts_as_no_cluster_not_one():
    x, _ = three_blobs(0)
    # at these widths the pre-image of the sphere is a speck around each point: no component of >= 5
    gamma, trace = choose_cluster_gamma(x, gammas=[500.0, 1000.0])
    assert trace["counts"] == [0, 0] and all(p["fragmented"] for p in trace["per_gamma"])
    assert gamma == 500.0 and trace["clusters"] == 1 and "no gamma gave one either" in trace["reason"]


def test_many_bounded_support_vectors_do_not_read_as_a_shattered_sphere():
    # nu = 0.5: about half the points are outliers by design; coverage counts the points inside the sphere
    x, y = three_blobs(0)
    gamma, trace = choose_cluster_gamma(x, nu=0.5)
    assert trace["per_gamma"][0]["outside_fraction"] > 0.4
    assert trace["per_gamma"][0]["coverage"] > 0.9 and not trace["per_gamma"][0]["fragmented"]
    assert trace["clusters"] == 3 and len(support_vector_clustering(x, gamma=gamma, nu=0.5).names) == 3


def test_unbounded_support_vectors_count_as_inside_the_sphere():
    # at a large width every point is an unbounded SV (alpha = nu < 1) and lies on the sphere: the old test
    # f(x) >= rho put about half of them outside through the solver's tolerance and shattered the graph
    x, _ = three_blobs(0)
    _, trace = choose_cluster_gamma(x, gammas=[8.0, 16.0])
    assert [p["outside_fraction"] for p in trace["per_gamma"]] == [0.0, 0.0]


def test_min_cluster_size_scales_with_the_pool():
    assert default_min_cluster_size(50) == 5 and default_min_cluster_size(250) == 5
    assert default_min_cluster_size(1000) == 20 and default_min_cluster_size(1216) == 25
    x, _ = three_blobs(0)
    _, trace = choose_cluster_gamma(x)
    assert trace["min_cluster_size"] == default_min_cluster_size(180)
    _, small = choose_cluster_gamma(x[:8])  # too few points for two clusters of >= 5
    assert small["clusters"] == 1 and small["per_gamma"] == []


def test_auto_clustering_state_round_trips():
    x, _ = three_blobs(1)
    gamma, _ = choose_cluster_gamma(x)
    model = support_vector_clustering(x, gamma=gamma)
    st = {k: np.asarray(v) for k, v in model.state().items()}
    assert st["gamma"].dtype == np.float64 and st["gamma"].shape == (1,)
    again = ClusterModel.from_state(st)
    assert isinstance(again.gamma, float) and again.gamma == gamma
    assert np.array_equal(again.labels, model.labels) and again.names == model.names
    probe = x[::7] + 0.1
    assert again.predict(probe) == model.predict(probe)


def test_whitener_is_float32_on_disk_for_new_fits_and_kept_float64_for_older_models():
    from inference.svdd import SVDDBoundary

    x = np.random.default_rng(0).normal(size=(60, 5))
    b = SVDDBoundary(gamma=1.0, nu=0.1, whiten=True).fit(x)
    st = b.state()
    assert st["whitener"].dtype == np.float32
    loaded = SVDDBoundary.from_state(st)
    assert np.array_equal(loaded.score(x), b.score(x))  # nothing lost: the fit was rounded the same way
    b.whitener_ = b.whitener_ + 1e-12  # a float64 whitener as saved by older versions
    assert b.state()["whitener"].dtype == np.float64


def test_small_batches_are_scored_with_one_blas_thread_and_large_ones_with_the_default():
    from threadpoolctl import threadpool_info

    from inference.svdd import SMALL_BATCH_ROWS, _blas_for

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    default = blas_threads()
    assert default, "numpy links a BLAS"
    with _blas_for(8):
        assert set(blas_threads()) == {1}
    with _blas_for(SMALL_BATCH_ROWS + 1):
        assert blas_threads() == default
    assert blas_threads() == default  # restored


def test_cluster_names_come_from_the_nearest_clustered_point():
    pts = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    cm = ClusterModel(points=pts, labels=np.array([0, 1, 1]), mean=np.zeros(2), scale=np.ones(2), gamma=1.0)
    assert cm.predict(np.array([[1.0, 1.0], [9.0, 1.0], [1.0, 8.0]])) == ["cluster-1", "cluster-2", "cluster-2"]


@pytest.mark.parametrize("n_per_blob", [40, 8])  # a searchable pool, and one too small to search
def test_auto_clustering_reuses_the_choice_and_equals_clustering_at_the_chosen_width(n_per_blob):
    from inference.svdd import auto_support_vector_clustering, choose_cluster_gamma, support_vector_clustering

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(c, 0.3, size=(n_per_blob, 4)) for c in (-4.0, 0.0, 4.0)])
    model, gamma, trace = auto_support_vector_clustering(x, nu=0.1, k=6)
    g2, t2 = choose_cluster_gamma(x, nu=0.1, k=6)
    assert gamma == g2 and trace == t2
    ref = support_vector_clustering(x, gamma=gamma, nu=0.1, k=6)
    assert np.array_equal(model.labels, ref.labels) and np.array_equal(model.points, ref.points)
    assert model.gamma == ref.gamma and np.array_equal(model.mean, ref.mean)
    if n_per_blob == 40:
        assert len(model.names) == 3  # three separated blobs


@pytest.mark.parametrize("gamma", [0.3, 3.0])
def test_log_density_is_a_probability_density_that_ranks_as_the_score_does(gamma):
    x = np.random.default_rng(3).normal(size=(60, 2))
    b = SVDDBoundary(gamma=gamma, nu=0.2).fit(x)
    # integrate over the standardised plane (the density lives there): a unit mass
    g = np.linspace(-12, 12, 401)
    xx, yy = np.meshgrid(g, g)
    grid_std = np.c_[xx.ravel(), yy.ravel()]
    grid = grid_std * b.scale_ + b.mean_
    mass = np.exp(b.log_density(grid)).sum() * (g[1] - g[0]) ** 2
    assert mass == pytest.approx(1.0, abs=1e-3)
    q = np.random.default_rng(4).normal(size=(30, 2)) * 2
    assert np.allclose(b.log_density(q) + b.score(q), (b.log_density(q) + b.score(q))[0])


@pytest.mark.parametrize("whiten", [False, True])
def test_log_density_in_embedding_space_integrates_to_one_over_the_embeddings(whiten):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 2)) @ np.array([[3.0, 0.0], [1.5, 0.5]]) + [10.0, -4.0]
    b = SVDDBoundary(gamma=2.0, nu=0.2, whiten=whiten).fit(x)
    lo, hi = x.min(0) - 15, x.max(0) + 15
    gx, gy = np.linspace(lo[0], hi[0], 401), np.linspace(lo[1], hi[1], 401)
    xx, yy = np.meshgrid(gx, gy)
    dens = np.exp(b.log_density(np.c_[xx.ravel(), yy.ravel()], embedding_space=True))
    mass = dens.sum() * (gx[1] - gx[0]) * (gy[1] - gy[0])
    assert mass == pytest.approx(1.0, abs=2e-3)
