"""The interactive session on real CTs: geometry round trips on reoriented and oblique copies,
preprocessing parity with the authors' fixture, undo, several patches, and bad input."""

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CTSAM3DLib.constants import HU_WINDOW
from CTSAM3DLib.geometry import Lattice
from CTSAM3DLib.session import Click, InteractiveSession, SessionInputError
from standins.networks import RecordingNet, ThresholdNet

# ThresholdNet's 0.5 on the [0, 1] window is this many HU.
THRESHOLD_HU = HU_WINDOW[0] + 0.5 * (HU_WINDOW[1] - HU_WINDOW[0])


def read(data_dir, name):
    return sitk.ReadImage(str(data_dir / name / "ct.nii.gz"))


@pytest.fixture(scope="module")
def chest(data_dir):
    return read(data_dir, "chest-abdomen-ct")


@pytest.fixture(scope="module")
def abdomen(data_dir):
    return read(data_dir, "abdomen-ct-3mm")


def crop_around_centre(image, extent_mm=150.0):
    """The middle of the scan, at most ``extent_mm`` wide on each axis, in its own geometry (keeps
    the tests quick on the 512x512 scan while the patch still lies inside)."""
    size = np.array(image.GetSize())
    keep = np.minimum(size, np.ceil(extent_mm / np.array(image.GetSpacing()))).astype(int)
    start = (size - keep) // 2
    return sitk.RegionOfInterest(image, keep.tolist(), start.tolist())


def rotation_direction(degrees_about_axes):
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*np.deg2rad(degrees_about_axes))
    return np.array(transform.GetMatrix()).reshape(3, 3)


def oblique_copy(image, degrees_about_axes=(12.0, -9.0, 20.0)):
    """The scan resampled onto a rotated grid of the same spacing covering the same body."""
    direction = rotation_direction(degrees_about_axes) @ np.array(image.GetDirection()).reshape(3, 3)
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    origin = centre - direction @ (spacing * (size - 1) / 2)
    return sitk.Resample(image, size.tolist(), sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing.tolist(),
                         direction.ravel().tolist(), -1024.0, image.GetPixelID())


def variants(image):
    """The same scan stored in other orientations; physical space is unchanged by Flip/PermuteAxes."""
    return {
        "as stored": image,
        "x flipped": sitk.Flip(image, [True, False, False]),
        "x and y flipped": sitk.Flip(image, [True, True, False]),
        "sagittal storage": sitk.PermuteAxes(image, [1, 2, 0]),
        "coronal storage, z flipped": sitk.Flip(sitk.PermuteAxes(image, [0, 2, 1]), [False, True, False]),
        "oblique": oblique_copy(image),
    }


def patch_interior(session, image, patch):
    """Voxels of ``image`` whose centres lie well inside the patch (away from the patch's
    outer voxel, where the interpolated patch has no neighbours beyond) and inside the lattice
    (beyond it the authors' patches hold -1024 HU)."""
    region = session.grid.region_of(patch.geometry)
    voxel = session.grid.patch_coordinates(region, patch.geometry, torch.device("cpu")).numpy()
    lattice_voxel = voxel + np.array(patch.geometry.start_index)
    within_lattice = np.all((lattice_voxel >= 1) & (lattice_voxel <= np.array(session.lattice.size) - 2), axis=-1)
    inside = np.zeros(image.GetSize()[::-1], dtype=bool)
    inside[region.slices] = np.all((voxel >= 1) & (voxel <= 62), axis=-1) & within_lattice
    return inside


def boundary_band(reference):
    """Voxels within one voxel of the reference's boundary (either side)."""
    image = sitk.GetImageFromArray(reference.astype(np.uint8))
    dilated = sitk.GetArrayFromImage(sitk.BinaryDilate(image, [1, 1, 1]))
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(image, [1, 1, 1]))
    return dilated.astype(bool) & ~eroded.astype(bool)


