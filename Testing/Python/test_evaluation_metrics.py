"""Metrics against hand-computed cases, empty masks and one-voxel structures included."""

import math

import numpy as np
import pytest

from CTSAM3DLib.evaluation.metrics import dice, score, surface, surface_scores


def empty(shape=(6, 7, 8)):
    return np.zeros(shape, bool)


def box(shape, z, y, x):
    mask = empty(shape)
    mask[z, y, x] = True
    return mask


def test_identical_masks_are_perfect():
    mask = box((10, 10, 10), slice(2, 7), slice(3, 8), slice(1, 9))
    assert score(mask, mask.copy(), (2.5, 0.7, 0.7)) == (1.0, 1.0, 0.0)


def test_both_empty_is_perfect_agreement():
    assert score(empty(), empty(), (1.0, 1.0, 1.0)) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("prediction_empty", [True, False])
def test_one_empty_scores_zero_and_infinite_distance(prediction_empty):
    mask = box((6, 7, 8), slice(1, 3), slice(1, 3), slice(1, 3))
    prediction, reference = (empty(), mask) if prediction_empty else (mask, empty())
    result = score(prediction, reference, (1.0, 1.0, 1.0))
    assert result.dice == 0.0 and result.surface_dice == 0.0 and math.isinf(result.hd95_mm)


def test_one_voxel_structures():
    one = box((5, 5, 5), 2, 2, 2)
    assert score(one, one.copy(), (2.5, 1.0, 1.0)) == (1.0, 1.0, 0.0)
    neighbour_in_z = box((5, 5, 5), 3, 2, 2)
    # One slice apart at 2.5 mm: no overlap, 2.5 mm apart, outside a 2 mm tolerance, inside 3 mm.
    assert score(neighbour_in_z, one, (2.5, 1.0, 1.0)) == (0.0, 0.0, 2.5)
    assert surface_scores(neighbour_in_z, one, (2.5, 1.0, 1.0), tolerance_mm=3.0) == (1.0, 2.5)
    two_apart_in_x = box((5, 5, 5), 2, 2, 4)
    assert score(two_apart_in_x, one, (2.5, 1.0, 0.7)).hd95_mm == pytest.approx(1.4)


def test_box_grown_by_one_slice():
    # Reference: a 4x4x4 box; prediction: the same box one voxel longer in x (4x4x5).
    reference = box((8, 8, 9), slice(2, 6), slice(2, 6), slice(2, 6))
    prediction = box((8, 8, 9), slice(2, 6), slice(2, 6), slice(2, 7))
    assert dice(prediction, reference) == pytest.approx(2 * 64 / (64 + 80))
    # Surfaces: 64 - 2^3 = 56 voxels and 80 - 2*2*3 = 68 voxels.
    assert surface(reference).sum() == 56 and surface(prediction).sum() == 68
    # Prediction surface: 52 voxels on the reference surface, 16 (the new face) 1 mm away. Reference
    # surface: 52 on the prediction surface, 4 (the old face's centre, now inside) 1 mm away.
    # 95th percentiles (linear): both 1 mm.
    result = score(prediction, reference, (1.0, 1.0, 1.0))
    assert result.surface_dice == 1.0 and result.hd95_mm == pytest.approx(1.0)
    surface_dice, _ = surface_scores(prediction, reference, (1.0, 1.0, 1.0), tolerance_mm=0.5)
    assert surface_dice == pytest.approx((52 + 52) / (68 + 56))


def test_hd95_takes_the_percentile_not_the_maximum():
    reference = box((30, 30, 30), slice(5, 25), slice(5, 25), slice(5, 25))
    prediction = reference.copy()
    prediction[15, 15, 25:29] = True  # a thin 4-voxel spike: its tip is 4 mm away
    result = score(prediction, reference, (1.0, 1.0, 1.0))
    assert result.hd95_mm == 0.0  # 4 of ~2300 surface voxels are far: below the 95th percentile
    assert 0.99 < result.surface_dice < 1.0


def test_surface_counts_the_array_edge_as_outside():
    full = np.ones((3, 3, 3), bool)
    assert surface(full).sum() == 26  # all but the centre


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice(empty((3, 3, 3)), empty((3, 3, 4)))


def test_cropping_does_not_change_distances_on_large_grids():
    big = box((60, 70, 80), slice(10, 20), slice(30, 40), slice(50, 60))
    shifted = box((60, 70, 80), slice(12, 22), slice(30, 40), slice(50, 60))
    small = score(shifted[8:24, 28:42, 48:62], big[8:24, 28:42, 48:62], (1.5, 0.8, 0.8))
    assert score(shifted, big, (1.5, 0.8, 0.8)) == small
