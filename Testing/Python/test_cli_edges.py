"""The command line and the Python API as a careful user finds them (issue 11): negative coordinates,
NaN voxels, plain messages, output checks before any work, file permissions, what "auto" chose,
timings that add up, no raw ITK warnings, uneven and tilted DICOM series, any network, help texts and
the evaluation summary."""

import os
import re
import stat
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dicom_series import write_ct_series

from CTSAM3DLib import __version__
from CTSAM3DLib.cli import attach_negative_values, build_parser, main
from CTSAM3DLib.commands.segment import collect_clicks
from CTSAM3DLib.image_files import read_image
from CTSAM3DLib.inference import choose_precision
from CTSAM3DLib.session import InteractiveSession, SessionInputError
from standins.networks import CrossPatchThresholdNet, ThresholdNet


@pytest.fixture
def weights(random_weights):
    return random_weights


@pytest.fixture
def abdomen(data_dir):
    return data_dir / "abdomen-ct-3mm" / "ct.nii.gz"


def centre_lps(path):
    image = sitk.ReadImage(str(path))
    return image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()])


def segment(image, weights, output, *extra):
    return main(["segment", "--image", str(image), "--weights", str(weights), "--device", "cpu",
                 "--max-patches", "1", "--output", str(output), *extra])


# 1 ---------------------------------------------------------------- negative coordinates
def test_negative_coordinates_are_typed_as_they_are():
    argv = ["segment", "--image", "ct.nii.gz", "--weights", "w.pth", "--output", "o.nii.gz",
            "--point", "-103.0,-183.6,-784.5", "--negative", "-1,2.5,-3e1", "--point", "4,-5,6"]
    args = build_parser().parse_args(attach_negative_values(argv))
    assert collect_clicks(args) == [
        ((-103.0, -183.6, -784.5), True), ((-1.0, 2.5, -30.0), False), ((4.0, -5.0, 6.0), True)
    ]
    assert attach_negative_values(["--output", "x", "--", "--point", "-1,2,3"])[-2:] == ["--point", "-1,2,3"]


def test_the_command_takes_a_negative_point_after_a_space(tmp_path, abdomen, weights, capsys):
    x, y, z = centre_lps(abdomen)
    assert x < 0 or y < 0 or z < 0, "the test needs a negative coordinate"
    assert segment(abdomen, weights, tmp_path / "m.nii.gz", "--point", f"{x},{y},{z}") == 0
    assert "click 1 (+)" in capsys.readouterr().out


# 2 ---------------------------------------------------------------- NaN
def nan_image(path, fraction_slices):
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[: int(round(fraction_slices * array.shape[0]))] = np.nan
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def test_all_nan_is_refused_and_some_nan_is_treated_as_outside_and_said(tmp_path, abdomen, weights, capsys):
    all_nan = tmp_path / "all.nii.gz"
    sitk.WriteImage(nan_image(abdomen, 1.0), str(all_nan))
    assert segment(all_nan, weights, tmp_path / "a.nii.gz", "--point", "0,0,0") == 2
    assert "every voxel of the image is NaN" in capsys.readouterr().err

    some_nan = tmp_path / "some.nii.gz"
    image = nan_image(abdomen, 0.2)
    sitk.WriteImage(image, str(some_nan))
    expected = int(np.isnan(sitk.GetArrayViewFromImage(image)).sum())
    assert segment(some_nan, weights, tmp_path / "s.nii.gz", "--point", ",".join(map(str, centre_lps(abdomen)))) == 0
    err = capsys.readouterr().err
    assert f"ctsam3d segment: warning: the image holds {expected} NaN or infinite voxels" in err
    assert "treated as outside the scan (-1024 HU)" in err and "UserWarning" not in err
    with pytest.warns(UserWarning, match=f"holds {expected} NaN or infinite voxels"):
        session = InteractiveSession(ThresholdNet(), image, device="cpu")
    assert np.isfinite(sitk.GetArrayViewFromImage(session.image)).all()


# 3 ---------------------------------------------------------------- plain numbers in messages
def test_messages_print_plain_numbers_and_say_where_the_image_lies(abdomen):
    image = sitk.ReadImage(str(abdomen))
    session = InteractiveSession(ThresholdNet(), image, device="cpu")
    with pytest.raises(SessionInputError) as caught:
        session.add_click([5000.0, 5000.0, 1.25])
    message = str(caught.value)
    assert "np." not in message and "click at LPS (5000.0, 5000.0, 1.2) mm lies outside the image" in message
    corners = ([-0.5] * 3, [s - 0.5 for s in image.GetSize()])
    low = np.min([image.TransformContinuousIndexToPhysicalPoint(c) for c in corners], axis=0)
    assert re.search(r"spans LPS x -?\d+\.\d to -?\d+\.\d, y .* z .* mm", message)
    assert f"x {low[0]:.1f} to" in message
    with pytest.raises(SessionInputError, match=r"got \(nan, 1, 2\)"):
        session.add_click([float("nan"), 1.0, 2.0])