@pytest.mark.parametrize("name", ["chest-abdomen-ct", "abdomen-ct-3mm", "aorta-ct-1.5mm", "body-ct-3mm"])
def test_mask_lands_on_the_source_grid_without_shift(data_dir, name):
    """A stand-in network returning its input thresholded must give the same threshold of the
    source image inside the patch, on every stored orientation and on an oblique copy: any shift,
    flip or transposition would show as disagreement far from the boundary."""
    base = crop_around_centre(read(data_dir, name))
    centre_index = (np.array(base.GetSize()) - 1) / 2
    point_lps = np.array(base.TransformContinuousIndexToPhysicalPoint(centre_index.tolist())) + [3.3, -2.1, 1.7]
    for label, image in variants(base).items():
        session = InteractiveSession(ThresholdNet(), image, device="cpu")
        session.add_click(point_lps)
        mask = session.mask
        assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
        assert mask.GetSpacing() == image.GetSpacing() and mask.GetDirection() == image.GetDirection()
        assert mask.GetPixelID() == sitk.sitkUInt8
        ours = sitk.GetArrayFromImage(mask).astype(bool)
        reference = sitk.GetArrayFromImage(image) > THRESHOLD_HU
        inside = patch_interior(session, image, session.patches[0])
        assert inside.sum() > 10_000, label
        disagreement = (ours != reference) & inside
        # Disagreement only where interpolation through the lattice may flip a voxel: at the boundary.
        assert not np.any(disagreement & ~boundary_band(reference)), label
        agreement = 2 * np.sum(ours & reference & inside) / (np.sum(ours & inside) + np.sum(reference & inside))
        assert agreement > 0.9, (label, agreement)


def test_reoriented_copies_give_the_same_mask_in_world_space(chest):
    """Flips and axis permutations keep physical space, so the masks must cover the same voxels.
    Only details finer than the 1.5 mm lattice may differ: the authors' lattice origin is the
    minimum over voxel indices 0 and N, which moves by one source voxel when an axis is stored
    flipped."""
    point_lps = np.array(chest.TransformContinuousIndexToPhysicalPoint([250.0, 300.0, 70.0]))
    masks = {}
    for label, image in list(variants(chest).items())[:5]:
        session = InteractiveSession(ThresholdNet(), image, device="cpu")
        session.add_click(point_lps)
        masks[label] = sitk.GetArrayFromImage(
            sitk.Resample(session.mask, chest, sitk.Transform(), sitk.sitkNearestNeighbor))
        if label == "as stored":
            # Away from the patch faces, which move with the lattice.
            interior = patch_interior(session, chest, session.patches[0])
            interior = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(interior.astype(np.uint8)),
                                                               [3, 3, 2])).astype(bool)
    base = masks["as stored"].astype(bool) & interior
    assert base.sum() > 100_000
    base_centroid = np.argwhere(base).mean(axis=0)
    for label, mask in masks.items():
        other = mask.astype(bool) & interior
        dice = 2 * np.sum(base & other) / (base.sum() + other.sum())
        assert dice > 0.97, (label, dice)
        shift_voxels = np.argwhere(other).mean(axis=0) - base_centroid
        assert np.all(np.abs(shift_voxels) < 0.1), (label, shift_voxels)


def test_patch_sampling_equals_the_authors_preprocessing(data_dir, reference_fixture):
    image = read(data_dir, "aorta-ct-1.5mm")
    lattice = Lattice.of_image(image)
    np.testing.assert_allclose(lattice.origin_lps, reference_fixture["rai_origin"], atol=1e-4)
    assert lattice.size == tuple(reference_fixture["rai_size"])
    session = InteractiveSession(ThresholdNet(), image, device="cpu")
    session.add_click(reference_fixture["center_world"])
    patch = session.patches[0]
    np.testing.assert_allclose(patch.geometry.origin_lps, reference_fixture["patch_origin"], atol=1e-4)
    np.testing.assert_allclose(patch.geometry.centre_lps, reference_fixture["center_world"], atol=1e-4)
    np.testing.assert_allclose(patch.image.numpy(), reference_fixture["patch_input"], atol=1e-4, rtol=0)


def test_patch_sampling_on_resampled_scan_matches_whole_volume_resampling(chest):
    """Sampling only the patch equals the authors' whole-volume resampling followed by a crop."""
    lattice = Lattice.of_image(chest)
    whole = sitk.Resample(chest, list(lattice.size), sitk.Transform(), sitk.sitkLinear, list(lattice.origin_lps),
                          [1.5] * 3, np.eye(3).ravel().tolist(), -1024.0, chest.GetPixelID())
    point_lps = chest.TransformContinuousIndexToPhysicalPoint([200.0, 280.0, 120.0])
    patch = lattice.patch_centred_on(lattice.nearest_index(point_lps))
    x, y, z = patch.start_index
    cropped = sitk.GetArrayFromImage(whole)[z:z + 64, y:y + 64, x:x + 64]
    sampled = lattice.sample(chest, patch)
    assert np.array_equal(sampled[: cropped.shape[0], : cropped.shape[1], : cropped.shape[2]], cropped)
    # Beyond the lattice's extent (here the top of the scan) the patch holds the outside value.
    assert cropped.shape[0] < 64 and np.all(sampled[cropped.shape[0]:] == -1024)


