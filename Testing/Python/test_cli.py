"""The ``ctsam3d segment`` command end to end, as the README shows it."""

import json
import re
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CTSAM3DLib.cli import build_parser, main, warnings_in_our_words
from CTSAM3DLib.commands.segment import collect_clicks


@pytest.fixture
def small_weights(random_weights):
    return random_weights


def test_segment_writes_a_mask_in_the_ct_geometry(tmp_path, data_dir, small_weights, capsys):
    image_path = data_dir / "abdomen-ct-3mm" / "ct.nii.gz"
    image = sitk.ReadImage(str(image_path))
    point_lps = image.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0])
    point_ras = (-point_lps[0], -point_lps[1], point_lps[2])
    output = tmp_path / "out" / "mask.nrrd"
    code = main([
        "segment", "--image", str(image_path), "--weights", str(small_weights), "--device", "cpu",
        "--point", ",".join(str(v) for v in point_ras), "--ras", "--max-patches", "2", "--precision", "float32",
        "--output", str(output),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "click 1 (+)" in printed and "decode" in printed and "encode" in printed
    assert "open: 1" in printed or "open: 2" in printed
    changed = re.search(r"changed: (\d+)x(\d+)x(\d+) voxels from index \((\d+), (\d+), (\d+)\)", printed)
    assert changed, printed
    mask = sitk.ReadImage(str(output))
    # Only what the click changed: inside the printed box, and nothing outside it.
    size, start = [int(v) for v in changed.groups()[:3]], [int(v) for v in changed.groups()[3:]]
    inside = np.zeros(image.GetSize()[::-1], dtype=bool)
    inside[tuple(slice(s, s + n) for s, n in zip(start[::-1], size[::-1]))] = True
    written = sitk.GetArrayFromImage(mask) != 0
    assert written[inside].any() and not written[~inside].any()
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection())
    np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_clicks_keep_command_line_order_and_read_files(tmp_path):
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("x,y,z,label\n1,2,3,1\n4,5,6,0\n")
    markups = tmp_path / "prompts.mrk.json"
    markups.write_text(json.dumps({"markups": [
        {"name": "positive", "coordinateSystem": "RAS", "controlPoints": [{"id": "1", "position": [10, 20, 30]}]},
        {"name": "negative prompts", "coordinateSystem": "LPS", "controlPoints": [{"id": "2", "position": [7, 8, 9]}]},
    ]}))
    args = build_parser().parse_args([
        "segment", "--image", "x", "--weights", "w", "--output", "o.nii.gz",
        "--negative", "0,0,1", "--points-file", str(csv_path), "--point=-1,-2,3",
        "--points-file", str(markups), "--negative-points-file", str(csv_path),
    ])
    assert collect_clicks(args) == [
        ((0.0, 0.0, 1.0), False),
        ((1.0, 2.0, 3.0), True), ((4.0, 5.0, 6.0), False),
        ((-1.0, -2.0, 3.0), True),
        ((-10.0, -20.0, 30.0), True), ((7.0, 8.0, 9.0), False),
        ((1.0, 2.0, 3.0), False), ((4.0, 5.0, 6.0), False),
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--point", "1,2"], "a point is X,Y,Z"),
        ([], "give at least one click"),
        (["--point", "1,2,3", "--image", "/nonexistent.nii.gz"], "image not found"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, small_weights, capsys, arguments, message):
    base = ["segment", "--image", str(tmp_path / "missing.nii.gz"), "--weights", str(small_weights),
            "--output", str(tmp_path / "o.nii.gz")]
    assert main(base + arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_click_outside_the_image_writes_nothing(tmp_path, data_dir, small_weights, capsys):
    output = tmp_path / "mask.nii.gz"
    code = main(["segment", "--image", str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"), "--weights",
                 str(small_weights), "--device", "cpu", "--point", "5000,0,0", "--output", str(output)])
    assert code == 2
    assert "lies outside the image" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_shows_its_own_warnings_and_none_from_torchs_internals(capsys):
    """torch warns about its own modules' use of its deprecated APIs (14 such lines in one GPU run);
    the project's warnings still reach the user, each as one line."""
    def method(self):
        return self

    with warnings_in_our_words("segment"):
        torch.jit.script_method(method)  # warns from inside torch, as its internals do
        warnings.warn("the image's lowest value is 12", stacklevel=1)
    printed = capsys.readouterr().err
    assert printed == "ctsam3d segment: warning: the image's lowest value is 12\n"


def test_a_click_that_reaches_several_patches_prints_its_progress(capsys):
    """A large organ takes seconds on a CPU: the command says how far each such click has got."""
    from test_cross_patch import rod_along_x, synthetic_ct

    from CTSAM3DLib import InteractiveSession
    from CTSAM3DLib.commands.segment import _prompt
    from standins.networks import CrossPatchThresholdNet

    session = InteractiveSession(CrossPatchThresholdNet(), synthetic_ct(rod_along_x()), device="cpu")
    _prompt(session, None, [((0.0, 0.0, 0.0), True)], None)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in printed[:2]] == [
        "  click 1: 1 of 3 patches decoded so far", "  click 1: 3 of 5 patches decoded so far"]
    assert printed[2].startswith("click 1 (+) at LPS (0.0, 0.0, 0.0)") and "patches decoded: 5" in printed[2]