# 4 and 6 --------------------------------------------------- checks before any work
@pytest.mark.parametrize("name, message", [
    ("o.xyz", "cannot tell the image format"),
    ("o12", "cannot tell the image format"),
])
def test_outputs_are_checked_before_anything_loads(tmp_path, abdomen, name, message, capsys):
    # The weights do not even exist: the output's error must come first.
    assert segment(abdomen, tmp_path / "missing.pth", tmp_path / name, "--point", "1,2,3") == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / name) in err and "partial" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_leaves_no_folder_and_no_file(tmp_path, abdomen, weights, capsys):
    output = tmp_path / "new" / "deeper" / "o.nii.gz"
    assert segment(abdomen, weights, output, "--point", "5000,0,0") == 2
    assert "lies outside the image" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_refused_first(tmp_path, abdomen, weights, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.fail("this test needs a user without the right to write into a 0500 folder (not root)"
                        ) if os.geteuid() != 0 else None
        else:
            assert segment(abdomen, weights, locked / "o.nii.gz", "--point", "1,2,3") == 2
            assert "no permission to write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert segment(abdomen, weights, tmp_path / "o.nii.gz", "--point", "1,2,3") == 2
    assert "lies outside" in capsys.readouterr().err


@pytest.mark.parametrize("problem, message", [
    ("2d", "expected a 3D image"),
    ("constant", "the image is constant"),
])
def test_bad_images_are_refused_before_the_weights_load(tmp_path, problem, message, capsys):
    if problem == "2d":
        image = sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(8, 8))
    else:
        image = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16))
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(path))
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a checkpoint: loading it would fail")
    assert segment(path, garbage, tmp_path / "o.nii.gz", "--point", "1,2,3") == 2
    err = capsys.readouterr().err
    assert message in err and "checkpoint" not in err


# 5 ---------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_the_usual_permissions(tmp_path, abdomen, weights, umask):
    previous = os.umask(umask)
    try:
        mask, probability, reference = tmp_path / "m.nrrd", tmp_path / "p.nii.gz", tmp_path / "r.pth"
        point = ",".join(map(str, centre_lps(abdomen)))
        assert segment(abdomen, weights, mask, "--point", point, "--probability", str(probability)) == 0
        assert main(["reference-weights", "--output", str(reference)]) == 0
    finally:
        os.umask(previous)
    for path in (mask, probability, reference):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# 7 and 8 ---------------------------------------------------------- what ran, and when
def test_the_output_says_what_auto_chose_and_timings_add_up(tmp_path, abdomen, weights, capsys):
    assert segment(abdomen, weights, tmp_path / "m.nii.gz", "--point", ",".join(map(str, centre_lps(abdomen)))) == 0
    out = capsys.readouterr().out
    assert f"device: cpu, precision: {choose_precision(torch.device('cpu'))} (auto)" in out
    line = next(line for line in out.splitlines() if line.startswith("click 1"))
    steps = dict((name, float(ms)) for name, ms in re.findall(r"(\w+) (\d+) ms", line))
    total = steps.pop("total")
    assert sum(steps.values()) <= total + len(steps), line


def test_cross_patch_time_leaves_out_the_network_it_runs():
    image = sitk.GetImageFromArray(np.where(np.abs(np.arange(140) - 70)[None, None, :] < 60, 300, -1000)
                                   * np.ones((30, 30, 1)), isVector=False)
    image = sitk.Cast(image, sitk.sitkInt16)
    image.SetSpacing((2.0, 2.0, 2.0))
    session = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu")
    session.add_click(image.TransformContinuousIndexToPhysicalPoint((70, 15, 15)))
    timing = session.last_timing
    assert timing["patches_decoded"] > 1, "the click must propagate"
    steps = sum(seconds for name, seconds in timing.items() if name != "total" and not name.startswith("patches_"))
    assert timing["cross_patch"] >= 0 and steps <= timing["total"] * 1.001


# 9 ---------------------------------------------------------------- ITK's own noise
def test_itk_warnings_never_reach_the_user(tmp_path, weights, capfd):
    empty = tmp_path / "empty-dicom"
    empty.mkdir()
    assert segment(empty, weights, tmp_path / "o.nii.gz", "--point", "1,2,3") == 2
    err = capfd.readouterr().err
    assert "holds no DICOM series" in err and "WARNING: In" not in err and "SimpleITK-build" not in err


# 10 --------------------------------------------------------------- DICOM series geometry
EVEN = [float(z) for z in np.arange(-30.0, 31.0, 2.0)]
SERIES = {
    "even": EVEN,
    "missing slice": [z for z in EVEN if z != 4.0],
    "variable gaps": [-30.0, -28.9, -27.8, -20.8, -13.8, -12.7, -5.7, 1.3, 2.4, 9.4, 16.4, 17.5, 24.5, 31.5],
}
SPHERE_LPS = (3.0, -4.5, 5.0)