def test_refining_click_runs_only_the_decoder_and_undo_is_exact(abdomen):
    net = ThresholdNet()
    session = InteractiveSession(net, abdomen, device="cpu")
    centre = np.array(abdomen.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0]))
    session.add_click(centre)
    first = session.mask_array()
    first_probability = sitk.GetArrayFromImage(session.probability())
    session.add_click(centre + [6.0, 0.0, 0.0], positive=False)
    assert (net.encode_calls, net.decode_calls, session.patch_count) == (1, 2, 1)
    assert session.clicks == [Click(tuple(centre), True), Click(tuple(centre + [6.0, 0.0, 0.0]), False)]
    session.undo()
    after_undo = session.mask_array()
    assert np.array_equal(after_undo, first)
    assert np.array_equal(sitk.GetArrayFromImage(session.probability()), first_probability)
    assert len(session.clicks) == 1
    session.undo()
    assert session.patch_count == 0 and not session.mask_array().any()
    with pytest.raises(IndexError, match="nothing to undo"):
        session.undo()


def lattice_point(session, point_lps):
    """The centre of the lattice voxel nearest to a point."""
    lattice = session.lattice
    return np.array(lattice.origin_lps) + lattice.spacing * lattice.nearest_index(point_lps)


def test_several_patches_and_clicks_in_their_overlap(chest):
    net = RecordingNet()
    session = InteractiveSession(net, chest, device="cpu")
    # Patches span voxels -32..31 around their centre: b is just outside the first patch, while a
    # lies inside the second.
    a = lattice_point(session, chest.TransformContinuousIndexToPhysicalPoint([200.0, 250.0, 60.0]))
    session.add_click(a)
    b = a + [48.0, 0.0, 0.0]
    session.add_click(b)
    assert session.patch_count == 2
    first, second = session.patches
    assert first.geometry.contains(a) and not first.geometry.contains(b) and second.geometry.contains(b)
    # Click 1 also lies inside the second patch, so the second patch got both clicks.
    points, labels, prompt = net.calls[-1]
    assert labels.tolist() == [[1, 1]] and prompt is None
    np.testing.assert_allclose(points[0, 1].numpy(), np.round(second.geometry.to_voxel(b)))
    overlap = a + [24.0, 0.0, 0.0]
    session.add_click(overlap, positive=False)
    points, labels, prompt = net.calls[-1]
    assert labels.shape[0] == 2 and prompt is not None
    assert labels.tolist() == [[1, 0, -1], [1, 1, 0]]
    assert session.last_timing["patches_decoded"] == 2
    np.testing.assert_array_equal(prompt[0].numpy(), (first.image[0] > 0.5).float().numpy())
    # Undo back to one patch restores the mask of the first click exactly.
    only_first = InteractiveSession(ThresholdNet(), chest, device="cpu")
    only_first.add_click(a)
    session.undo()
    session.undo()
    assert session.patch_count == 1
    assert np.array_equal(session.mask_array(), only_first.mask_array())


def test_overlap_rule_takes_the_patch_with_the_nearest_centre(abdomen):
    class ConstantNet(ThresholdNet):
        """Probability 0.9 in the first patch it decodes, 0.1 in later ones."""

        def decode(self, features, points, labels, mask_prompt=None):
            self.decode_calls += 1
            value = 0.9 if self.decode_calls == 1 else 0.1
            return torch.full_like(features[0], value), torch.zeros(features[0].shape[0], 1)

    session = InteractiveSession(ConstantNet(), abdomen, device="cpu")
    a = lattice_point(session, abdomen.TransformContinuousIndexToPhysicalPoint([40.0, 50.0, 15.0]))
    session.add_click(a)
    session.add_click(a + [-60.0, 0.0, 0.0])
    first, second = session.patches
    mask = session.mask_array()
    for offset, expected in ((-20.0, 1), (-45.0, 0)):
        point = a + [offset, 0.0, 0.0]
        index = abdomen.TransformPhysicalPointToIndex(point.tolist())
        assert first.geometry.contains(point) and second.geometry.contains(point)
        assert mask[index[2], index[1], index[0]] == expected, offset


