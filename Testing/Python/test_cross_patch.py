"""Cross-patch prompting: which neighbours are explored, when it stops, the cap and the box, how
refining clicks re-propagate, and that undo takes everything back. Synthetic shapes spanning
several patches, in oblique and anisotropic geometry, with a stand-in network."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CTSAM3DLib.propagation import NEIGHBOUR_OFFSETS, batched_heatmap_peaks, heatmap_peaks, touched_offsets
from CTSAM3DLib.session import InteractiveSession
from standins.networks import CrossPatchThresholdNet, ThresholdNet


def synthetic_ct(shape_lps, size=(170, 90, 70), spacing=(2.0, 1.6, 2.5), degrees=(0.0, 0.0, 0.0)):
    """A -1000 HU volume holding 300 HU wherever ``shape_lps(points (..., 3))`` is true; stored
    with anisotropic spacing and an optional rotation of its axes, centred on the origin."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*np.deg2rad(degrees))
    direction = np.array(transform.GetMatrix()).reshape(3, 3)
    spacing = np.array(spacing)
    size = np.array(size)
    origin = -direction @ (spacing * (size - 1) / 2)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij"), axis=-1)[..., ::-1]
    world = index @ (direction * spacing).T + origin
    array = np.where(shape_lps(world), 300.0, -1000.0).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def rod_along_x(half_length=150.0, radius=8.0):
    return lambda p: (np.abs(p[..., 0]) <= half_length) & (p[..., 1] ** 2 + p[..., 2] ** 2 <= radius**2)


def assert_covers_the_rod(mask, reference):
    """Every slice across the rod's length (but its end caps, which partial volume thins below
    the stand-in's threshold) holds mask voxels, and none lies off the rod."""
    image = sitk.GetImageFromArray(reference.astype(np.uint8))
    grown = sitk.GetArrayFromImage(sitk.BinaryDilate(image, [1, 1, 1])).astype(bool)
    assert not np.any(mask & ~grown)
    along = np.argwhere(reference)
    axis = int(np.argmax(along.max(axis=0) - along.min(axis=0)))
    slices_with_rod = set(range(along[:, axis].min() + 1, along[:, axis].max()))
    slices_with_mask = set(np.argwhere(mask)[:, axis])
    assert slices_with_rod <= slices_with_mask, sorted(slices_with_rod - slices_with_mask)


def test_touched_offsets_follow_faces_edges_and_corners():
    mask = torch.zeros(64, 64, 64, dtype=torch.bool)
    assert touched_offsets(mask) == []
    mask[30, 30, 63] = True  # on the +x face only
    assert touched_offsets(mask) == [(1, 0, 0)]
    mask[:] = False
    mask[0, 63, 63] = True  # corner x = 63, y = 63, z = 0
    assert sorted(touched_offsets(mask)) == sorted(
        [(1, 0, 0), (0, 1, 0), (0, 0, -1), (1, 1, 0), (1, 0, -1), (0, 1, -1), (1, 1, -1)]
    )
    mask[:] = True
    assert sorted(touched_offsets(mask)) == sorted(NEIGHBOUR_OFFSETS) and len(NEIGHBOUR_OFFSETS) == 26


def test_heatmap_peaks_are_the_strongest_local_maxima_above_threshold():
    grid = torch.stack(torch.meshgrid(*(torch.arange(64.0),) * 3, indexing="ij"), dim=-1)

    def blob(x, y, z, height):
        return height * torch.exp(-((grid - torch.tensor([z, y, x])) ** 2).sum(-1) / 8)

    heatmap = blob(10, 20, 30, 0.9) + blob(50, 40, 12, 1.2) + blob(33, 3, 60, 0.3)
    peaks = heatmap_peaks(heatmap)
    assert peaks.tolist() == [[50.0, 40.0, 12.0], [10.0, 20.0, 30.0]]
    assert heatmap_peaks(heatmap, max_peaks=1).tolist() == [[50.0, 40.0, 12.0]]
    assert heatmap_peaks(torch.zeros(64, 64, 64)).shape == (0, 3)


def test_touched_offsets_agree_with_a_test_of_each_contact_region():
    """The 26 answers are reduced together (one read-back): each equals its own region's test."""
    generator = torch.Generator().manual_seed(5)
    position = {-1: 0, 0: slice(None), 1: -1}
    for _ in range(20):
        mask = torch.rand(16, 16, 16, generator=generator) > 0.9995
        reached = [offset for offset in NEIGHBOUR_OFFSETS
                   if bool(mask[position[offset[2]], position[offset[1]], position[offset[0]]].any())]
        assert touched_offsets(mask) == sorted(reached, key=lambda offset: sum(map(abs, offset)))