def mask_centroid_lps(image, mask_array):
    index = np.argwhere(mask_array)[:, ::-1].mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))


@pytest.mark.parametrize("kind", sorted(SERIES))
def test_dicom_slices_stay_where_the_scanner_put_them(tmp_path, kind, capfd):
    folder = write_ct_series(tmp_path / "series", SERIES[kind], centre_lps=SPHERE_LPS, radius_mm=20.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(folder)
    assert "WARNING: In" not in capfd.readouterr().err, "ITK's own warning reached the user"
    gaps = np.diff(SERIES[kind])
    if kind == "even":
        assert caught == [] and image.GetSpacing()[2] == pytest.approx(2.0)
    else:
        (warning,) = caught
        assert "unevenly spaced" in str(warning.message) and f"{gaps.max():.2f} mm" in str(warning.message)
        assert image.GetSpacing()[2] == pytest.approx(gaps.min())
    assert np.allclose(image.GetOrigin(), (-36.0, -36.0, SERIES[kind][0]))
    session = InteractiveSession(ThresholdNet(), image, device="cpu", cross_patch=False)
    session.add_click(SPHERE_LPS)
    found = mask_centroid_lps(image, session.mask_array().astype(bool))
    assert np.linalg.norm(found - SPHERE_LPS) < 1.0, found
    plain = sitk.ImageSeriesReader()
    plain.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    stacked = plain.Execute()
    if kind == "variable gaps":
        misplaced = mask_centroid_lps(stacked, sitk.GetArrayViewFromImage(stacked) > 0)
        assert np.linalg.norm(misplaced - SPHERE_LPS) > 2.0, "SimpleITK's plain stacking misplaces these slices"
    else:
        # Every slice of the file is in the image, unchanged, at its own position.
        ours, theirs = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(stacked)
        for number, z in enumerate(SERIES[kind]):
            np.testing.assert_array_equal(ours[int(round((z - SERIES[kind][0]) / 2.0))], theirs[number])


def test_a_tilted_series_is_refused_with_its_angle(tmp_path):
    folder = write_ct_series(tmp_path / "tilted", EVEN, tilt_degrees=15.0)
    with pytest.raises(ValueError, match=r"gantry tilt of about 15\.0 degrees"):
        read_image(folder)


def test_the_command_writes_the_mask_on_the_even_grid_and_says_so(tmp_path, weights, capsys):
    folder = write_ct_series(tmp_path / "series", SERIES["variable gaps"], centre_lps=SPHERE_LPS, radius_mm=20.0)
    output = tmp_path / "mask.nii.gz"
    assert segment(folder, weights, output, "--point", ",".join(map(str, SPHERE_LPS))) == 0
    assert "warning:" in capsys.readouterr().err
    mask = sitk.ReadImage(str(output))
    assert mask.GetSpacing()[2] == pytest.approx(1.1) and mask.GetSize()[2] == 56
    assert np.allclose(mask.GetOrigin(), (-36.0, -36.0, -30.0), atol=1e-3)


# 11 --------------------------------------------------------------- any network
class UserNet(torch.nn.Module):
    """A user's own network with the session's interface, but not CT-SAM3D's modules."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def encode(self, image):
        return [image * self.scale]

    def decode(self, features, points, labels, mask_prompt=None):
        probability = (features[0] > 0.5).to(features[0].dtype)
        return probability, torch.zeros(features[0].shape[0], 1)


def test_any_module_with_encode_and_decode_runs_as_it_is(abdomen):
    image = sitk.ReadImage(str(abdomen))
    session = InteractiveSession(UserNet(), image, device="cpu")
    assert session.precision == "float32" and isinstance(session.net, UserNet)
    session.add_click(centre_lps(abdomen))
    with pytest.raises(ValueError, match="built for the CT-SAM3D network"):
        InteractiveSession(UserNet(), image, device="cpu", precision="int8")


# 12 --------------------------------------------------------------- help and version
def test_version_and_help_show_defaults_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ctsam3d {__version__}"
    for command, default, example in [
        ("segment", "(default: 16)", "ctsam3d segment --image ct.nii.gz"),
        ("evaluate", "(default: 10)", "ctsam3d evaluate --weights"),
        ("train", "--write-example-config", "ctsam3d train --config run.json"),
        ("reference-weights", "(default: tiny)", "ctsam3d reference-weights --output"),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert default in text and example in text, command
        assert "``" not in text and "Resources/" not in text and "(default: None)" not in text


def test_train_writes_an_example_configuration_that_loads_once_data_is_named(tmp_path, capsys):
    import json

    from CTSAM3DLib.training.config import load_config

    path = tmp_path / "run.json"
    assert main(["train", "--write-example-config", str(path)]) == 0
    values = json.loads(path.read_text())
    values["data"]["root"] = str(tmp_path)
    path.write_text(json.dumps(values))
    assert load_config(path).data.root == str(tmp_path)
    assert main(["train", "--write-example-config", str(path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["train"]) == 2 and "--config FILE" in capsys.readouterr().err