def test_set_clicks_reuses_the_common_prefix(abdomen):
    net = ThresholdNet()
    session = InteractiveSession(net, abdomen, device="cpu")
    centre = np.array(abdomen.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0]))
    clicks = [(centre, True), (centre + [3.0, 0, 0], False), (centre + [0, 3.0, 0], True)]
    session.set_clicks(clicks)
    assert net.decode_calls == 3
    moved = clicks[:2] + [(centre + [0, 6.0, 0], True)]
    session.set_clicks(moved)
    assert net.decode_calls == 4 and net.encode_calls == 1
    assert [c.point_lps for c in session.clicks] == [tuple(np.asarray(p, float)) for p, _ in moved]


def make_image(array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (sitk.Image([20, 20], sitk.sitkInt16), "expected a 3D image, got a 2D image"),
        (sitk.Image([8, 8, 8, 2], sitk.sitkInt16), "expected a 3D image, got a 4D image"),
        (sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), "3 components per voxel"),
        (sitk.Image([8, 8, 8], sitk.sitkInt16) + 40, "the image is constant (every voxel is 40)"),
        (make_image(np.full((2, 2, 2), np.nan, dtype=np.float32)), "every voxel of the image is NaN or infinite"),
    ],
)
def test_bad_images_are_refused(image, message):
    with pytest.raises(SessionInputError) as raised:
        InteractiveSession(ThresholdNet(), image, device="cpu")
    assert message in str(raised.value)


def test_an_empty_image_is_refused():
    with pytest.raises(SessionInputError, match="the image is empty"):
        InteractiveSession(ThresholdNet(), sitk.Image([0, 0, 0], sitk.sitkInt16), device="cpu")


def test_intensities_that_are_not_ct_warn_but_work():
    rng = np.random.default_rng(0)
    mr_like = make_image(rng.uniform(0, 800, size=(20, 30, 30)).astype(np.float32))
    with pytest.warns(UserWarning, match="no air near -1000 HU"):
        session = InteractiveSession(ThresholdNet(), mr_like, device="cpu")
    session.add_click([10.0, 10.0, 10.0])


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ([float("nan"), 0.0, 0.0], "must be finite"),
        ([1e5, 0.0, 0.0], "lies outside the image"),
        ([1.0, 2.0], "needs 3 coordinates"),
    ],
)
def test_bad_clicks_are_refused_and_change_nothing(abdomen, point, message):
    session = InteractiveSession(ThresholdNet(), abdomen, device="cpu")
    centre = abdomen.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0])
    session.add_click(centre)
    before = session.mask_array()
    with pytest.raises(SessionInputError, match=message):
        session.add_click(point)
    assert len(session.clicks) == 1 and session.patch_count == 1
    assert np.array_equal(session.mask_array(), before)


def test_a_failing_network_leaves_the_session_unchanged(abdomen):
    class FailingNet(ThresholdNet):
        def decode(self, *args, **kwargs):
            if self.decode_calls >= 1:
                raise RuntimeError("out of memory")
            return super().decode(*args, **kwargs)

    session = InteractiveSession(FailingNet(), abdomen, device="cpu")
    centre = np.array(abdomen.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0]))
    session.add_click(centre)
    before = session.mask_array()
    for point in (centre + [3.0, 0, 0], centre + [150.0, 0, 0]):
        with pytest.raises(RuntimeError, match="out of memory"):
            session.add_click(point)
        assert len(session.clicks) == 1 and session.patch_count == 1
        assert np.array_equal(session.mask_array(), before)


def test_no_warning_for_real_ct(abdomen):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InteractiveSession(ThresholdNet(), abdomen, device="cpu")