def test_faces_come_first_and_corners_last():
    """What a cap on the patches opens first: where the structure runs on through a face, not the first
    offsets in order; a corner that one voxel reaches comes after every face and edge, and the order does not
    hang on how many voxels touch (a single voxel on a face outranks a full edge)."""
    mask = torch.zeros(64, 64, 64, dtype=torch.bool)
    mask[63, 63, 10:51] = True  # 41 voxels along the edge y = 63, z = 63 (and on its two faces)
    mask[30, 30, 63] = True  # one voxel on the +x face
    assert touched_offsets(mask) == [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1)]
    mask[0, 0, :] = True  # the edge y = 0, z = 0, all along x, with its ends in two corners
    order = touched_offsets(mask)
    assert order[:6] == [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    assert order[-2:] == [(-1, -1, -1), (1, -1, -1)]


def test_peaks_of_a_batch_are_each_heatmaps_own():
    generator = torch.Generator().manual_seed(6)
    heatmaps = torch.nn.functional.avg_pool3d(torch.rand(5, 1, 32, 32, 32, generator=generator) * 3, 5, 1, 2)[:, 0]
    heatmaps[2] = 0
    batched = batched_heatmap_peaks(heatmaps, threshold=0.5)
    assert [len(peaks) for peaks in batched] == [3, 3, 0, 3, 3]
    for heatmap, peaks in zip(heatmaps, batched):
        assert torch.equal(peaks, heatmap_peaks(heatmap, threshold=0.5))


@pytest.mark.parametrize("degrees", [(0.0, 0.0, 0.0), (0.0, 0.0, 25.0)])
def test_one_click_propagates_along_a_rod_and_stops_at_its_ends(degrees):
    image = synthetic_ct(rod_along_x(), degrees=degrees)
    net = CrossPatchThresholdNet()
    session = InteractiveSession(net, image, device="cpu")
    session.add_click([0.0, 0.0, 0.0])
    # The rod spans x in [-150, 150] mm; the first patch covers about 96 mm of it, each neighbour
    # 96 mm more: two neighbours on each side reach both ends, and none is opened across y or z.
    assert session.patch_count == 5
    offsets = sorted(patch.offset for patch in session.patches if patch.parent is not None)
    assert offsets == [(-1, 0, 0), (-1, 0, 0), (1, 0, 0), (1, 0, 0)]
    assert_covers_the_rod(session.mask_array().astype(bool), sitk.GetArrayFromImage(image) > 50)
    assert session.last_timing["patches_open"] == 5 and session.last_timing["patches_decoded"] == 5
    assert "cross_patch" in session.last_timing
    # Neighbours of one breadth-first level go through the network together.
    assert max(net.decoded_batches) == 2


def test_progress_follows_the_patches_and_cancelling_leaves_the_session_unchanged():
    image = synthetic_ct(rod_along_x())
    session = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu")
    reports = []
    session.add_click([0.0, 0.0, 0.0], progress=lambda done, planned: reports.append((done, planned)))
    # The first patch, then two breadth-first levels of two neighbours each.
    assert reports == [(0, 1), (1, 1), (1, 3), (3, 3), (3, 5), (5, 5)]
    after_first = session.mask_array()

    class CancelledError(Exception):
        pass

    def cancel_once_a_patch_is_decoded(done, planned):
        if done >= 1:
            raise CancelledError

    with pytest.raises(CancelledError):
        session.set_clicks(
            [([0.0, 0.0, 0.0], True), ([-70.0, 0.0, 0.0], True)], progress=cancel_once_a_patch_is_decoded
        )
    assert session.clicks == [((0.0, 0.0, 0.0), True)] and session.patch_count == 5
    np.testing.assert_array_equal(session.mask_array(), after_first)


def test_previews_show_the_mask_growing_before_the_click_is_done():
    """Before each further level of neighbours the preview holds the mask so far: first the clicked patch
    alone (what a capped session gives), then more; the session's own mask changes only at the end."""
    image = synthetic_ct(rod_along_x())
    session = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu")
    before = session.mask_array()
    previews = []

    def preview(update):
        np.testing.assert_array_equal(session.mask_array(), before)
        viewer = before.copy()
        update.apply_to(viewer)
        previews.append(viewer)

    final = session.add_click([0.0, 0.0, 0.0], preview=preview)
    assert len(previews) == 2  # before each of the two breadth-first levels
    alone = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", max_patches=1)
    alone.add_click([0.0, 0.0, 0.0])
    np.testing.assert_array_equal(previews[0], alone.mask_array())
    grown = [int(view.sum()) for view in previews] + [int(session.mask_array().sum())]
    assert grown == sorted(grown) and grown[0] < grown[-1]
    viewer = before.copy()
    final.apply_to(viewer)
    np.testing.assert_array_equal(viewer, session.mask_array())

    class CancelledError(Exception):
        pass

    def cancel(update):
        raise CancelledError

    after = session.mask_array()
    with pytest.raises(CancelledError):
        session.add_click([60.0, 0.0, 0.0], preview=cancel)
    assert session.clicks == [((0.0, 0.0, 0.0), True)] and session.patch_count == 5
    np.testing.assert_array_equal(session.mask_array(), after)
    no_neighbours = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", cross_patch=False)
    no_neighbours.add_click([0.0, 0.0, 0.0], preview=cancel)  # one patch: nothing to preview


def test_without_cross_patch_the_mask_is_cut_at_the_patch():
    image = synthetic_ct(rod_along_x())
    session = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", cross_patch=False)
    session.add_click([0.0, 0.0, 0.0])
    assert session.patch_count == 1
    with pytest.raises(AssertionError):
        assert_covers_the_rod(session.mask_array().astype(bool), sitk.GetArrayFromImage(image) > 50)


def test_the_cap_and_the_box_limit_propagation():
    image = synthetic_ct(rod_along_x())
    capped = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", max_patches=3)
    capped.add_click([0.0, 0.0, 0.0])
    assert capped.patch_count == 3
    boxed = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu",
                               cross_patch_box_lps=((-200.0, -200.0, -200.0), (60.0, 200.0, 200.0)))
    boxed.add_click([0.0, 0.0, 0.0])
    assert all(patch.geometry.centre_lps[0] <= 60.0 for patch in boxed.patches)
    assert boxed.patch_count == 3


