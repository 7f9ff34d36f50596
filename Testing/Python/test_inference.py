"""The optimised inference paths against plain float32: choice of path, building blocks, and the
agreement of whole decodes on patches of the real CTs (Dice >= 0.99). Speed is measured by
bench/bench_inference.py, never here."""

import copy
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from CTSAM3DLib import InteractiveSession
from CTSAM3DLib.constants import MAX_CLICKS
from CTSAM3DLib.cuda_graph import StaticCall
from CTSAM3DLib.geometry import Lattice
from CTSAM3DLib.inference import (
    PRECISIONS,
    PreparedNetwork,
    available_precisions,
    choose_precision,
    cuda_graphs_default,
    prepare_network,
)
from CTSAM3DLib.model.decoder import SpadeMaskDecoder
from CTSAM3DLib.model.fast_decoder import UpscaledHead, VoxelwiseUpscale
from CTSAM3DLib.model.int8_conv import Int8Conv3d, int8_convolution_available, quantize_activation
from CTSAM3DLib.model.prompt import click_maps
from CTSAM3DLib.preprocess import normalize_hu
from CTSAM3DLib.runtime import Runtime

CPU = torch.device("cpu")
OPTIMISED = [p for p in available_precisions(CPU) if p not in ("auto", "float32")]
CTS = ("chest-abdomen-ct", "abdomen-ct-3mm", "aorta-ct-1.5mm", "body-ct-3mm")
MIN_DICE = 0.99
MAX_PROBABILITY_DIFFERENCE = 0.1


@pytest.fixture(scope="module")
def net(reference_net):
    return reference_net


def central_patch(path):
    image = sitk.ReadImage(str(path))
    lattice = Lattice.of_image(image)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    geometry = lattice.patch_centred_on(lattice.nearest_index(centre))
    return torch.from_numpy(normalize_hu(lattice.sample(image, geometry)))[None, None]


POINTS = torch.tensor([[[32.0, 32.0, 32.0], [40.0, 30.0, 27.0]]])
LABELS = torch.tensor([[1, 0]])


def two_clicks(network, patch):
    """Probability after a positive click, then a negative one refining it (mask prompt)."""
    with torch.no_grad():
        features = network.encode(patch)
        first, _ = network.decode(features, POINTS[:, :1], LABELS[:, :1])
        second, _ = network.decode(features, POINTS, LABELS, first)
    return second


@pytest.fixture(scope="module")
def float32_outputs(net, data_dir):
    return {name: two_clicks(net, central_patch(data_dir / name / "ct.nii.gz")) for name in CTS}


def dice(a, b):
    a, b = a.numpy() > 0.5, b.numpy() > 0.5
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------ choice of path
def test_float32_is_the_network_itself(net):
    assert prepare_network(net, CPU, "float32") is net


def test_auto_picks_an_available_optimised_path_on_this_cpu(net):
    choice = choose_precision(CPU)
    assert choice in available_precisions(CPU)
    prepared = prepare_network(net, CPU, "auto")
    if choice == "float32":
        assert prepared is net
    else:
        assert isinstance(prepared, PreparedNetwork) and prepared.precision == choice


def test_unknown_and_unavailable_precisions_are_refused(net):
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        prepare_network(net, CPU, "int4")
    assert set(available_precisions(CPU)) <= set(PRECISIONS)
    with pytest.raises(ValueError, match="precision 'float16' is not available on cpu"):
        prepare_network(net, CPU, "float16")


def test_a_stand_in_is_used_as_it_is():
    class StandIn:
        def encode(self, image):
            return [image]

        def decode(self, features, points, labels, mask_prompt=None):
            return features[0], torch.zeros(1, 1)

    stand_in = StandIn()
    assert prepare_network(stand_in, CPU, "auto") is stand_in


