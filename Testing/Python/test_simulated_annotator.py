"""The simulated user: interior points and next clicks on synthetic shapes with known answers."""

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from CTSAM3DLib.simulated_annotator import SimulatedClick, first_click, index_to_lps, interior_point, next_click


def ball(shape, centre_zyx, radius_mm, spacing_zyx=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    squared = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_zyx, spacing_zyx))
    return squared <= radius_mm**2


def test_interior_point_of_ball_is_its_centre():
    mask = ball((40, 50, 60), (17, 23, 31), 9.0)
    assert interior_point(mask) == (17, 23, 31)


def test_interior_point_uses_spacing():
    # A box 11 voxels long in z and 21 in x: with 1 mm voxels the distance is limited by z, so x is
    # a plateau; with 3 mm z voxels the thin axis is x and the plateau lies along z instead.
    mask = np.zeros((30, 30, 30), bool)
    mask[5:16, 5:26, 5:26] = True
    assert interior_point(mask, (1.0, 1.0, 1.0)) == (10, 15, 15)
    assert interior_point(mask, (3.0, 1.0, 1.0)) == (10, 15, 15)
    # Two separate bars: A is 6 voxels thin in x, B is 4 voxels thin in z. With 1 mm voxels A is the
    # thicker; with 3 mm slices B is (4 x 3 mm against 6 x 1 mm).
    bars = np.zeros((40, 40, 40), bool)
    bars[2:38, 2:14, 2:8] = True  # A
    bars[20:24, 20:38, 16:38] = True  # B
    z, y, x = interior_point(bars, (1.0, 1.0, 1.0))
    assert 2 <= y < 14 and 2 <= x < 8
    z, y, x = interior_point(bars, (3.0, 1.0, 1.0))
    assert 20 <= z < 24 and 20 <= y < 38 and 16 <= x < 38


def test_interior_point_tie_break_is_central_and_deterministic():
    mask = np.zeros((12, 12, 40), bool)
    mask[2:8, 2:8, 3:35] = True  # 6 x 6 cross-section: a plateau of ties along x and in y/z
    assert interior_point(mask) == (4, 4, 18)
    assert interior_point(mask.copy()) == interior_point(mask)


def test_interior_point_counts_the_array_edge_as_background():
    mask = np.zeros((10, 10, 30), bool)
    mask[:, :, 0:20] = True  # the whole cross-section, cut by the array's edges
    z, y, x = interior_point(mask)
    assert (z, y) in {(4, 4), (4, 5), (5, 4), (5, 5)} and 4 <= x <= 15


def test_interior_point_of_single_voxel_and_empty():
    mask = np.zeros((5, 6, 7), bool)
    mask[1, 2, 3] = True
    assert interior_point(mask, (2.0, 0.5, 0.7)) == (1, 2, 3)
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((4, 4, 4), bool))
    with pytest.raises(ValueError, match="3D"):
        interior_point(np.ones((4, 4), bool))


def test_next_click_none_when_masks_agree():
    reference = ball((20, 20, 20), (10, 10, 10), 5)
    assert next_click(reference.copy(), reference) is None
    assert next_click(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)) is None


def test_next_click_positive_in_largest_missed_region():
    reference = ball((40, 40, 40), (20, 20, 20), 12)
    prediction = reference.copy()
    prediction[20:, :, :] = False  # the lower half is missed
    prediction[0:3, 0:3, 0:3] = True  # a small extra region elsewhere
    click = next_click(prediction, reference)
    assert isinstance(click, SimulatedClick) and click.positive
    index, positive = click
    assert reference[index] and not prediction[index] and index[0] >= 20


def test_next_click_negative_in_largest_extra_region():
    reference = ball((40, 40, 40), (20, 20, 20), 8)
    prediction = reference.copy()
    prediction[2:12, 25:38, 25:38] = True  # extra box, far from the ball
    prediction[20, 20, 20] = False  # a one-voxel miss
    index, positive = next_click(prediction, reference)
    assert not positive
    assert index == interior_point(prediction & ~reference)


def test_next_click_picks_the_largest_of_several_missed_components():
    reference = np.zeros((30, 30, 30), bool)
    reference[2:6, 2:6, 2:6] = True  # 64 voxels
    reference[15:25, 15:25, 15:25] = True  # 1000 voxels
    index, positive = next_click(np.zeros_like(reference), reference, (2.0, 1.0, 1.0))
    assert positive and all(15 <= i < 25 for i in index)


def test_first_click_is_positive_and_interior():
    reference = ball((30, 30, 30), (12, 14, 16), 6)
    assert first_click(reference) == SimulatedClick((12, 14, 16), True)


def test_next_click_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        next_click(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 4), bool))


def test_index_to_lps_on_oblique_flipped_volume():
    image = sitk.Image(7, 5, 3, sitk.sitkUInt8)  # numpy shape (3, 5, 7)
    image.SetSpacing((0.8, 1.5, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, 1.0, -1.0])
    image.SetDirection(direction.ravel().tolist())
    index_zyx = (2, 4, 6)
    expected = np.array(image.GetOrigin()) + direction @ (np.array([6, 4, 2]) * np.array(image.GetSpacing()))
    np.testing.assert_allclose(index_to_lps(image, index_zyx), expected, atol=1e-9)


def test_the_old_module_name_still_works_and_says_it_is_deprecated():
    import importlib
    import sys

    from CTSAM3DLib import simulated_annotator

    sys.modules.pop("CTSAM3DLib.clicks", None)
    with pytest.warns(DeprecationWarning, match="CTSAM3DLib.simulated_annotator"):
        old = importlib.import_module("CTSAM3DLib.clicks")
    assert old.first_click is simulated_annotator.first_click
