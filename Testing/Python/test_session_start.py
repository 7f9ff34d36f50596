"""Correcting what exists (issue 14): a session that starts from an existing mask, and box prompts.
Real CTs of ../shared/data, stand-in networks with exactly known answers, and the real network."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_cross_patch import rod_along_x, synthetic_ct

from CTSAM3DLib.session import InteractiveSession, SessionInputError
from standins.networks import PromptFollowingNet, ThresholdNet


@pytest.fixture(scope="module")
def liver(data_dir, abdomen):
    """The liver of the abdomen CT's labels (TotalSegmentator id 5), on the CT's grid."""
    labels = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "labels.nii.gz"))
    mask = sitk.Cast(labels == 5, sitk.sitkUInt8)
    mask.CopyInformation(abdomen)
    assert sitk.GetArrayViewFromImage(mask).sum() > 1000, "the liver must be in the labels"
    return mask


def region_mask(session, shape):
    inside = np.zeros(shape, bool)
    for patch in session.patches:
        inside[patch.region.slices] = True
    return inside


def test_the_initial_mask_is_the_result_and_survives_outside_clicked_patches(abdomen, liver):
    initial = sitk.GetArrayFromImage(liver)
    session = InteractiveSession(PromptFollowingNet(), abdomen, device="cpu", initial_mask=liver, cross_patch=False)
    np.testing.assert_array_equal(session.mask_array(), initial)
    # A click at the far end of the scan from the liver: its patch leaves most of the liver alone.
    far = abdomen.TransformContinuousIndexToPhysicalPoint((110.0, 50.0, 15.0))
    session.add_click(far, positive=True)
    touched = region_mask(session, initial.shape)
    assert touched.any() and (initial & ~touched).any()
    np.testing.assert_array_equal(session.mask_array()[~touched], initial[~touched])
    session.undo()
    np.testing.assert_array_equal(session.mask_array(), initial)


def test_clicks_edit_the_existing_mask_through_the_mask_prompt(abdomen, liver):
    initial = sitk.GetArrayFromImage(liver).astype(bool)
    net = PromptFollowingNet(radius=4.0)
    session = InteractiveSession(net, abdomen, device="cpu", initial_mask=liver, cross_patch=False)
    inside = np.argwhere(initial)
    centre_zyx = inside[len(inside) // 2]
    centre = abdomen.TransformIndexToPhysicalPoint([int(v) for v in centre_zyx[::-1]])
    session.add_click(centre, positive=False)
    # The decoder was given the existing mask as its prompt, and a negative click carved a hole in it.
    assert net.prompts[0] is not None and float(net.prompts[0].max()) == 1.0
    after = session.mask_array().astype(bool)
    assert not after[tuple(centre_zyx)] and initial[tuple(centre_zyx)]
    touched = region_mask(session, initial.shape)
    dice = 2 * (after & initial & touched).sum() / ((after & touched).sum() + (initial & touched).sum())
    assert dice > 0.95, dice
    session.add_click(centre, positive=True)
    assert session.mask_array()[tuple(centre_zyx)]
    session.undo()
    session.undo()
    np.testing.assert_array_equal(session.mask_array(), initial)


def test_cross_patch_prompting_goes_only_where_a_click_changed_the_mask():
    image = synthetic_ct(rod_along_x())
    rod = sitk.Cast(image > 50, sitk.sitkUInt8)
    session = InteractiveSession(PromptFollowingNet(radius=3.0), image, device="cpu", initial_mask=rod)
    session.add_click([0.0, 0.0, 0.0])  # inside the rod: the ball changes nothing that reaches a face
    assert session.patch_count == 1
    np.testing.assert_array_equal(session.mask_array(), sitk.GetArrayFromImage(rod))
    session.reset(rod)
    session.add_click([0.0, 11.0, 0.0])  # beside the rod: a change, but far from the patch's faces
    assert session.patch_count == 1
    face = session.patches[0].geometry.to_world((63.0, 32.0, 32.0))
    session.add_click(face)  # a change that reaches the +x face is carried into that neighbour
    assert session.patch_count == 2 and session.patches[1].offset == (1, 0, 0)


def test_an_initial_mask_on_another_grid_is_refused(abdomen):
    shifted = sitk.Image(abdomen.GetSize(), sitk.sitkUInt8)
    shifted.CopyInformation(abdomen)
    shifted.SetOrigin([v + 1.0 for v in abdomen.GetOrigin()])
    with pytest.raises(SessionInputError, match="resample it onto the image first"):
        InteractiveSession(ThresholdNet(), abdomen, device="cpu", initial_mask=shifted)


def test_a_box_clicks_its_centre_clips_the_result_and_confines_propagation(abdomen):
    session = InteractiveSession(ThresholdNet(), abdomen, device="cpu")
    low = np.array(abdomen.TransformContinuousIndexToPhysicalPoint((40.0, 30.0, 5.0)))
    high = np.array(abdomen.TransformContinuousIndexToPhysicalPoint((80.0, 70.0, 25.0)))
    session.add_box(low, high)
    box_low, box_high = np.minimum(low, high), np.maximum(low, high)
    assert session.clicks[0].positive and np.allclose(session.clicks[0].point_lps, (box_low + box_high) / 2)
    mask = session.mask_array().astype(bool)
    assert mask.any()
    index = np.argwhere(mask)[:, ::-1].astype(float)
    world = np.array([abdomen.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    assert np.all(world >= box_low - 1e-6) and np.all(world <= box_high + 1e-6), "the result leaves the box"
    unclipped = InteractiveSession(ThresholdNet(), abdomen, device="cpu")
    unclipped.add_click((box_low + box_high) / 2)
    assert unclipped.mask_array().sum() > mask.sum(), "the box clipped nothing"
    for patch in session.patches:
        start = np.array(patch.geometry.origin_lps) - 0.75
        stop = start + 96.0
        assert np.all(stop > box_low) and np.all(start < box_high), "a patch outside the box was opened"
    session.undo()
    assert session.box_lps is None and not session.mask_array().any()
    with pytest.raises(SessionInputError, match="flat"):
        session.add_box(low, [low[0], high[1], high[2]])


def test_the_real_network_starts_from_a_mask_and_undo_returns_to_it(abdomen, liver):
    from CTSAM3DLib.model import build_model
    from CTSAM3DLib.reference_weights import deterministic_state_dict

    network = build_model("tiny")
    network.load_state_dict(deterministic_state_dict(network))
    initial = sitk.GetArrayFromImage(liver)
    session = InteractiveSession(network, abdomen, device="cpu", initial_mask=liver, cross_patch=False)
    far = abdomen.TransformContinuousIndexToPhysicalPoint((110.0, 50.0, 15.0))
    session.add_click(far)
    touched = region_mask(session, initial.shape)
    np.testing.assert_array_equal(session.mask_array()[~touched], initial[~touched])
    session.undo()
    np.testing.assert_array_equal(session.mask_array(), initial)


def test_the_command_starts_from_a_mask_and_takes_a_box(tmp_path, data_dir, abdomen, liver, random_weights, capsys):
    from CTSAM3DLib.cli import main

    initial_path = tmp_path / "liver.nii.gz"
    sitk.WriteImage(liver, str(initial_path))
    image_path = data_dir / "abdomen-ct-3mm" / "ct.nii.gz"
    far = abdomen.TransformContinuousIndexToPhysicalPoint((110.0, 50.0, 15.0))
    output = tmp_path / "corrected.nii.gz"
    assert main(["segment", "--image", str(image_path), "--weights", str(random_weights), "--device", "cpu",
                 "--cross-patch", "off", "--initial-mask", str(initial_path), "--point", ",".join(map(str, far)),
                 "--output", str(output)]) == 0
    assert "starting from" in capsys.readouterr().out
    corrected = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    initial = sitk.GetArrayFromImage(liver)
    # The click's one patch is 96 mm around it: the liver's voxels farther than that from it are untouched.
    index = np.argwhere(initial)[:, ::-1].astype(float)
    world = np.array([abdomen.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    far_voxels = np.any(np.abs(world - np.array(far)) > 96.0 / 2 + 1.5, axis=1)
    assert far_voxels.any()
    z, y, x = np.argwhere(initial)[far_voxels].T
    assert corrected[z, y, x].all()

    low = np.array(abdomen.TransformContinuousIndexToPhysicalPoint((40.0, 30.0, 5.0)))
    high = np.array(abdomen.TransformContinuousIndexToPhysicalPoint((80.0, 70.0, 25.0)))
    ras = [-low[0], -low[1], low[2], -high[0], -high[1], high[2]]
    boxed = tmp_path / "boxed.nii.gz"
    assert main(["segment", "--image", str(image_path), "--weights", str(random_weights), "--device", "cpu",
                 "--box", ",".join(f"{v:.3f}" for v in ras), "--ras", "--output", str(boxed)]) == 0
    assert "box, centre at LPS" in capsys.readouterr().out
    assert main(["segment", "--image", str(image_path), "--weights", str(random_weights), "--box", "1,2,3",
                 "--output", str(tmp_path / "x.nii.gz")]) == 2
    assert "a box is X1,Y1,Z1,X2,Y2,Z2" in capsys.readouterr().err


@pytest.mark.parametrize("orientation", ["as stored", "flipped", "oblique"])
def test_the_initial_mask_sampled_on_the_device_is_the_exact_paths(abdomen, liver, orientation):
    """With device sampling the start mask lives where the network runs (DeviceVolume.for_mask, uint8):
    each patch's first mask prompt equals Lattice.sample_mask's bit for bit, in patches inside, across
    and beside the liver, and the session's masks after clicks are the exact path's."""
    from test_inference import reoriented

    from CTSAM3DLib.geometry import DeviceVolume, Lattice

    name = {"as stored": "original"}.get(orientation, orientation)
    image, mask = reoriented(abdomen, name), reoriented(liver, name)
    lattice = Lattice.of_image(image)
    device_mask = DeviceVolume.for_mask(mask, lattice, torch.device("cpu"))
    exact_image = sitk.Cast(mask, sitk.sitkFloat32)
    inside = np.argwhere(sitk.GetArrayViewFromImage(mask))
    centre = image.TransformIndexToPhysicalPoint([int(v) for v in inside[len(inside) // 2][::-1]])
    geometry = lattice.patch_centred_on(lattice.nearest_index(centre))
    for patch in (geometry, geometry.shifted((1, 0, 0)), geometry.shifted((-1, -1, 0)), geometry.shifted((3, 3, 3))):
        np.testing.assert_array_equal(device_mask.sample([patch])[0].numpy(), lattice.sample_mask(exact_image, patch))
    masks = []
    for sampling in ("exact", "device"):
        session = InteractiveSession(PromptFollowingNet(), image, device="cpu", initial_mask=mask, cross_patch=False,
                                     sampling=sampling)
        session.add_click(centre, positive=False)
        session.add_click(np.add(centre, (20.0, 0.0, 0.0)), positive=True)
        masks.append(session.mask_array().astype(bool))
    exact, on_device = masks
    assert 2 * (exact & on_device).sum() / (exact.sum() + on_device.sum()) >= 0.999
