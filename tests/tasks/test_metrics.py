"""Metrics against scipy.stats (oracle) and hand computations."""

import math

import numpy as np
import pytest
import torch
from scipy import stats  # oracle (the "test" extra installs scipy)

from esm2lite.tasks import TASKS, LabelSpace
from esm2lite.tasks.metrics import METRIC_DIRECTION, metric_direction, rankdata


def compute_metrics(task: str, outputs, targets, labels=None) -> dict:
    """The task's metrics of head outputs against encoded targets."""
    return TASKS[task].metrics_of(labels, outputs, targets)


def test_rankdata_against_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=40).astype(float)  # many ties
    assert np.array_equal(rankdata(x), stats.rankdata(x, method="average"))


@pytest.mark.parametrize("ties", [False, True])
def test_regression_against_scipy(ties):
    rng = np.random.default_rng(1)
    y = rng.normal(size=50)
    p = y + rng.normal(size=50)
    if ties:
        y, p = np.round(y), np.round(p * 2) / 2
    m = compute_metrics("regression", torch.tensor(p)[:, None], torch.tensor(y)[:, None], None)
    assert math.isclose(m["pearson"], stats.pearsonr(p, y)[0], rel_tol=1e-9)
    assert math.isclose(m["spearman"], stats.spearmanr(p, y)[0], rel_tol=1e-9)
    mse = sum((a - b) ** 2 for a, b in zip(p, y)) / len(y)
    assert math.isclose(m["mse"], mse) and math.isclose(m["rmse"], math.sqrt(mse))
    mean = sum(y) / len(y)
    r2 = 1 - sum((a - b) ** 2 for a, b in zip(p, y)) / sum((b - mean) ** 2 for b in y)
    assert math.isclose(m["r2"], r2)


def test_regression_undoes_standardisation_and_reports_per_target():
    ls = LabelSpace("regression", ["stability", "expression"], [], mean=[10.0, -1.0], std=[2.0, 0.5])
    rng = np.random.default_rng(2)
    y = rng.normal(size=(30, 2))
    p = y + 0.3 * rng.normal(size=(30, 2))
    m = compute_metrics("regression", torch.tensor(p, dtype=torch.float32),
                        torch.tensor(y, dtype=torch.float32), ls)
    # the oracle gets the same fp32 values, widened: compute_metrics works in float64, so only float64
    # rounding is left (rel_tol 1e-9, as above), not the fp32 rounding of the inputs
    y, p = (np.float32(a).astype(np.float64) for a in (y, p))
    y_orig, p_orig = y * [2.0, 0.5] + [10.0, -1.0], p * [2.0, 0.5] + [10.0, -1.0]
    for j, name in enumerate(["stability", "expression"]):
        mse = float(np.mean((p_orig[:, j] - y_orig[:, j]) ** 2))
        assert math.isclose(m[f"mse_{name}"], mse, rel_tol=1e-9)
        assert math.isclose(m[f"spearman_{name}"], stats.spearmanr(p[:, j], y[:, j])[0], rel_tol=1e-9)
        assert math.isclose(m[f"pearson_{name}"], stats.pearsonr(p_orig[:, j], y_orig[:, j])[0],
                            rel_tol=1e-9)
    assert math.isclose(m["spearman"], (m["spearman_stability"] + m["spearman_expression"]) / 2)
    assert math.isclose(m["mse"], (m["mse_stability"] + m["mse_expression"]) / 2)


def test_single_target_has_no_suffixed_keys():
    m = compute_metrics("regression", torch.randn(5, 1), torch.randn(5, 1),
                        LabelSpace("regression", ["target"], []))
    assert set(m) == {"mse", "rmse", "pearson", "spearman", "r2"}


def test_degenerate_regression_does_not_crash():
    m = compute_metrics("regression", torch.ones(6, 1), torch.arange(6.0)[:, None])
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0
    assert math.isclose(m["r2"], 1 - sum((1 - t) ** 2 for t in range(6)) / 17.5)
    m = compute_metrics("regression", torch.ones(1, 1), torch.zeros(1, 1))
    assert m["pearson"] == 0.0 and m["r2"] == 0.0 and m["mse"] == 1.0
    m = compute_metrics("regression", torch.full((3, 1), 2.0), torch.full((3, 1), 2.0))
    assert m["r2"] == 1.0 and m["mse"] == 0.0


def test_classification_accuracy_and_macro_f1_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 3
    m = compute_metrics("classification", logits, target, None)
    assert math.isclose(m["accuracy"], 4 / 6)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert math.isclose(m["macro_f1"], (4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert compute_metrics("classification", pred, target, None) == m  # indices work too


def test_token_accuracy_over_labelled_residues_only():
    target = torch.tensor([[-100, 0, 1, -100, 2, -100],
                           [-100, 1, 1, -100, -100, -100]])
    pred = torch.tensor([[1, 0, 0, 2, 2, 0],
                         [2, 1, 1, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    m = compute_metrics("token-classification", logits, target, None)
    assert math.isclose(m["accuracy"], 4 / 5)  # labelled: (0,0) (1,0) (2,2) (1,1) (1,1)
    # per-batch lists with different lengths give the same numbers
    m2 = compute_metrics("token-classification", [logits[:1], logits[1:, :4]],
                         [target[:1], target[1:, :4]], None)
    assert m2 == m
    none = compute_metrics("token-classification", logits, torch.full_like(target, -100), None)
    assert math.isnan(none["accuracy"])


def test_metric_direction():
    assert METRIC_DIRECTION["spearman"] == "max" and METRIC_DIRECTION["loss"] == "min"
    assert metric_direction("spearman_stability") == "max"
    assert metric_direction("macro_f1") == "max"
    assert metric_direction("rmse_expression") == "min"