@pytest.mark.parametrize("precision", [precision for precision in OPTIMISED if precision.endswith("int8")])
def test_int8_paths_run_the_encoder_and_cross_patch_unet_in_float32(net, precision):
    """Only the decoder is quantised: the other two networks give the float32 numbers exactly."""
    prepared = prepare_network(net, CPU, precision)
    generator = torch.Generator().manual_seed(2)
    image, neighbour = (torch.rand(1, 1, 64, 64, 64, generator=generator) for _ in range(2))
    mask = (torch.rand(1, 1, 64, 64, 64, generator=generator) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(prepared.cross_patch(image, mask, neighbour), net.cross_patch(image, mask, neighbour))
        for ours, theirs in zip(prepared.encode(image), net.encode(image)):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("precision", OPTIMISED)
def test_a_patch_decodes_the_same_whatever_it_is_batched_with(net, data_dir, precision):
    """Cross-patch prompting batches neighbours: each one's result must not depend on the others."""
    prepared = prepare_network(net, CPU, precision)
    patches = torch.cat([central_patch(data_dir / name / "ct.nii.gz") for name in CTS[:2]])
    with torch.no_grad():
        features = prepared.encode(patches)
        together, _ = prepared.decode(features, POINTS.expand(2, -1, -1), LABELS.expand(2, -1))
        alone, _ = prepared.decode([level[1:] for level in features], POINTS, LABELS)
    np.testing.assert_allclose(together[1:].numpy(), alone.numpy(), atol=1e-3)


def test_padding_clicks_to_the_maximum_leaves_the_click_maps_unchanged():
    """What the CUDA graph path relies on to keep one graph for every click count."""
    padded_points = torch.zeros(1, MAX_CLICKS, 3)
    padded_points[:, :2] = POINTS
    padded_labels = torch.full((1, MAX_CLICKS), -1)
    padded_labels[:, :2] = LABELS
    assert torch.equal(click_maps(padded_points, padded_labels), click_maps(POINTS, LABELS))


@pytest.mark.skipif(not OPTIMISED, reason="no optimised path on this CPU")
def test_sessions_on_one_runtime_share_one_preparation_until_its_weights_change(net, data_dir, monkeypatch):
    """The warm-up (and on CUDA the graph's capture) happens once per runtime, not per session; weights
    loaded into the network afterwards make the next session's runtime prepare again, and serve them."""
    precision = OPTIMISED[0]
    net = copy.deepcopy(net)
    made = []
    original = PreparedNetwork.__init__

    def counting(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PreparedNetwork, "__init__", counting)
    image = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"))
    runtime = Runtime(net, CPU, precision)
    first = InteractiveSession(runtime, image, device="cpu", cross_patch=False)
    second = InteractiveSession(runtime, image, cross_patch=False)
    assert first.net is second.net is runtime.network and len(made) == 1
    assert first.precision == second.precision == precision and first.sampling == "device"
    patch = central_patch(data_dir / "abdomen-ct-3mm" / "ct.nii.gz")
    before = two_clicks(runtime.network, patch)
    with torch.no_grad():
        net.mask_decoder.spade1.conv_0.weight.neg_()  # as an optimiser step, in place
    third = InteractiveSession(runtime, image, cross_patch=False)
    assert third.net is runtime.network is not first.net and len(made) == 2
    assert not torch.equal(two_clicks(third.net, patch), before), "the new weights must be served"
    assert first.net is not third.net, "a session keeps the network it started with"


def test_a_session_refuses_a_runtime_of_another_device_or_precision(net, data_dir):
    image = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"))
    runtime = Runtime(net, CPU, "float32")
    assert runtime.network is net and runtime.sampling == "exact" and not runtime.cuda_graphs
    assert InteractiveSession(runtime, image, device="cpu", precision="float32").net is net
    for precision in OPTIMISED:
        with pytest.raises(ValueError, match=f"asks for device cpu at precision '{precision}'.*'float32'"):
            InteractiveSession(runtime, image, device="cpu", precision=precision)
    with pytest.raises(ValueError, match="unknown sampling 'gpu'"):
        Runtime(net, CPU, sampling="gpu")


# ------------------------------------------------------------------ CUDA graphs: their logic on the CPU
@pytest.fixture
def graphs_run_eagerly(monkeypatch):
    """``StaticCall`` without its capture (which needs a GPU): every call runs the function on the static
    buffers, which is what a replay computes; the graph pool handle likewise needs none."""
    monkeypatch.setattr(StaticCall, "_capture", lambda self, pool: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def test_a_static_call_copies_inputs_in_and_outputs_out():
    doubled_sum = StaticCall(lambda a, b: (a * 2 + b,), [torch.zeros(2, 3), torch.zeros(2, 3)], capture=False)
    generator = torch.Generator().manual_seed(3)
    first_a, b = torch.rand(3, 2, generator=generator).t(), torch.rand(2, 3, generator=generator)  # strided
    first = doubled_sum(first_a, b.double())[0]
    torch.testing.assert_close(first, first_a * 2 + b)
    second = doubled_sum(torch.ones(2, 3), torch.ones(2, 3))[0]
    torch.testing.assert_close(first, first_a * 2 + b)  # the earlier result is the caller's own copy
    torch.testing.assert_close(second, torch.full((2, 3), 3.0))
    assert doubled_sum.accepts(torch.ones(2, 3), torch.ones(2, 3))
    assert not doubled_sum.accepts(torch.ones(1, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shapes \[\(2, 3\), \(2, 3\)\]"):
        doubled_sum(torch.ones(3, 3), torch.ones(2, 3))


def test_a_static_call_refuses_to_capture_off_cuda():
    with pytest.raises(ValueError, match="CUDA devices only"):
        StaticCall(lambda a: (a,), [torch.zeros(2)], capture=True)


def test_graphed_calls_give_the_networks_own_numbers(net, graphs_run_eagerly):
    """One patch goes through the fixed-shape calls (clicks padded, a mask prompt always present); batches
    and more than MAX_CLICKS clicks go eagerly: every way gives the network's own result."""
    prepared = PreparedNetwork(net, CPU, "float32", cuda_graphs=True)
    assert prepared.cuda_graphs
    eager_decodes = []
    original = prepared._decode_eager
    prepared._decode_eager = lambda *inputs: eager_decodes.append(inputs[-2].shape) or original(*inputs)
    patch = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    many_points = torch.randint(0, 64, (1, MAX_CLICKS + 1, 3), generator=torch.Generator().manual_seed(1)).float()
    many_labels = torch.randint(0, 2, (1, MAX_CLICKS + 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = net.encode(patch)
        for ours, theirs in zip(prepared.encode(patch), features):
            torch.testing.assert_close(ours, theirs)
        first, _ = net.decode(features, POINTS[:, :1], LABELS[:, :1])
        expected = [first, net.decode(features, POINTS, LABELS, first)[0],
                    net.decode(features, many_points, many_labels, first)[0]]
        got = [prepared.decode(features, POINTS[:, :1], LABELS[:, :1])[0],
               prepared.decode(features, POINTS, LABELS, first)[0]]
        assert not eager_decodes
        got.append(prepared.decode(features, many_points, many_labels, first)[0])
        batch = [torch.cat([level, level]) for level in features]
        both, _ = prepared.decode(batch, POINTS.expand(2, -1, -1), LABELS.expand(2, -1), torch.cat([first, first]))
    assert eager_decodes == [(1, MAX_CLICKS + 1), (2, 2)]
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], expected[1], atol=1e-5, rtol=1e-5)


def test_a_failed_capture_leaves_the_network_running_eagerly_with_a_warning(net, monkeypatch):
    def failing_capture(self, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticCall, "_capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    with pytest.warns(UserWarning, match="capturing the network's CUDA graphs failed.*not permitted"):
        prepared = PreparedNetwork(net, CPU, "float32", cuda_graphs=True)
    assert not prepared.cuda_graphs
    patch = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = net.decode(net.encode(patch), POINTS, LABELS)
        probability, _ = prepared.decode(prepared.encode(patch), POINTS, LABELS)
    torch.testing.assert_close(probability, expected)


def test_cuda_graphs_are_on_by_default_and_switched_off_by_the_environment(monkeypatch):
    monkeypatch.delenv("CTSAM3D_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("CTSAM3D_COMPILE", raising=False)
    assert cuda_graphs_default()
    monkeypatch.setenv("CTSAM3D_CUDA_GRAPHS", "0")
    assert not cuda_graphs_default()
    monkeypatch.delenv("CTSAM3D_CUDA_GRAPHS")
    monkeypatch.setenv("CTSAM3D_COMPILE", "0")
    with pytest.warns(FutureWarning, match="CTSAM3D_COMPILE is deprecated"):
        assert not cuda_graphs_default()


def test_the_click_kernel_travels_with_the_network_and_stays_out_of_its_weights(net):
    """A CUDA graph cannot record a copy from the CPU, so the Gaussian is a buffer of the network's."""
    assert "prompt_encoder.kernel" not in net.state_dict()
    generator = torch.Generator().manual_seed(4)
    points = torch.rand(2, 5, 3, generator=generator) * 64
    labels = torch.randint(-1, 2, (2, 5), generator=generator)
    assert torch.equal(net.prompt_encoder(points, labels), click_maps(points, labels))


def test_a_session_warming_its_device_paths_changes_nothing(net, data_dir):
    """On CUDA a session runs its sampling, paste and peak search once when created; nothing of it stays."""
    image = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"))
    session = InteractiveSession(net, image, device="cpu", precision="float32", sampling="device", max_patches=2)
    session._warm_up_device_paths()
    assert session.patch_count == 0 and session.clicks == [] and not session.mask_array().any()
    assert session.last_timing == {}


def test_auto_precision_is_float32_on_cuda_where_it_measured_fastest(monkeypatch):
    monkeypatch.setattr("CTSAM3DLib.inference.available_precisions",
                        lambda device: ["auto", "float32", "float16", "bfloat16"])
    assert choose_precision(torch.device("cuda")) == "float32"


# ------------------------------------------------------------------ building blocks
needs_int8 = pytest.mark.skipif(
    not int8_convolution_available(), reason="this torch build has no oneDNN int8 convolution on this CPU"
)


def test_activation_codes_round_to_within_half_a_step():
    x = torch.randn(1, 8, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    codes, scale, zero_point = quantize_activation(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    restored = (codes.float() - zero_point) * scale
    assert (restored - x).abs().max() <= scale / 2 + 1e-6
    assert codes.min() == 0 and codes.max() == 255


@needs_int8
@pytest.mark.parametrize("channels_in, channels_out, size", [(16, 24, 6), (128, 128, 8)])
def test_int8_convolution_matches_float32_to_quantisation_error(channels_in, channels_out, size):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(channels_out, channels_in, 3, 3, 3, generator=generator) / (channels_in * 27) ** 0.5
    bias = torch.randn(channels_out, generator=generator)
    x = torch.randn(1, channels_in, size, size, size, generator=generator)
    expected = F.conv3d(x, weight, bias, padding=1)
    result = Int8Conv3d(weight, bias)(x)
    relative = ((result - expected).norm() / (expected - bias.view(1, -1, 1, 1, 1)).norm()).item()
    print(f"int8 convolution {channels_in}->{channels_out}: relative error {relative:.4f}")
    assert result.shape == expected.shape and relative < 0.02


def test_voxelwise_upscale_and_fused_head_equal_the_modules_in_float32():
    """The rearranged upscaling and output head (float32 products): same numbers as the modules."""
    torch.manual_seed(0)
    decoder = SpadeMaskDecoder(32).eval()
    x = torch.randn(2, 16, 5, 4, 6)
    head = decoder.mask_prediction_head[0]
    with torch.no_grad():
        upscaled = decoder.upscale5(x)
        expected_logits = F.conv3d(upscaled, head.weight[:1], head.bias[:1], padding=1)
        logits, channel_means = UpscaledHead(decoder.upscale5, head, torch.float32, slab_voxels=37)(x)
        voxelwise = VoxelwiseUpscale(decoder.upscale5, torch.float32)(x)
    np.testing.assert_allclose(voxelwise.numpy(), upscaled.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits.numpy(), expected_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(channel_means.numpy(), upscaled.mean(dim=(2, 3, 4)).numpy(), atol=1e-5)


# ------------------------------------------------------------------ whole network on real CTs
@pytest.mark.parametrize("precision", OPTIMISED)
def test_optimised_paths_agree_with_float32_on_every_real_ct(net, data_dir, float32_outputs, precision):
    prepared = prepare_network(net, CPU, precision)
    for name in CTS:
        probability = two_clicks(prepared, central_patch(data_dir / name / "ct.nii.gz"))
        expected = float32_outputs[name]
        assert probability.dtype == torch.float32 and probability.shape == expected.shape
        agreement = dice(probability, expected)
        difference = (probability - expected).abs().max().item()
        print(f"{precision} on {name}: Dice {agreement:.4f}, largest probability difference {difference:.4f}")
        assert agreement >= MIN_DICE
        assert difference <= MAX_PROBABILITY_DIFFERENCE


def test_session_masks_agree_across_precisions_on_a_real_ct(net, data_dir):
    """The int8 (or best available) session against the float32 session, source grid included."""
    if not OPTIMISED:
        pytest.skip("no optimised path on this CPU")
    image = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"))
    centre = np.array(image.GetSize()) / 2
    clicks = [(image.TransformContinuousIndexToPhysicalPoint((centre + offset).tolist()), positive)
              for offset, positive in ((np.zeros(3), True), (np.array([4.0, -3.0, 2.0]), False))]
    masks = {}
    for precision in ("float32", choose_precision(CPU)):
        session = InteractiveSession(net, image, device="cpu", precision=precision, cross_patch=False)
        session.set_clicks(clicks)
        masks[precision] = session.mask_array()
    reference, optimised = masks.values()
    agreement = 2 * np.logical_and(reference, optimised).sum() / (reference.sum() + optimised.sum())
    print(f"session {choose_precision(CPU)} against float32: mask Dice {agreement:.4f}")
    assert reference.sum() > 0 and agreement >= MIN_DICE


# ------------------------------------------------------------------ mapping a patch back (paste)
def reoriented(image, name):
    """The scan in another index order and sign (same voxels in world space), or rotated."""
    if name == "flipped":
        return sitk.Flip(image, [True, False, True])
    if name == "permuted":
        return sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, False])
    if name == "oblique":
        rotated = sitk.Image(image)
        transform = sitk.Euler3DTransform()
        transform.SetRotation(0.2, -0.1, 0.3)
        direction = np.array(transform.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
        rotated.SetDirection(direction.ravel().tolist())
        return rotated
    return image


@pytest.mark.parametrize("orientation", ["original", "flipped", "permuted", "oblique"])
def test_patch_samples_equal_trilinear_sampling_at_the_patch_coordinates(data_dir, orientation):
    """SourceGrid.patch_samples (separable on axis-aligned grids) against grid_sample at
    patch_coordinates, on the chest CT's real geometry (0.7 x 0.7 x 2.5 mm) in several orientations."""
    from CTSAM3DLib.geometry import SourceGrid, sample_patch_volume

    header = sitk.ReadImage(str(data_dir / "chest-abdomen-ct" / "ct.nii.gz"))
    image = reoriented(sitk.RegionOfInterest(header, [200, 180, 60], [150, 160, 40]), orientation)
    grid, lattice = SourceGrid(image), Lattice.of_image(image)
    point = image.TransformContinuousIndexToPhysicalPoint([s / 2 + 3.3 for s in image.GetSize()])
    geometry = lattice.patch_centred_on(lattice.nearest_index(point))
    region = grid.region_of(geometry)
    assert (grid.axis_aligned_coordinates(region, geometry, CPU) is None) == (orientation == "oblique")
    volume = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    coordinates = grid.patch_coordinates(region, geometry, CPU)
    sampled, distance = grid.patch_samples(region, geometry, volume)
    assert sampled.shape == distance.shape == coordinates.shape[:-1]
    np.testing.assert_allclose(sampled.numpy(), sample_patch_volume(volume, coordinates).numpy(), atol=1e-4)
    np.testing.assert_allclose(distance.numpy(), (coordinates - 31.5).abs().amax(dim=-1).numpy(), atol=1e-4)
    # A second call (a refining click re-renders its region) reuses the region's map: the same values,
    # for another volume too; the maps kept are bounded.
    again = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(grid.patch_samples(region, geometry, again)[0].numpy(),
                                  SourceGrid(image).patch_samples(region, geometry, again)[0].numpy())
    for shift in range(SourceGrid.SEPARABLE_MAPS_KEPT + 5):
        moved = lattice.patch_centred_on(lattice.nearest_index(point) + (shift % 16 - 8, shift // 16 - 8, 0))
        grid.patch_samples(grid.region_of(moved), moved, volume)
    assert len(grid._separable_maps) <= SourceGrid.SEPARABLE_MAPS_KEPT


def test_cuda_libraries_load_in_the_background_only_on_cuda():
    """load_checkpoint's early loading of cuDNN and cuBLAS starts a thread on CUDA only."""
    from CTSAM3DLib.device import load_cuda_libraries_in_background

    for device in ("cpu", "meta"):
        load_cuda_libraries_in_background(torch.device(device))
    assert not [thread for thread in threading.enumerate() if thread.name == "ctsam3d-cuda-libraries"]


def test_the_graphs_are_captured_only_after_the_background_loading_has_finished(net, monkeypatch):
    """A synchronize in the loader thread during a capture would invalidate it (the capture's default
    "global" mode: https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__STREAM.html,
    cudaStreamBeginCapture), so preparing the graphs waits for the loader. The loader is held until a
    timer lets it go; a capture that did not wait would find it still running."""
    from CTSAM3DLib import device as device_module

    released, finished = threading.Event(), threading.Event()
    monkeypatch.setattr(device_module, "_first_kernels", lambda device: released.wait(30) and finished.set())
    loader_running_at_capture = []
    monkeypatch.setattr(StaticCall, "_capture",
                        lambda self, pool: loader_running_at_capture.append(not finished.is_set()))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    device_module.load_cuda_libraries_in_background(torch.device("cuda"))
    threading.Timer(0.5, released.set).start()
    PreparedNetwork(net, CPU, "float32", cuda_graphs=True)
    assert loader_running_at_capture == [False, False]
    assert not [thread for thread in threading.enumerate() if thread.name == "ctsam3d-cuda-libraries"]


# ------------------------------------------------------------------ sampling where the network runs
@pytest.mark.parametrize("orientation", ["original", "flipped", "permuted", "oblique"])
@pytest.mark.parametrize("name", CTS)
def test_device_sampling_gives_the_authors_patch_values_bit_for_bit(data_dir, name, orientation):
    """DeviceVolume (torch, float64) against Lattice.sample (SimpleITK, the exact path), for patches in
    the middle, at a corner (partly outside the scan), beside it and beyond it, on every real CT in
    every orientation: identical values. Integer scans are truncated after interpolation, so a last-bit
    difference in a continuous index moves a value by 1 HU where lattice points hit voxels exactly
    (the 1.5 mm aorta CT): only ITK's own arithmetic, step by step, gives its values."""
    from CTSAM3DLib.geometry import DeviceVolume

    image = reoriented(sitk.ReadImage(str(data_dir / name / "ct.nii.gz")), orientation)
    lattice = Lattice.of_image(image)
    volume = DeviceVolume(image, lattice, CPU)
    size = np.array(image.GetSize(), dtype=np.float64)
    geometries = [
        lattice.patch_centred_on(lattice.nearest_index(image.TransformContinuousIndexToPhysicalPoint(index)))
        for index in ((size / 2 + 0.3).tolist(), [2.0, 3.0, 1.0], (size - 2).tolist(), (size * 0.3).tolist())
    ]
    geometries += [geometries[1].shifted((-1, 0, 0)), geometries[0].shifted((200, 0, 0))]
    sampled = volume.sample(geometries).numpy()
    for geometry, ours in zip(geometries, sampled):
        expected = lattice.sample(image, geometry)
        assert np.array_equal(ours, expected), (geometry.start_index, int((ours != expected).sum()),
                                                float(np.abs(ours - expected).max()))


@pytest.mark.parametrize("name", CTS)
def test_a_session_sampling_on_the_device_agrees_with_the_exact_path(net, data_dir, name):
    """Patches sampled where the network runs are SimpleITK's bit for bit, so a session sampling there
    gives the exact path's masks and probabilities, identical, after an opening click, a correction and
    a cross-patch step."""
    image = sitk.ReadImage(str(data_dir / name / "ct.nii.gz"))
    centre = np.array(image.GetSize()) / 2
    clicks = [(image.TransformContinuousIndexToPhysicalPoint((centre + offset).tolist()), positive)
              for offset, positive in ((np.zeros(3), True), (np.array([4.0, -3.0, 2.0]), False))]
    results = {}
    for sampling in ("exact", "device"):
        session = InteractiveSession(net, image, device="cpu", precision="float32", max_patches=3, sampling=sampling)
        session.set_clicks(clicks)
        results[sampling] = (session.mask_array(), sitk.GetArrayFromImage(session.probability()), session.patch_count)
    (exact_mask, exact_probability, exact_patches), (mask, probability, patches) = results.values()
    dice = 2 * np.logical_and(exact_mask, mask).sum() / max(exact_mask.sum() + mask.sum(), 1)
    print(f"{name}: device sampling against exact: Dice {dice:.5f}, "
          f"max |dp| {np.abs(probability - exact_probability).max():.2e}")
    assert exact_mask.sum() > 0 and patches == exact_patches > 1
    assert np.array_equal(mask, exact_mask) and dice == 1.0
    assert np.array_equal(probability, exact_probability)


def test_auto_sampling_is_exact_for_the_float32_cpu_path_and_on_the_device_for_the_others(net, data_dir):
    image = sitk.ReadImage(str(data_dir / "abdomen-ct-3mm" / "ct.nii.gz"))
    assert InteractiveSession(net, image, device="cpu", precision="float32").sampling == "exact"
    for precision in OPTIMISED:
        assert InteractiveSession(net, image, device="cpu", precision=precision).sampling == "device"
    with pytest.raises(ValueError, match="unknown sampling 'gpu'"):
        InteractiveSession(net, image, device="cpu", sampling="gpu")
