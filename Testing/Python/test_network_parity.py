"""The network against the authors' own outputs (shared/reference): names, shapes, numbers."""

import numpy as np
import pytest
import torch

from CTSAM3DLib.model import VARIANTS, build_model
from CTSAM3DLib.model.prompt import click_maps

PROBABILITY_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def encoded(reference_net, reference_fixture):
    with torch.no_grad():
        return reference_net.encode(torch.from_numpy(reference_fixture["patch_input"]))


def read_layout(path):
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    assert rows[0] == ["name", "shape", "dtype"]
    return rows[1:]


def test_state_dict_equals_the_authors_layout_entry_for_entry(reference_layout_path):
    state = build_model("tiny").state_dict()
    layout = read_layout(reference_layout_path)
    assert len(layout) == len(state) == 428
    for (name, shape, dtype), (our_name, tensor) in zip(layout, state.items()):
        our_shape = "scalar" if tensor.dim() == 0 else "x".join(str(s) for s in tensor.shape)
        assert (our_name, our_shape, str(tensor.dtype).replace("torch.", "")) == (name, shape, dtype)
    assert sum(t.numel() for t in state.values()) == 74_023_156


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_and_encodes(variant):
    net = build_model(variant)
    with torch.no_grad():
        features = net.encode(torch.rand(1, 1, 64, 64, 64))
    assert [tuple(f.shape) for f in features] == [
        (1, 128, 16, 16, 16), (1, 128, 8, 8, 8), (1, 128, 4, 4, 4), (1, 256, 2, 2, 2)
    ]


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown CT-SAM3D variant 'huge'"):
        build_model("huge")


def test_encoder_features_match_the_authors(encoded, reference_fixture):
    for level, feature in enumerate(encoded):
        expected = reference_fixture[f"feature{level}"]
        assert feature.shape == expected.shape
        np.testing.assert_allclose(feature.numpy(), expected, atol=FEATURE_TOLERANCE, rtol=1e-5)


def test_click_maps_equal_the_authors_exactly(reference_fixture):
    maps = click_maps(torch.from_numpy(reference_fixture["points1"]), torch.from_numpy(reference_fixture["labels1"]))
    assert maps.dtype == torch.float32
    np.testing.assert_array_equal(maps.numpy(), reference_fixture["clickmap1"])


def loop_click_maps(points, labels, size=64, radius=8):
    """The authors' per-point loop, written out independently as the oracle."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = torch.exp(torch.from_numpy(
        -(offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2) / np.float32(8.0)
    )).numpy()
    kernel[kernel < np.finfo(np.float32).eps * kernel.max()] = 0
    maps = np.zeros((points.shape[0], 2, size, size, size), dtype=np.float32)
    for b in range(points.shape[0]):
        for n in range(points.shape[1]):
            if labels[b, n] == -1:
                continue
            channel = 0 if labels[b, n] == 1 else 1
            x, y, z = (int(v) for v in points[b, n])
            lo = [max(c - radius, 0) for c in (z, y, x)]
            hi = [min(c + radius + 1, size) for c in (z, y, x)]
            window = kernel[
                lo[0] - z + radius: hi[0] - z + radius,
                lo[1] - y + radius: hi[1] - y + radius,
                lo[2] - x + radius: hi[2] - x + radius,
            ]
            maps[b, channel, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = window
    return maps


def test_click_maps_truncate_and_let_later_clicks_overwrite():
    # Overlapping windows, fractional coordinates, padding, a click at the patch edge.
    points = np.array([[[10.9, 10.2, 10.7], [14.3, 12.0, 9.99], [63.0, 0.0, 31.5], [5.0, 5.0, 5.0],
                        [12.0, 11.0, 10.0]]], dtype=np.float32)
    labels = np.array([[1, 1, 0, -1, 0]])
    expected = loop_click_maps(points, labels)
    maps = click_maps(torch.from_numpy(points), torch.from_numpy(labels)).numpy()
    np.testing.assert_array_equal(maps, expected)
    # The overwrite is visible: voxel (z=10, y=11, x=12) holds the last negative click's peak.
    assert maps[0, 1, 10, 11, 12] == 1.0
    assert maps[0, 0, 10, 10, 10] == expected[0, 0, 10, 10, 10]


def test_click_maps_without_clicks_are_zero():
    maps = click_maps(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.long))
    assert maps.shape == (2, 2, 64, 64, 64) and not maps.any()


def test_decoder_matches_the_authors_without_mask_prompt(reference_net, encoded, reference_fixture):
    with torch.no_grad():
        probability, quality = reference_net.decode(
            encoded, torch.from_numpy(reference_fixture["points1"]), torch.from_numpy(reference_fixture["labels1"])
        )
    np.testing.assert_allclose(probability.numpy(), reference_fixture["prob1"], atol=PROBABILITY_TOLERANCE, rtol=0)
    np.testing.assert_allclose(quality.numpy(), reference_fixture["iou1"], atol=1e-4, rtol=0)


def test_decoder_matches_the_authors_with_mask_prompt(reference_net, encoded, reference_fixture):
    with torch.no_grad():
        probability, quality = reference_net.decode(
            encoded,
            torch.from_numpy(reference_fixture["points2"]),
            torch.from_numpy(reference_fixture["labels2"]),
            torch.from_numpy(reference_fixture["prob1"]),
        )
    np.testing.assert_allclose(probability.numpy(), reference_fixture["prob2"], atol=PROBABILITY_TOLERANCE, rtol=0)
    np.testing.assert_allclose(quality.numpy(), reference_fixture["iou2"], atol=1e-4, rtol=0)


def test_cross_patch_unet_matches_the_authors(reference_net, reference_fixture):
    cpp_input = torch.from_numpy(reference_fixture["cpp_input"])
    np.testing.assert_array_equal(cpp_input[:, 1].numpy(), (reference_fixture["prob2"][:, 0] > 0.5).astype(np.float32))
    with torch.no_grad():
        heatmap = reference_net.cross_patch(cpp_input[:, :1], cpp_input[:, 1:2], cpp_input[:, 2:])
    np.testing.assert_allclose(heatmap.numpy(), reference_fixture["cpp_output"], atol=1e-4, rtol=0)


def test_batched_decode_equals_one_by_one(reference_net, encoded, reference_fixture):
    points = torch.tensor([[[32.0, 30.0, 33.0], [0.0, 0.0, 0.0]], [[40.0, 20.0, 10.0], [20.0, 20.0, 20.0]]])
    labels = torch.tensor([[1, -1], [1, 0]])
    batched_features = [torch.cat([f, f]) for f in encoded]
    with torch.no_grad():
        together, _ = reference_net.decode(batched_features, points, labels)
        for row in range(2):
            alone, _ = reference_net.decode(encoded, points[row:row + 1], labels[row:row + 1])
            np.testing.assert_allclose(together[row:row + 1].numpy(), alone.numpy(), atol=1e-5, rtol=0)
