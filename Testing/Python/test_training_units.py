"""Training building blocks: configuration, lattice cache, sampling, augmentation, losses, RNG states."""

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CTSAM3DLib.checkpoint import read_checkpoint, save_checkpoint
from CTSAM3DLib.datasets import find_cases
from CTSAM3DLib.geometry import Lattice
from CTSAM3DLib.training.augment import Affine, cut_patch, rotation_matrix
from CTSAM3DLib.training.cache import build_cached_case
from CTSAM3DLib.training.config import ConfigError, TrainingConfig, config_from_dict, load_config
from CTSAM3DLib.training.losses import dice_loss, dice_score, focal_loss, heatmap_loss
from CTSAM3DLib.training.rng import capture_rng_state, restore_rng_state
from CTSAM3DLib.training.sampler import PatchSampler
from CTSAM3DLib.training.step import swap_pairs
from CTSAM3DLib.training.trainer import learning_rate, split_cases

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO_ROOT / "Resources" / "Training" / "example.toml"


# -- configuration ---------------------------------------------------------------------------


def test_defaults_are_the_authors_recipe():
    config = config_from_dict({"data": {"root": "x"}})
    assert config.augmentation.probability == 0.6
    assert config.augmentation.shift_mm == 20.0
    assert config.augmentation.scale == [0.9, 1.1]
    assert config.augmentation.rotation_degrees == 10.0
    assert (config.clicks.iterations, config.clicks.max_clicks) == (5, 24)
    assert (config.loss.focal_weight, config.loss.dice_weight) == (0.2, 0.8)
    assert (config.loss.focal_alpha, config.loss.focal_gamma) == (0.8, 2.0)
    assert config.optimisation.learning_rate == 1e-4
    assert config.optimisation.gradient_clip == 5.0
    assert config.optimisation.batch_size == 6
    assert config.data.patches_per_volume == 8


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": {"root": "x", "rooot": 1}}, "unknown setting"),
        ({"data": {"root": "x"}, "optimiser": {}}, "unknown section"),
        ({"data": {"root": "x"}, "optimisation": {"batch_size": "6"}}, "must be an integer"),
        ({"data": {"root": "x"}, "optimisation": {"batch_size": 5}}, "even"),
        ({"data": {"root": "x"}, "loss": {"cross_patch": 1}}, "true or false"),
        ({"data": {"root": "x"}, "augmentation": {"probability": 1.5}}, "probability"),
        ({"data": {}}, "data.root is required"),
    ],
)
def test_bad_settings_are_refused_by_name(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_json_config_resolves_paths_against_its_folder(tmp_path):
    path = tmp_path / "sub" / "run.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"data": {"root": "../data"}, "run": {"output_dir": "out"}}))
    config = load_config(path)
    assert Path(config.data.root) == (tmp_path / "data").resolve()
    assert Path(config.run.output_dir) == (tmp_path / "sub" / "out").resolve()


def test_python_config_is_refused(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("data = {}")
    with pytest.raises(ConfigError, match="unsupported configuration format"):
        load_config(path)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TOML is read with tomllib (Python 3.11+)")
def test_example_config_loads_with_recipe_values():
    config = load_config(EXAMPLE_CONFIG)
    defaults = TrainingConfig()
    assert config.optimisation == defaults.optimisation
    assert config.clicks == defaults.clicks
    assert config.loss == defaults.loss
    assert Path(config.data.root).resolve() == (REPO_ROOT.parent / "shared" / "data").resolve()


def test_learning_rate_warms_up_then_decays_in_steps():
    config = config_from_dict({"data": {"root": "x"}, "optimisation": {"warmup_steps": 10, "decay_every": 100}})
    rates = [learning_rate(step, config) for step in (0, 4, 9, 10, 109, 110, 210)]
    assert rates[0] == pytest.approx(1e-5)
    assert rates[1] == pytest.approx(5e-5)
    assert rates[2] == rates[3] == rates[4] == pytest.approx(1e-4)
    assert rates[5] == pytest.approx(5e-5)
    assert rates[6] == pytest.approx(2.5e-5)


def test_split_is_by_case_and_never_empties_training():
    config = config_from_dict({"data": {"root": "x", "validation_fraction": 0.3}})
    training, held_out = split_cases([f"case{i}" for i in range(10)], config)
    assert len(held_out) == 3 and not set(training) & set(held_out)
    assert split_cases([f"case{i}" for i in range(10)], config) == (training, held_out)
    config = config_from_dict({"data": {"root": "x", "validation_cases": ["nope"]}})
    with pytest.raises(ConfigError, match="unknown case"):
        split_cases(["a", "b"], config)


# -- lattice cache ---------------------------------------------------------------------------


def _oblique_case(folder: Path) -> None:
    """A flipped, oblique scan with a ball in TotalSegmentator layout."""
    size = (40, 36, 30)
    z, y, x = np.mgrid[: size[2], : size[1], : size[0]]
    ball = ((x - 20) ** 2 + (y - 15) ** 2 + ((z - 14) * 1.5) ** 2) < 60
    image = sitk.GetImageFromArray((np.where(ball, 200, -100) + x).astype(np.int16))
    direction = rotation_matrix([1, 2, 3], 0.4) @ np.diag([-1.0, 1.0, -1.0])
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((1.2, 0.9, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    mask.CopyInformation(image)
    (folder / "segmentations").mkdir(parents=True)
    sitk.WriteImage(image, str(folder / "ct.nii.gz"))
    sitk.WriteImage(mask, str(folder / "segmentations" / "ball.nii.gz"))


def test_cache_matches_the_lattice_on_an_oblique_flipped_scan(tmp_path):
    _oblique_case(tmp_path / "data" / "oblique")
    case = find_cases(tmp_path / "data")[0]
    cached = build_cached_case(case, tmp_path / "cache")
    image = case.load_image()
    lattice = Lattice.of_image(image)
    assert cached.size_zyx == lattice.size[::-1]
    assert cached.origin_lps == pytest.approx(lattice.origin_lps)
    # A patch cut from the cache equals the source resampled directly onto that patch's lattice
    # voxels (integer scans are resampled in their pixel type, hence 1 HU of rounding; ITK decides
    # voxels on the scan's very edge differently for a whole row and for a patch, hence a handful
    # of edge voxels, inside on one side and -1024 on the other).
    centre_xyz = np.array(lattice.size) // 2
    patch = lattice.patch_centred_on(centre_xyz)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(image, [64] * 3, sitk.Transform(), sitk.sitkLinear, patch.origin_lps, [1.5] * 3,
                      np.eye(3).ravel().tolist(), -1024.0, image.GetPixelID())
    )
    hounsfield, mask = cut_patch(cached, "ball", tuple(int(v) for v in centre_xyz[::-1]))
    differs = np.abs(hounsfield.numpy() - expected) > 1.0
    assert differs.sum() < 30
    assert np.all((hounsfield.numpy()[differs] == -1024) | (expected[differs] == -1024))
    # The ball lands where the source mask is: compare voxel counts (volume in mm^3) and centroid.
    source = sitk.GetArrayFromImage(case.load_structure("ball")).astype(bool)
    source_volume = source.sum() * np.prod(image.GetSpacing())
    lattice_volume = cached.structures["ball"].voxels * 1.5**3
    assert lattice_volume == pytest.approx(source_volume, rel=0.2)
    indices = np.argwhere(source)[:, ::-1].mean(axis=0)
    source_centroid = np.array(image.TransformContinuousIndexToPhysicalPoint(indices.tolist()))
    entry = cached.structures["ball"]
    box_centroid = np.argwhere(cached.structure_box("ball")).mean(axis=0) + entry.start
    lattice_centroid = np.array(cached.origin_lps) + box_centroid[::-1] * 1.5
    assert np.abs(lattice_centroid - source_centroid).max() < 1.0
    # A second build reuses the folder; nothing half-written is left behind.
    assert build_cached_case(case, tmp_path / "cache").folder == cached.folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.folder.name]


# -- sampling and augmentation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def abdomen_cache(data_dir, tmp_path_factory):
    cases = find_cases(data_dir / "abdomen-ct-3mm") + find_cases(data_dir / "aorta-ct-1.5mm")
    cache = tmp_path_factory.getbasetemp() / "training-cache"
    return [build_cached_case(case, cache) for case in cases]


def _sampler(cases, paired=True, probability=0.6):
    config = config_from_dict({"data": {"root": "x"}, "augmentation": {"probability": probability}})
    return PatchSampler(cases, config.data, config.augmentation, seed=3, paired=paired)


def test_units_are_a_function_of_their_index_and_ranks_partition_the_batch(abdomen_cache):
    sampler = _sampler(abdomen_cache)
    again = _sampler(abdomen_cache)
    assert [sampler.unit(u) for u in range(6)] == [again.unit(u) for u in range(6)]
    union = sampler.units_for(5, 0, 2, 4) + sampler.units_for(5, 1, 2, 4)
    assert union == sampler.units_for(5, 0, 1, 8)


def test_structures_are_balanced_by_name_not_by_volume(abdomen_cache):
    sampler = _sampler(abdomen_cache, paired=False, probability=0.0)
    counts = {}
    for unit in range(0, 8 * 1500, 8):  # the first unit of each visit carries the visit's draw
        name = sampler.unit(unit).structure
        counts[name] = counts.get(name, 0) + 1
    names = sampler.structure_names
    expected = 1500 / len(names)
    smallest = min(names, key=lambda n: min(c.structures[n].voxels for c in abdomen_cache if n in c.structures))
    largest = max(names, key=lambda n: max(c.structures[n].voxels for c in abdomen_cache if n in c.structures))
    for name in (smallest, largest):
        assert abs(counts.get(name, 0) - expected) < 4 * math.sqrt(expected), (name, counts.get(name, 0), expected)


def test_pairs_are_neighbours_holding_the_structure(abdomen_cache):
    sampler = _sampler(abdomen_cache)
    adjacent = 0
    for unit in range(12):
        request = sampler.unit(unit)
        images, masks = sampler.cut(request)
        assert images.shape == masks.shape == (2, 1, 64, 64, 64)
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert all(bool(m.any()) for m in masks)
        offset = np.abs(np.array(request.centres[1]) - np.array(request.centres[0]))
        # Mostly the session's neighbour geometry (one patch step along 1-3 axes); a structure
        # inside one patch pairs two patches within it.
        adjacent += set(offset.tolist()) <= {0, 64} and offset.max() == 64
        assert offset.max() <= 64
    assert adjacent >= 6


def test_identity_and_rotated_cuts_agree_with_the_lattice(abdomen_cache):
    case = abdomen_cache[1]
    structure = "aorta"
    entry = case.structures[structure]
    centre = tuple(int(s + n // 2) for s, n in zip(entry.start, entry.shape))
    plain_hu, plain_mask = cut_patch(case, structure, centre)
    start = np.array(centre) - 32
    np.testing.assert_array_equal(plain_hu.numpy(), case.image[tuple(slice(s, s + 64) for s in start)])
    # The identity affine through the interpolating path gives the same patch.
    identity = Affine(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), (0.0, 0.0, 0.0))
    hu, mask = cut_patch(case, structure, centre, identity)
    np.testing.assert_allclose(hu.numpy(), plain_hu.numpy(), atol=0.01)
    assert torch.equal(mask, plain_mask)
    # A quarter turn about z maps the patch offset (dz, dy, dx) to the lattice offset (dz, -dx, dy).
    quarter = Affine(tuple(tuple(r) for r in rotation_matrix([1.0, 0.0, 0.0], math.pi / 2)), (0.0, 0.0, 0.0))
    turned, _ = cut_patch(case, structure, centre, quarter)
    np.testing.assert_allclose(turned[:, 32, 32].numpy(), plain_hu[:, 32, 32].numpy(), atol=1e-3)
    np.testing.assert_allclose(turned[32, 32, 40].numpy(), plain_hu[32, 24, 32].numpy(), atol=1e-2)


# -- losses ----------------------------------------------------------------------------------


def test_losses_match_hand_computed_values():
    target = torch.zeros(2, 1, 4, 4, 4)
    target[:, :, :2] = 1
    perfect = target.clone()
    half = torch.full_like(target, 0.5)
    assert dice_loss(perfect, target).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    # Dice of 0.5 everywhere: 2*16+1 over 32+32+1.
    assert dice_loss(half, target)[0].item() == pytest.approx(1 - 33 / 65)
    bce = math.log(2)
    assert focal_loss(half, target)[0].item() == pytest.approx(0.8 * (1 - math.exp(-bce)) ** 2 * bce, rel=1e-5)
    assert heatmap_loss(half, target)[0].item() == pytest.approx(0.25)
    assert dice_score(torch.zeros_like(target), torch.zeros_like(target)).tolist() == [1.0, 1.0]
    assert dice_score(perfect, target).tolist() == [1.0, 1.0]


def test_swap_pairs_exchanges_neighbours():
    values = torch.arange(6).view(6, 1)
    assert swap_pairs(values).view(-1).tolist() == [1, 0, 3, 2, 5, 4]


# -- random generators in checkpoints --------------------------------------------------------


def test_rng_states_survive_the_restricted_checkpoint_loader(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    state = capture_rng_state()
    path = save_checkpoint(tmp_path / "rng.pth", {"w": torch.zeros(1)}, {"rng": state})
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(read_checkpoint(path)["rng"])
    assert (random.random(), np.random.normal()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_train_command_reports_a_bad_config_by_name(tmp_path, capsys):
    from CTSAM3DLib.cli import main as cli_main

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": {"root": "x"}, "optimisation": {"batch_size": 0}}))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "optimisation.batch_size" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