def test_every_call_returns_exactly_what_it_changed(chest):
    """A viewer that keeps its own copy of the mask and applies each MaskUpdate (clicks opening and
    refining patches, cross-patch neighbours, a negative click, undo, set_clicks moving a click, a box,
    undo of the box) holds the session's whole mask after every call; a click's box is the few patches
    it touched, not the scan."""
    from standins.networks import CrossPatchThresholdNet

    session = InteractiveSession(CrossPatchThresholdNet(), chest, device="cpu", max_patches=4)
    viewer = session.mask_array()
    a = np.array(chest.TransformContinuousIndexToPhysicalPoint([250.0, 300.0, 70.0]))
    b = np.array(chest.TransformContinuousIndexToPhysicalPoint([120.0, 200.0, 20.0]))
    steps = [
        lambda: session.add_click(a),
        lambda: session.add_click(a + [4.0, 0.0, 0.0], positive=False),
        lambda: session.add_click(b),
        lambda: session.undo(),
        lambda: session.set_clicks([(a, True), (a + [0.0, 9.0, 0.0], False)]),
        lambda: session.add_box(b - 40.0, b + 40.0),
        lambda: session.undo(),
        lambda: session.undo(),
    ]
    sizes = []
    for step in steps:
        update = step()
        assert update.mask.dtype == np.uint8 and len(update.start) == 3
        update.apply_to(viewer)
        np.testing.assert_array_equal(viewer, session.mask_array())
        sizes.append(np.prod(update.size))
    assert sizes[0] < viewer.size / 2  # four patches at most
    assert session.probability_in(update).shape == update.mask.shape


@pytest.mark.parametrize("start", ["empty", "initial mask"])
def test_the_mask_is_always_the_rendering_of_the_patches(chest, start):
    """However a call's regions are rendered (one pass over their enclosing box when they lie close, as
    cross-patch neighbours do; one pass each when far apart), the whole mask equals the patches' result
    where they decide, and the initial mask elsewhere."""
    from standins.networks import CrossPatchThresholdNet

    near = np.array(chest.TransformContinuousIndexToPhysicalPoint([250.0, 300.0, 70.0]))
    far = np.array(chest.TransformContinuousIndexToPhysicalPoint([60.0, 90.0, 15.0]))
    initial = None
    if start == "initial mask":
        array = np.zeros(chest.GetSize()[::-1], dtype=np.uint8)
        array[60:80, 250:350, 200:300] = 1
        initial = sitk.GetImageFromArray(array)
        initial.CopyInformation(chest)
    session = InteractiveSession(CrossPatchThresholdNet(), chest, device="cpu", max_patches=8, initial_mask=initial)
    steps = [lambda: session.add_click(near), lambda: session.add_click(far), lambda: session.undo(),
             lambda: session.set_clicks([(near, True), (far, True), (near + [5.0, 0.0, 0.0], False)])]
    for step in steps:
        step()
        expected = (sitk.GetArrayFromImage(session.probability()) > 0.5).astype(np.uint8)
        np.testing.assert_array_equal(session.mask_array(), expected)
    assert session.patch_count > 2


def test_a_click_or_undo_whose_rendering_fails_leaves_the_session_exactly_as_it_was(abdomen):
    """Rendering the mask is part of the call: when it fails (memory, a broken geometry) the click is not
    kept half-done, and undo still takes back the clicks before it."""
    session = InteractiveSession(ThresholdNet(), abdomen, device="cpu")
    centre = np.array(abdomen.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0]))
    session.add_click(centre)
    before, patches = session.mask_array(), [patch.probability for patch in session.patches]
    rendered = session._canvas._rendered
    failures = []

    def failing_once(*args, **kwargs):
        if not failures:
            failures.append(True)
            raise MemoryError("cannot allocate the rendering")
        return rendered(*args, **kwargs)

    session._canvas._rendered = failing_once
    far = np.array(abdomen.TransformContinuousIndexToPhysicalPoint([20.0, 20.0, 15.0]))
    with pytest.raises(MemoryError):
        session.add_click(far)
    assert len(session.clicks) == 1 and session.patch_count == 1
    assert [patch.probability for patch in session.patches] == patches
    np.testing.assert_array_equal(session.mask_array(), before)
    session.add_click(far)
    after_two = session.mask_array()
    failures.clear()
    with pytest.raises(MemoryError):
        session.undo()
    assert len(session.clicks) == 2 and session.patch_count == 2
    np.testing.assert_array_equal(session.mask_array(), after_two)
    session.undo()
    np.testing.assert_array_equal(session.mask_array(), before)
    session.undo()
    assert session.patch_count == 0 and not session.mask_array().any()