def test_undo_takes_back_everything_a_click_propagated():
    image = synthetic_ct(rod_along_x())
    session = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu")
    session.add_click([0.0, 0.0, 0.0])
    after_first = session.mask_array()
    session.add_click([0.0, 40.0, 30.0], positive=False)
    session.undo()
    assert session.patch_count == 5 and np.array_equal(session.mask_array(), after_first)
    session.undo()
    assert session.patch_count == 0 and not session.mask_array().any()


def test_cutting_the_structure_drops_what_lies_beyond_and_undo_restores_it():
    image = synthetic_ct(rod_along_x())
    session = InteractiveSession(CrossPatchThresholdNet(carve_radius=10.0), image, device="cpu")
    session.add_click([0.0, 0.0, 0.0])
    before = session.mask_array()
    centre_patch = session.patches[0]
    # A negative click on the rod inside the first patch, 40 mm towards +x: the rod no longer
    # reaches the +x face, so the +x chain of patches is dropped.
    session.add_click([40.0, 0.0, 0.0], positive=False)
    assert session.patch_count == 3
    assert all(patch.geometry.centre_lps[0] <= centre_patch.geometry.centre_lps[0] for patch in session.patches)
    beyond = image.TransformPhysicalPointToIndex([80.0, 0.0, 0.0])
    assert session.mask_array()[beyond[2], beyond[1], beyond[0]] == 0
    session.undo()
    assert session.patch_count == 5 and np.array_equal(session.mask_array(), before)


def test_a_click_in_a_propagated_patch_refines_it_and_its_children():
    image = synthetic_ct(rod_along_x())
    net = CrossPatchThresholdNet()
    session = InteractiveSession(net, image, device="cpu")
    session.add_click([0.0, 0.0, 0.0])
    near_child = next(p for p in session.patches if p.offset == (1, 0, 0) and p.parent == 0)
    grandchild = next(p for p in session.patches if p.parent is not None and p.parent != 0 and p.offset == (1, 0, 0))
    net.decoded_batches.clear()
    point = near_child.geometry.centre_lps + [0.0, 2.0, 0.0]
    session.add_click(point)
    # The click's patch, then its child beyond (re-prompted by the cross-patch model).
    assert net.decoded_batches == [1, 1]
    assert session.patch_count == 5
    assert grandchild.geometry in [p.geometry for p in session.patches]


def test_a_network_without_cross_patch_cannot_ask_for_it(data_dir):
    image = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"))
    assert InteractiveSession(ThresholdNet(), image, device="cpu").cross_patch is False
    with pytest.raises(ValueError, match="needs a network with a cross_patch method"):
        InteractiveSession(ThresholdNet(), image, device="cpu", cross_patch=True)
    with pytest.raises(ValueError, match="max_patches must be at least 1"):
        InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", max_patches=0)


def test_propagation_on_a_real_ct_with_the_aorta(data_dir):
    """On the real scan, the stand-in follows the contrast-filled aorta (with the bones and other
    bright tissue the threshold also takes) from one click into neighbouring patches."""
    image = sitk.ReadImage(str(data_dir / "aorta-ct-1.5mm" / "ct.nii.gz"))
    aorta = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "aorta-ct-1.5mm" / "aorta.nii.gz"))) > 0
    inside = np.argwhere(aorta)
    centre = inside[len(inside) // 2][::-1].astype(float)
    session = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", max_patches=30)
    session.add_click(image.TransformContinuousIndexToPhysicalPoint(centre.tolist()))
    assert 1 < session.patch_count <= 30
    single = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", cross_patch=False)
    single.add_click(image.TransformContinuousIndexToPhysicalPoint(centre.tolist()))
    covered = np.sum(session.mask_array().astype(bool) & aorta) / aorta.sum()
    covered_single = np.sum(single.mask_array().astype(bool) & aorta) / aorta.sum()
    assert covered > 0.85 and covered > 2 * covered_single
