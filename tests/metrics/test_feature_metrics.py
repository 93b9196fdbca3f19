"""Precision/recall, KID and Inception Score on synthetic inputs with known answers."""

import numpy as np
import pytest

from lidiff.metrics import feature_metrics as fm


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    return rng.standard_normal((400, 8)).astype(np.float32)


def test_same_set_has_full_precision_and_recall(points):
    p, r = fm.precision_recall(points, points.copy())
    assert p == pytest.approx(1.0) and r == pytest.approx(1.0)


def test_disjoint_sets_have_zero_precision_and_recall(points):
    p, r = fm.precision_recall(points, points + 100.0)
    assert p == 0.0 and r == 0.0


def test_a_subset_keeps_precision_but_loses_recall(points):
    # generated samples cover only part of a 2-D real distribution (x0 > 0.5, about 31% of it)
    real = np.random.default_rng(1).standard_normal((400, 2)).astype(np.float32)
    fake = real[real[:, 0] > 0.5]
    p, r = fm.precision_recall(real, fake)
    assert p == pytest.approx(1.0)
    assert r < 0.6


def test_knn_radius_excludes_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [6.0]], np.float32)
    np.testing.assert_allclose(fm.knn_radii(x, k=1), [1.0, 1.0, 4.0, 9.0])
    with pytest.raises(ValueError, match="needs more than 3 points"):
        fm.knn_radii(x[:3], k=3)


def test_inception_score_of_uniform_logits_is_one():
    mean, std = fm.inception_score(np.zeros((50, 1008)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_classes_is_the_class_count():
    logits = np.full((100, 10), -1e4)
    logits[np.arange(100), np.arange(100) % 10] = 0.0
    mean, _ = fm.inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-6)


def test_kid_of_identical_sets_is_about_zero_and_positive_for_shifted(points):
    mean, _ = fm.kernel_inception_distance(points, points, num_subsets=10, subset_size=200)
    shifted, _ = fm.kernel_inception_distance(points, points + 1.0, num_subsets=10, subset_size=200)
    assert shifted > 5.0
    assert abs(mean) < 0.01 * shifted
    other = np.random.default_rng(5).standard_normal((400, 8))  # an independent sample of the same law
    independent, _ = fm.kernel_inception_distance(points, other, num_subsets=10, subset_size=200)
    assert abs(independent) < 0.01 * shifted
