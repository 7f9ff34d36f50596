"""The click protocol (through the real InteractiveSession with a stand-in network and a scripted
segmenter), structure sizes, and the region-growing baseline, on oblique and flipped volumes."""

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from CTSAM3DLib.evaluation.baseline import RegionGrowingSession
from CTSAM3DLib.evaluation.protocol import (
    MIN_LATTICE_VOXELS,
    measure_structure,
    run_clicks,
    size_problem,
)
from CTSAM3DLib.session import InteractiveSession
from CTSAM3DLib.simulated_annotator import interior_point
from standins.networks import ThresholdNet


def oblique_flipped(array_zyx, spacing=(1.2, 0.9, 2.0), origin=(30.0, -12.0, 7.0)):
    """An image with an oblique, partly flipped direction (not the identity)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection((rotation @ np.diag([-1.0, 1.0, -1.0])).ravel().tolist())
    return image


def ball_array(shape, centre, radius_vox):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius_vox**2


def as_mask(array, like):
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(like)
    return mask


class ScriptedSegmenter:
    """Returns a scripted mask for each click and records where the clicks fell, as voxel indices."""

    def __init__(self, image, masks):
        self.image, self.masks, self.received = image, masks, []
        self.mask = as_mask(np.zeros(masks[0].shape, bool), image)

    def reset(self):
        self.received = []

    def add_click(self, point_lps, positive=True):
        x, y, z = self.image.TransformPhysicalPointToIndex(point_lps)
        self.received.append(((z, y, x), positive))
        self.mask = as_mask(self.masks[min(len(self.received), len(self.masks)) - 1], self.image)
        return self.mask


def test_protocol_clicks_land_on_the_chosen_voxels_and_stop_when_perfect():
    shape = (20, 24, 28)
    reference = np.zeros(shape, bool)
    reference[4:16, 5:20, 6:22] = True
    half = reference.copy()
    half[10:, :, :] = False
    image = oblique_flipped(np.zeros(shape, np.int16))
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    segmenter = ScriptedSegmenter(image, [half, reference])
    records = run_clicks(segmenter, as_mask(reference, image), clicks=5)
    assert [r.click for r in records] == [1, 2]  # perfect after click 2: the user stops
    first, second = segmenter.received
    assert first == (interior_point(reference, spacing_zyx), True)
    assert second == (interior_point(reference & ~half, spacing_zyx), True)
    assert records[0].index_zyx == first[0]
    np.testing.assert_allclose(
        records[0].point_lps, image.TransformIndexToPhysicalPoint(tuple(reversed(first[0]))), atol=1e-9
    )
    assert records[0].dice == pytest.approx(2 * half.sum() / (half.sum() + reference.sum()))
    assert records[1].dice == 1.0 and records[1].hd95_mm == 0.0


def test_protocol_places_negative_clicks_in_extra_regions():
    shape = (16, 16, 16)
    reference = ball_array(shape, (8, 8, 8), 4)
    too_big = ball_array(shape, (8, 8, 8), 6)
    image = oblique_flipped(np.zeros(shape, np.int16))
    segmenter = ScriptedSegmenter(image, [too_big, too_big])
    records = run_clicks(segmenter, as_mask(reference, image), clicks=3)
    assert [r.positive for r in records] == [True, False, False]
    for index, _ in segmenter.received[1:]:
        assert too_big[index] and not reference[index]


def test_protocol_refuses_empty_reference_and_off_grid_masks():
    image = oblique_flipped(np.zeros((8, 8, 8), np.int16))
    with pytest.raises(ValueError, match="empty"):
        nothing = np.zeros((8, 8, 8), bool)
        run_clicks(ScriptedSegmenter(image, [nothing]), as_mask(nothing, image), 2)
    reference = as_mask(ball_array((8, 8, 8), (4, 4, 4), 2), image)
    wrong = ScriptedSegmenter(image, [np.zeros((8, 8, 8), bool)])
    wrong.add_click = lambda point_lps, positive=True: setattr(wrong, "mask", sitk.Image(9, 8, 8, sitk.sitkUInt8))
    with pytest.raises(ValueError, match="grid"):
        run_clicks(wrong, reference, 2)


def test_protocol_through_interactive_session_with_threshold_net():
    # A bright ball in a dark oblique, flipped CT: the stand-in network returns the bright voxels of
    # the patch, so the session's mask must match the ball once the click lands on it.
    shape = (40, 44, 48)
    ball = ball_array(shape, (20, 22, 24), 8)
    ct = np.where(ball, 200, -1000).astype(np.int16)
    image = oblique_flipped(ct, spacing=(1.0, 1.1, 1.3))
    session = InteractiveSession(ThresholdNet(), image, device="cpu")
    records = run_clicks(session, as_mask(ball, image), clicks=3)
    # The session resamples through its 1.5 mm lattice, which blurs the edge by about a voxel; a
    # wrong axis order or sign would miss the ball altogether.
    assert records[0].positive and records[0].dice > 0.85 and records[0].surface_dice > 0.95
    assert records[-1].dice >= records[0].dice - 1e-9
    assert all(r.seconds > 0 for r in records)


def test_structure_size_and_problems():
    image = oblique_flipped(np.zeros((30, 30, 30), np.int16), spacing=(1.0, 1.0, 1.0))
    one_voxel = np.zeros((30, 30, 30), bool)
    one_voxel[3, 4, 5] = True
    size = measure_structure(as_mask(one_voxel, image))
    assert size.voxels == 1 and size.volume_mm3 == 1.0 and size.patches == 1
    assert "too small" in size_problem(size, None)
    block = np.zeros((30, 30, 30), bool)
    block[0:10, 0:10, 0:10] = True  # 1000 mm^3, far above MIN_LATTICE_VOXELS * 3.375 mm^3
    assert MIN_LATTICE_VOXELS < 1000 / 1.5**3
    assert size_problem(measure_structure(as_mask(block, image)), 1) is None
    assert "empty" in size_problem(measure_structure(as_mask(np.zeros((30, 30, 30)), image)), 1)
    long_image = sitk.Image(10, 10, 200, sitk.sitkInt16)
    long_image.SetSpacing((1.0, 1.0, 1.5))
    rod = np.zeros((200, 10, 10), bool)
    rod[:, 3:7, 3:7] = True  # 300 mm long: 4 patches of 96 mm along z
    size = measure_structure(as_mask(rod, long_image))
    assert size.extent_mm == pytest.approx((4.0, 4.0, 300.0)) and size.patches == 4
    assert "too large" in size_problem(size, 1) and size_problem(size, 4) is None


def two_blobs_ct():
    rng = np.random.default_rng(0)
    ct = rng.normal(-300.0, 15.0, (30, 30, 60))
    left, right = ball_array(ct.shape, (15, 15, 15), 7), ball_array(ct.shape, (15, 15, 45), 7)
    bridge = np.zeros(ct.shape, bool)
    bridge[13:18, 13:18, 15:45] = True
    organ = left | right | bridge
    ct[organ] = rng.normal(80.0, 15.0, int(organ.sum()))
    return oblique_flipped(ct.astype(np.float32)), left, right, organ


def test_baseline_grows_from_positive_clicks_and_negative_clicks_carve():
    image, left, right, organ = two_blobs_ct()
    session = RegionGrowingSession(image)
    point = image.TransformIndexToPhysicalPoint((15, 15, 15))  # the left blob's centre (x, y, z)
    session.add_click(point, True)
    mask = sitk.GetArrayFromImage(session.mask) != 0
    assert mask.shape == left.shape and session.mask.GetDirection() == image.GetDirection()
    assert mask[organ].mean() > 0.95 and mask[~organ].mean() < 0.01  # grows along the bridge
    session.add_click(image.TransformIndexToPhysicalPoint((45, 15, 15)), False)
    mask = sitk.GetArrayFromImage(session.mask)
    assert mask[left].mean() > 0.95 and mask[right].sum() == 0  # the right blob is carved away
    assert not mask[:, :, 31:].any()  # everything closer to the negative click is gone
    session.reset()
    assert not sitk.GetArrayFromImage(session.mask).any()
    with pytest.raises(ValueError, match="outside"):
        session.add_click((1e4, 0.0, 0.0), True)


def test_baseline_through_the_protocol():
    image, left, right, organ = two_blobs_ct()
    records = run_clicks(RegionGrowingSession(image), as_mask(left, image), clicks=2)
    assert records[0].positive and records[0].dice < 0.7  # the growth leaks into the right blob
    assert not records[1].positive  # the simulated user carves the leak away
    assert records[1].dice > 0.9
