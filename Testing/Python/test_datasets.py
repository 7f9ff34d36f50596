"""Case folders in every supported layout, their errors, and the real ../shared/data folders."""

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from CTSAM3DLib.datasets import (
    LAYOUT_LABEL_MAP,
    LAYOUT_MASKS,
    LAYOUT_TOTALSEGMENTATOR,
    LAYOUT_UNLABELLED,
    DatasetError,
    find_cases,
    load_case,
)

SHAPE_ZYX = (6, 7, 8)


def oblique_image(array, origin=(5.0, -3.0, 12.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.2, 2.5))
    image.SetOrigin(origin)
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), 0, np.sin(angle)], [0, -1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    image.SetDirection(direction.ravel().tolist())
    return image


def write_ct(folder):
    folder.mkdir(parents=True, exist_ok=True)
    ct = oblique_image(np.arange(np.prod(SHAPE_ZYX), dtype=np.int16).reshape(SHAPE_ZYX))
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"))
    return ct


def box_mask(value=1, slices=(slice(1, 3), slice(2, 5), slice(3, 7))):
    array = np.zeros(SHAPE_ZYX, np.uint8)
    array[slices] = value
    return array


def test_totalsegmentator_layout(tmp_path):
    write_ct(tmp_path / "s0001")
    (tmp_path / "s0001" / "segmentations").mkdir()
    sitk.WriteImage(oblique_image(box_mask(255)), str(tmp_path / "s0001" / "segmentations" / "liver.nii.gz"))
    sitk.WriteImage(oblique_image(box_mask(0)), str(tmp_path / "s0001" / "segmentations" / "aorta.nii.gz"))
    (case,) = find_cases(tmp_path)
    assert case.name == "s0001" and case.layout == LAYOUT_TOTALSEGMENTATOR
    assert case.structure_names == ["aorta", "liver"]
    liver, ct = case.load_structure("liver"), case.load_image()
    assert liver.GetPixelID() == sitk.sitkUInt8
    assert liver.GetSize() == ct.GetSize() and liver.GetDirection() == ct.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(liver), box_mask(1))
    assert sitk.GetArrayFromImage(case.load_structure("aorta")).sum() == 0
    label_map = sitk.GetArrayFromImage(case.load_label_map())
    assert set(np.unique(label_map)) == {0, case.structure_label_ids()["liver"]}


def test_label_map_layout_lists_only_present_ids(tmp_path):
    write_ct(tmp_path)
    labels = box_mask(3) + box_mask(7, (slice(4, 5), slice(0, 2), slice(0, 2)))
    sitk.WriteImage(oblique_image(labels), str(tmp_path / "labels.nii.gz"))
    table = "group,structure,id\na,background,0\na,spleen,3\nb,kidney,5\nb,liver,7\n"
    (tmp_path / "labels.csv").write_text(table)
    (case,) = find_cases(tmp_path)  # the root itself is a case
    assert case.layout == LAYOUT_LABEL_MAP and case.structure_names == ["liver", "spleen"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(case.load_structure("spleen")), box_mask(1))
    assert sitk.GetArrayFromImage(case.load_structure("liver")).sum() == 4
    with pytest.raises(DatasetError, match="kidney"):
        case.load_structure("kidney")


def test_single_masks_and_unlabelled_cases(tmp_path):
    write_ct(tmp_path / "a")
    sitk.WriteImage(oblique_image(box_mask()), str(tmp_path / "a" / "aorta.nii.gz"))
    write_ct(tmp_path / "b")
    (tmp_path / "notes").mkdir()  # a folder without images is not a case and not an error
    (tmp_path / "notes" / "readme.txt").write_text("x")
    first, second = find_cases(tmp_path)
    assert (first.layout, first.structure_names) == (LAYOUT_MASKS, ["aorta"])
    assert (second.layout, second.structure_names) == (LAYOUT_UNLABELLED, [])


def test_mask_on_another_grid_is_an_error(tmp_path):
    write_ct(tmp_path)
    sitk.WriteImage(oblique_image(box_mask(), origin=(5.0, -3.0, 14.0)), str(tmp_path / "aorta.nii.gz"))
    case = load_case(tmp_path)
    with pytest.raises(DatasetError, match="origin"):
        case.load_structure("aorta")


@pytest.mark.parametrize(
    "table, message",
    [
        (None, "labels.csv"),
        ("id,name\n3,spleen\n", "missing column"),
        ("id,structure\nthree,spleen\n", "not an integer"),
        ("id,structure\n3,spleen\n3,liver\n", "twice"),
        ("id,structure\n4,spleen\n", r"ids \[3\]"),
    ],
)
def test_malformed_label_tables(tmp_path, table, message):
    write_ct(tmp_path)
    sitk.WriteImage(oblique_image(box_mask(3)), str(tmp_path / "labels.nii.gz"))
    if table is not None:
        (tmp_path / "labels.csv").write_text(table)
    with pytest.raises(DatasetError, match=message):
        find_cases(tmp_path)


def test_malformed_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_cases(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no case folders"):
        find_cases(tmp_path)
    (tmp_path / "c1").mkdir()
    sitk.WriteImage(oblique_image(box_mask()), str(tmp_path / "c1" / "aorta.nii.gz"))
    with pytest.raises(DatasetError, match="no CT"):
        find_cases(tmp_path)
    write_ct(tmp_path / "c1")
    (tmp_path / "c1" / "segmentations").mkdir()
    with pytest.raises(DatasetError, match="no <structure>"):
        find_cases(tmp_path)
    sitk.WriteImage(oblique_image(box_mask()), str(tmp_path / "c1" / "labels.nii.gz"))
    with pytest.raises(DatasetError, match="both"):
        find_cases(tmp_path)


def test_shared_data_layouts(data_dir):
    cases = {case.name: case for case in find_cases(data_dir)}
    assert set(cases) == {"abdomen-ct-3mm", "aorta-ct-1.5mm", "body-ct-3mm", "chest-abdomen-ct"}
    assert len(cases["abdomen-ct-3mm"].structure_names) == 41  # of the table's 117 rows
    assert len(cases["chest-abdomen-ct"].structure_names) == 89
    assert cases["aorta-ct-1.5mm"].structure_names == ["aorta"]
    assert cases["body-ct-3mm"].structure_names == []
    case = cases["abdomen-ct-3mm"]
    spleen = case.load_structure("spleen")
    ct = case.load_image()
    assert spleen.GetSize() == ct.GetSize() and spleen.GetOrigin() == ct.GetOrigin()
    assert spleen.GetDirection() == ct.GetDirection()  # RAS-stored: x and y flipped in LPS
    assert ct.GetDirection()[0] == -1.0
    assert set(np.unique(sitk.GetArrayViewFromImage(spleen))) == {0, 1}
