"""Spectra from factors against numpy on the dense update, and effective rank on known spectra."""

import math

import numpy as np
import pytest
import scipy.linalg

from aroma_jax.analysis import spectra

SHAPES = [(12, 9, 3), (7, 20, 5), (5, 6, 8), (30, 4, 1), (10, 10, 10)]  # (in, out, k); k > in too


def factors(fan_in, fan_out, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(fan_in, k)), rng.normal(size=(k, fan_out))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 2.5, -0.5])
def test_update_svd_matches_dense(shape, scale):
    a, b = factors(*shape)
    dense = scale * a @ b
    svd = spectra.update_svd(a, b, scale)
    want = np.linalg.svd(dense, compute_uv=False)[: min(shape)]
    np.testing.assert_allclose(svd.s, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(svd.u @ np.diag(svd.s) @ svd.vt, dense, atol=1e-10)
    np.testing.assert_allclose(svd.u.T @ svd.u, np.eye(len(svd.s)), atol=1e-10)
    np.testing.assert_allclose(svd.vt @ svd.vt.T, np.eye(len(svd.s)), atol=1e-10)


def test_zero_rank_and_bad_factors():
    svd = spectra.update_svd(np.zeros((6, 0)), np.zeros((0, 4)), 2.0)
    assert svd.s.shape == (0,) and svd.u.shape == (6, 0) and svd.vt.shape == (0, 4)
    assert spectra.effective_rank(svd.s) == 0.0 and spectra.stable_rank(svd.s) == 0.0
    with pytest.raises(ValueError, match=r"A \(in, k\) and B \(k, out\)"):
        spectra.update_svd(np.zeros((6, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        spectra.effective_rank(np.array([1.0, -1.0]))


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_effective_rank_of_equal_singular_values_is_their_count(k):
    sigma = np.concatenate([np.full(k, 3.7), np.zeros(4)])
    assert spectra.effective_rank(sigma) == pytest.approx(k, rel=1e-12)


def test_effective_rank_known_values():
    assert spectra.effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert spectra.effective_rank(np.zeros(3)) == 0.0
    # p = (3/4, 1/4): exp(H) with H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert spectra.effective_rank(np.array([1.0, 3.0])) == pytest.approx(math.exp(h), rel=1e-12)
    # scale invariant, order invariant, between 1 and the count of nonzeros
    rng = np.random.default_rng(1)
    s = rng.uniform(0.1, 2.0, size=9)
    e = spectra.effective_rank(s)
    assert 1.0 < e < 9.0
    assert spectra.effective_rank(7.0 * s[::-1]) == pytest.approx(e, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_derived_quantities_match_dense(shape):
    a, b = factors(*shape, seed=3)
    dense = 1.7 * a @ b
    sigma = spectra.singular_values(a, b, 1.7)
    fro2 = np.linalg.norm(dense, "fro") ** 2
    spec = np.linalg.norm(dense, 2)
    assert spectra.stable_rank(sigma) == pytest.approx(fro2 / spec**2, rel=1e-9)
    full = np.linalg.svd(dense, compute_uv=False)
    p = full / full.sum()
    p = p[p > 0]
    assert spectra.effective_rank(sigma) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)
    for k in range(len(sigma) + 1):
        assert spectra.energy_share(sigma, k) == pytest.approx(np.sum(full[:k] ** 2) / fro2)
    np.testing.assert_allclose(
        spectra.cumulative_energy(sigma), np.cumsum(full[: len(sigma)] ** 2) / fro2, rtol=1e-9
    )
    rank = shape[2]
    ratio = spectra.effective_rank_ratio(sigma, rank)
    assert ratio == pytest.approx(spectra.effective_rank(sigma) / rank)
    assert spectra.numerical_rank(sigma, dense.shape) == np.linalg.matrix_rank(dense)
    stats = spectra.spectrum_stats(sigma, rank, dense.shape)
    assert stats["frobenius"] == pytest.approx(math.sqrt(fro2))
    assert stats["spectral"] == pytest.approx(spec)
    assert stats["energy_top1"] == pytest.approx(full[0] ** 2 / fro2)


def test_planted_rank_toy():
    """Eight rank-one components that span a rank-3 update with singular values (2, 2, 2):
    effective rank 3, numerical rank 3, nominal rank 8, ratio 3/8."""
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.normal(size=(40, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(25, 3)))
    mix = rng.normal(size=(3, 8))
    a = u @ mix  # (40, 8): every column in span(u)
    b = np.linalg.pinv(mix) @ (2.0 * v.T)  # (8, 25), so a @ b = 2 u v^T
    np.testing.assert_allclose(a @ b, 2.0 * u @ v.T, atol=1e-10)
    sigma = spectra.singular_values(a, b)
    stats = spectra.spectrum_stats(sigma, 8, (40, 25))
    assert stats["effective_rank"] == pytest.approx(3.0, abs=1e-8)
    assert stats["numerical_rank"] == 3
    assert stats["effective_rank_ratio"] == pytest.approx(3 / 8, abs=1e-9)
    assert stats["stable_rank"] == pytest.approx(3.0, abs=1e-8)
    # a decaying planted spectrum: erank follows the Roy-Vetterli formula, not the count
    s = np.array([4.0, 2.0, 1.0])
    p = s / s.sum()
    a2, b2 = u * s, v.T
    got = spectra.effective_rank(spectra.singular_values(a2, b2))
    assert got == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)


def test_subspace_similarity_and_angles_match_dense():
    rng = np.random.default_rng(2)
    a1, b1 = rng.normal(size=(15, 4)), rng.normal(size=(4, 11))
    a2, b2 = rng.normal(size=(15, 3)), rng.normal(size=(3, 11))
    a2[:, 0] = a1[:, 0] + 0.1 * a2[:, 0]  # partial overlap
    u1 = np.linalg.svd(a1 @ b1)[0][:, :4]
    u2 = np.linalg.svd(a2 @ b2)[0][:, :3]
    f1, f2 = spectra.update_svd(a1, b1).u, spectra.update_svd(a2, b2).u
    grid = spectra.subspace_similarity_grid(f1, f2)
    assert grid.shape == (4, 3)
    for i in range(1, 5):
        for j in range(1, 4):
            want = np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(want, abs=1e-9)
            assert spectra.subspace_similarity(f1, f2, i, j) == pytest.approx(want, abs=1e-9)
    angles = spectra.principal_angles(f1, f2)
    np.testing.assert_allclose(
        np.sort(angles), np.sort(scipy.linalg.subspace_angles(u1, u2)), atol=1e-7
    )
    assert spectra.subspace_similarity(f1, f1, 4, 4) == pytest.approx(1.0)
    e = np.eye(6)
    assert spectra.subspace_similarity(e[:, :2], e[:, 2:5], 2, 3) == 0.0
    with pytest.raises(ValueError, match="1 <= i <= 4"):
        spectra.subspace_similarity(f1, f2, 5, 1)


def test_component_cosines_match_flattened_rank_one_matrices():
    rng = np.random.default_rng(4)
    a1, b1 = rng.normal(size=(9, 4)), rng.normal(size=(4, 6))
    a2, b2 = rng.normal(size=(9, 3)), rng.normal(size=(3, 6))
    a2[:, 1], b2[1] = -2.0 * a1[:, 2], 0.5 * b1[2]  # the same direction, opposite sign
    got = spectra.component_cosines(a1, b1, a2, b2)
    for i in range(4):
        for j in range(3):
            x = np.outer(a1[:, i], b1[i]).ravel()
            y = np.outer(a2[:, j], b2[j]).ravel()
            assert got[i, j] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    assert got[2, 1] == pytest.approx(-1.0)
    self_cos = spectra.component_cosines(a1, b1, a1, b1)
    np.testing.assert_allclose(np.diag(self_cos), 1.0)
    b1[0] = 0.0  # a zero component has no direction
    assert np.isnan(spectra.component_cosines(a1, b1, a2, b2)[0]).all()
    with pytest.raises(ValueError, match="components of different shapes"):
        spectra.component_cosines(a1, b1, a2[:5], b2)
