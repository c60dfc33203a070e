"""Linear probe: ridge regression against a closed-form hand computation, penalty selection on
validation spots, and the fitted probe as a registered model."""
from __future__ import annotations

import numpy as np
import pytest

from histomap.compat import torch
from histomap.models.probe import LinearProbe, ridge_fit, ridge_predict, select_ridge


def _tiny(seed=0, n=7, f=3, g=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * [1.0, 5.0, 0.2] + [0.0, 3.0, -1.0]
    w = rng.normal(size=(f, g))
    y = x @ w + rng.normal(scale=0.3, size=(n, g)) + [2.0, -1.0]
    return x, y


def test_ridge_matches_the_closed_form_by_hand():
    x, y = _tiny()
    lam = 0.7
    weight, intercept, mean, std = ridge_fit(x, y, lam)
    # by hand: standardise with the training mean and (population) std, centre the targets,
    # solve the normal equations with lam on the diagonal; the intercept is the target mean
    z = (x - x.mean(0)) / x.std(0)
    yc = y - y.mean(0)
    expected = np.linalg.solve(z.T @ z + lam * np.eye(3), z.T @ yc)
    np.testing.assert_allclose(weight, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(intercept, y.mean(0))
    np.testing.assert_allclose(ridge_predict(x, weight, intercept, mean, std),
                               z @ expected + y.mean(0), rtol=1e-10)
    # lam -> 0 is least squares; a huge lam predicts the mean
    ls = np.linalg.lstsq(np.c_[z, np.ones(len(z))], y, rcond=None)[0]
    np.testing.assert_allclose(ridge_fit(x, y, 0.0)[0], ls[:3], rtol=1e-8, atol=1e-10)
    flat = ridge_predict(x, *ridge_fit(x, y, 1e12))
    np.testing.assert_allclose(flat, np.broadcast_to(y.mean(0), y.shape), atol=1e-6)


def test_penalty_is_the_one_with_lowest_validation_mse():
    x, y = _tiny(1, n=20)
    xv, yv = _tiny(2, n=6)
    alphas = [0.001, 0.1, 10.0]
    alpha, rows = select_ridge(x, y, xv, yv, alphas)
    by_hand = []
    for a in alphas:
        z = (x - x.mean(0)) / x.std(0)
        w = np.linalg.solve(z.T @ z + a * len(x) * np.eye(3), z.T @ (y - y.mean(0)))
        pred = (xv - x.mean(0)) / x.std(0) @ w + y.mean(0)
        by_hand.append(np.mean((pred - yv) ** 2))
    np.testing.assert_allclose([r["val_mse"] for r in rows], by_hand, rtol=1e-10)
    assert alpha == alphas[int(np.argmin(by_hand))]
    with pytest.raises(ValueError, match="no validation spot"):
        select_ridge(x, y, xv[:0], yv[:0], alphas)


def test_fitted_probe_module_predicts_like_the_ridge():
    probe = LinearProbe(2, encoder="resnet10t")
    features = np.random.default_rng(4).normal(size=(5, probe.num_features))
    wide = np.random.default_rng(5).normal(size=(40, probe.num_features))
    fitted = ridge_fit(wide, np.random.default_rng(6).normal(size=(40, 2)), 3.0)
    probe.set_ridge(*fitted)
    got = probe.predict_features(torch.as_tensor(features, dtype=torch.float32)).detach()
    np.testing.assert_allclose(got.numpy(), ridge_predict(features, *fitted), rtol=1e-4,
                               atol=1e-4)
    assert not any(p.requires_grad for p in probe.parameters())
    out = probe(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 2)
