"""training.metrics against hand-computed small cases and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training import metrics as M

# 4 normals, 4 anomalies; hand-computed below
S = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.6])
Y = np.array([0, 0, 1, 1, 1, 0, 1, 0])


def test_auroc_hand_computed():
    # anomalies 0.35 0.8 0.7 0.9 ; normals 0.1 0.4 0.2 0.6
    # pairs won: 0.35 beats 0.1,0.2 (2); 0.8 beats all (4); 0.7 all (4); 0.9 all (4) -> 14/16
    assert M.auroc(S, Y) == pytest.approx(14 / 16)


def test_auroc_ties_count_half():
    assert M.auroc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)
    assert M.auroc([0.0, 1.0, 1.0], [0, 0, 1]) == pytest.approx(0.75)


def test_auroc_inverted_and_perfect():
    assert M.auroc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0


def test_auprc_hand_computed():
    # ranking by score desc: 0.9(1) 0.8(1) 0.7(1) 0.6(0) 0.4(0) 0.35(1) 0.2(0) 0.1(0)
    # AP = sum over positives of precision at their rank / 4 = (1 + 1 + 1 + 4/6) / 4
    assert M.auprc(S, Y) == pytest.approx((3 + 4 / 6) / 4)


def test_sens_at_spec_and_fpr_at_sens_hand_computed():
    # specificity >= 0.95 with 4 normals means no false positive: threshold above 0.6 -> 3 of 4 anomalies
    assert M.sens_at_spec(S, Y, 0.95) == pytest.approx(0.75)
    # sensitivity >= 0.95 needs all anomalies: threshold at 0.35 -> normals 0.4 and 0.6 above -> FPR 2/4
    assert M.fpr_at_sens(S, Y, 0.95) == pytest.approx(0.5)


def test_threshold_metrics_hand_computed():
    m = M.threshold_metrics(S, Y, 0.5)  # called abnormal: 0.8 0.7 0.9 0.6
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    # the rule is strictly greater, as in Detection
    assert M.threshold_metrics(S, Y, 0.9)["tp"] == 0


def test_threshold_metrics_empty_denominator_is_nan():
    m = M.threshold_metrics([0.1, 0.2], [0, 1], 5.0)
    assert math.isnan(m["precision"])
    assert m["specificity"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_random_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.7 * y, 1)  # rounding makes many ties
    assert M.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(s, y) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, thr = M.roc_points(s, y)
    sfpr, stpr, sthr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sfpr)
    np.testing.assert_allclose(tpr, stpr)
    np.testing.assert_allclose(thr[1:], sthr[1:])
    t = float(np.median(s))
    m = M.threshold_metrics(s, y, t)
    pred = (s > t).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))


def test_sens_at_spec_matches_roc_curve_definition():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert M.sens_at_spec(s, y, 0.95) == pytest.approx(tpr[fpr <= 0.05].max())
    assert M.fpr_at_sens(s, y, 0.95) == pytest.approx(fpr[tpr >= 0.95].min())


def test_per_class_auroc_each_class_vs_normals():
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.15, 0.25]
    classes = ["normal", "normal", "normal", "glioma", "glioma", "pituitary", "pituitary"]
    pc = M.per_class_auroc(scores, classes)
    assert pc["glioma"] == 1.0
    # pituitary 0.15 beats 0.1 (1 of 3); 0.25 beats 0.1, 0.2 (2 of 3) -> 3/6
    assert pc["pituitary"] == pytest.approx(0.5)
    assert set(pc) == {"glioma", "pituitary"}


def test_normal_label_rule():
    assert M.is_normal_label("normal") and M.is_normal_label("0") and M.is_normal_label(" NORMAL ")
    assert not M.is_normal_label("pneumonia") and not M.is_normal_label("1")
    np.testing.assert_array_equal(M.binary_labels(["normal", "glioma", "0", "1"]), [0, 1, 0, 1])


def test_bootstrap_ci_contains_point_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + y
    lo, hi = M.bootstrap_auroc_ci(s, y, n_boot=300, seed=1)
    a = M.auroc(s, y)
    assert lo < a < hi
    assert 0.02 < hi - lo < 0.2
    lo2, hi2 = M.bootstrap_auroc_ci(s[:60], y[:60], n_boot=300, seed=1)
    assert hi2 - lo2 > hi - lo
    # reproducible
    assert M.bootstrap_auroc_ci(s, y, n_boot=300, seed=1) == (lo, hi)


def test_one_class_only_is_an_error():
    with pytest.raises(ValueError, match="both classes"):
        M.auroc([0.1, 0.2], [0, 0])


def test_summarize_keys_and_fold_aggregation():
    out = M.summarize(S, Y, 0.5, classes=["normal" if v == 0 else "x" for v in Y], n_boot=50)
    for key in ("auroc", "auprc", "sens_at_95_spec", "fpr_at_95_sens", "threshold", "n_normal", "n_anomaly",
                "per_class_auroc", "at_threshold"):
        assert key in out
    assert out["n_normal"] == 4 and out["n_anomaly"] == 4
    agg = M.aggregate_folds([{"auroc": 0.8}, {"auroc": 0.9}, {"auroc": 1.0}], ["auroc"])
    assert agg["auroc"]["mean"] == pytest.approx(0.9)
    assert agg["auroc"]["std"] == pytest.approx(0.1)


def test_at_threshold_with_a_threshold_per_case():
    """A case may carry its own threshold (a multi-frame case: its series threshold); the reported
    threshold stays the single-image one, and a count of thresholds that does not match is refused."""
    from training import metrics as M

    s = np.array([0.9, 0.6, 0.2, 0.7, 0.4])
    y = np.array([1, 1, 1, 0, 0])
    per_case = np.array([0.5, 0.8, 0.5, 0.8, 0.5])  # the 2nd and 4th cases are series: 0.8
    out = M.summarize(s, y, 0.5, classes=["p", "p", "p", "normal", "normal"], n_boot=0, row_thresholds=per_case)
    at = out["at_threshold"]
    assert (at["tp"], at["fn"], at["fp"], at["tn"]) == (1, 2, 0, 2)
    assert at["threshold"] == out["threshold"] == 0.5
    assert out["per_class_flagged_rate"] == {"normal": 0.0, "p": pytest.approx(1 / 3)}
    single = M.summarize(s, y, 0.5, n_boot=0)["at_threshold"]
    assert (single["tp"], single["fp"]) == (2, 1)
    with pytest.raises(ValueError, match="4 thresholds for 5 scores"):
        M.confusion(s, y, per_case[:4])
