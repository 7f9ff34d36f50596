"""The SPADE mask decoder in int8 through OpenVINO's CPU runtime (the optional ``openvino`` package).

``quantized_decoder_model`` turns a ``SpadeMaskDecoder`` into an OpenVINO model with static int8
quantisation: every convolution's input and weights pass through a FakeQuantize, which OpenVINO's CPU
plugin executes as an int8 convolution (VNNI, AMX) fused with what surrounds it. Weights are symmetric
per output channel; activations asymmetric per tensor, over the range they took on calibration inputs.

The calibration inputs are synthetic: phantoms of ellipsoids at typical CT densities (fat, soft
tissue, contrast, bone) in air or fat, with noise, a positive click in one ellipsoid and a negative one
near a corner, half with that ellipsoid as the previous mask. Nothing of a user's data is needed, and the
same weights always give the same model. Held-out real CTs agree with float32 at Dice >= 0.99
(``Testing/Python/test_inference.py``; ``BENCHMARKS.md``).

OpenVINO sends usage statistics to Intel (Google Analytics) unless the user opted out: on import (an
"import" event from ``openvino.tools.ovc``), from its converter (``openvino.convert_model``) and from its
quantisation tool, NNCF. A CT tool must not do that behind its user's back, so openvino is imported only
through ``import_openvino``, which hides the statistics package while openvino binds it (openvino falls
back to its own stub, which sends nothing); the model is traced through OpenVINO's PyTorch front end
rather than ``convert_model``, and quantised here rather than by NNCF.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from types import ModuleType
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..constants import HU_WINDOW, PATCH_SIZE
from .decoder import SpadeMaskDecoder

CALIBRATION_PHANTOMS = 8
_DENSITIES_HU = (-100.0, 30.0, 50.0, 60.0, 150.0, 250.0, 700.0)
_ACTIVATION_LEVELS = 256
_WEIGHT_LEVELS = 255

_core: Any = None
_core_lock = threading.Lock()


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported here (it is optional)."""
    return importlib.util.find_spec("openvino") is not None


def import_openvino() -> ModuleType:
    """openvino, imported with its usage statistics off (see the module docstring): while openvino is first
    imported, ``openvino_telemetry`` cannot be, so openvino binds its stub instead; afterwards the package is
    importable again for anyone else who wants it."""
    if "openvino" not in sys.modules:
        hidden = sys.modules.get("openvino_telemetry")
        sys.modules["openvino_telemetry"] = None  # an import of it now raises ImportError
        try:
            import openvino  # noqa: F401
        finally:
            if hidden is None:
                del sys.modules["openvino_telemetry"]
            else:
                sys.modules["openvino_telemetry"] = hidden
    return sys.modules["openvino"]


def openvino_core() -> Any:
    """The process's one ``openvino.Core``, made at first use and kept until the process ends.

    Every Core loads its own CPU plugin, which gives the thread that loads it a new signal stack and
    unmaps that stack when the Core goes, putting the previous one back only if the stack is still that
    thread's newest. Two Cores dropped in the order they were made thus left the thread on unmapped
    memory, and the next signal that Python handles there (Ctrl+C, a DataLoader worker's exit) killed
    the process with SIGSEGV. One Core that never goes loads the plugin once."""
    global _core
    with _core_lock:
        if _core is None:
            _core = import_openvino().Core()
        return _core


class _DecoderOutputs(torch.nn.Module):
    """The decoder as a module of (features..., prompt), the form OpenVINO's tracer takes."""

    def __init__(self, decoder: SpadeMaskDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, f0, f1, f2, f3, prompt):
        return self.decoder([f0, f1, f2, f3], prompt)


def decoder_inputs(net: Any, image: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                   mask_prompt: Any = None) -> List[np.ndarray]:
    """The decoder's inputs for a patch and a prompt, as OpenVINO takes them: image (1,1,64^3) in [0,1],
    points (1,N,3), labels (1,N), mask_prompt (1,1,64^3) or None -> [four feature maps..., prompt]."""
    with torch.no_grad():
        features = net.encode(image)
        prompt = net.decoder_prompt(points, labels, mask_prompt, torch.float32)
    return [np.ascontiguousarray(array.numpy()) for array in (*features, prompt)]


def phantom(seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic 64^3 CT patch -> image (1,1,64^3) in [0,1] as ``normalize_hu`` makes it, a positive
    click (x, y, z) in its last ellipsoid and that ellipsoid's mask (1,1,64^3)."""
    generator = np.random.default_rng(seed)
    z, y, x = np.mgrid[:PATCH_SIZE, :PATCH_SIZE, :PATCH_SIZE].astype(np.float32)
    hounsfield = np.full((PATCH_SIZE,) * 3, -1000.0 if seed % 3 == 0 else -100.0, np.float32)
    for _ in range(int(generator.integers(4, 9))):
        centre = generator.uniform(8, PATCH_SIZE - 8, 3)
        radii = generator.uniform(5, 22, 3)
        inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
            (x - centre[2]) / radii[2]) ** 2 < 1
        hounsfield[inside] = generator.choice(_DENSITIES_HU)
    hounsfield += generator.normal(0, 15, hounsfield.shape).astype(np.float32)
    low, high = HU_WINDOW
    image = (np.clip(hounsfield, low, high) - low) / (high - low)
    click = torch.tensor(centre[::-1].copy(), dtype=torch.float32).view(1, 1, 3)
    return (torch.from_numpy(image.astype(np.float32)).view(1, 1, *image.shape), click,
            torch.from_numpy(inside.astype(np.float32)).view(1, 1, *inside.shape))


def calibration_inputs(net: Any, count: int = CALIBRATION_PHANTOMS) -> List[List[np.ndarray]]:
    """Decoder inputs from ``count`` phantoms: a positive click and a negative one near the patch's first
    corner; every other phantom also has its clicked ellipsoid as the previous mask."""
    inputs = []
    for seed in range(count):
        image, positive, mask = phantom(seed)
        negative = torch.full((1, 1, 3), 6.0)
        points = torch.cat([positive, negative], dim=1)
        labels = torch.tensor([[1, 0]])
        inputs.append(decoder_inputs(net, image, points, labels, mask if seed % 2 else None))
    return inputs


def quantized_decoder_model(net: Any, calibration: Sequence[Sequence[np.ndarray]]) -> Any:
    """The network's SPADE decoder as an int8 OpenVINO model (see the module docstring): inputs
    f0..f3 (1,C,S^3) and prompt (1,3,64^3); outputs probability (1,1,64^3), quality (1,1)."""
    import_openvino()
    from openvino._offline_transformations import compress_quantize_weights_transformation

    model = traced_decoder(net.mask_decoder, calibration[0])
    convolutions = _quantizable_convolutions(model)
    ranges = _activation_ranges(model, convolutions, calibration)
    quantized_inputs: Dict[Tuple[str, int], Any] = {}
    for convolution in convolutions:
        source = convolution.input_value(0)
        key = _output_key(source)
        if key not in quantized_inputs:
            low, high = ranges[key]
            quantized_inputs[key] = _fake_quantize(source, np.float32(low), np.float32(high), _ACTIVATION_LEVELS)
        convolution.input(0).replace_source_output(quantized_inputs[key].output(0))
        weights = convolution.input_value(1)
        values = weights.get_node().get_data()
        channel_axis = 0 if convolution.get_type_name() == "Convolution" else 1
        other_axes = tuple(axis for axis in range(values.ndim) if axis != channel_axis)
        bound = np.maximum(np.abs(values).max(axis=other_axes, keepdims=True), 1e-12).astype(np.float32)
        convolution.input(1).replace_source_output(_fake_quantize(weights, -bound, bound, _WEIGHT_LEVELS).output(0))
    model.validate_nodes_and_infer_types()
    # Stores the weights as int8 codes and scales: a quarter of the file, the same computation.
    compress_quantize_weights_transformation(model)
    return model


class OpenVinoDecoder:
    """``SpadeMaskDecoder.forward`` run by OpenVINO's CPU plugin from a model of
    ``quantized_decoder_model``: features [(B,128,16^3), (B,128,8^3), (B,128,4^3), (B,256,2^3)],
    prompt (B,3,64^3) -> probability (B,1,64^3) float32, quality (B,1). Callable from several threads
    (each has its own inference request). A batch runs one sample at a time: OpenVINO's int8 kernels
    round differently for other batch sizes (probabilities moved by up to 0.02), and a patch's result
    must not depend on what it is batched with; batches were no faster per patch."""

    def __init__(self, model: Any, threads: int, bfloat16: bool) -> None:
        """``bfloat16``: the layers left in float run in bfloat16 (where the CPU has it natively)."""
        self.compiled = openvino_core().compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32"})
        self._local = threading.local()

    def __call__(self, features: List[torch.Tensor], prompt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        probabilities, qualities = [], []
        for row in range(prompt.shape[0]):
            arrays = [np.ascontiguousarray(tensor[row:row + 1].detach().float().cpu().numpy())
                      for tensor in (*features, prompt)]
            results = request.infer(arrays)
            probability, quality = (torch.from_numpy(results[output].copy()) for output in self.compiled.outputs)
            probabilities.append(probability)
            qualities.append(quality)
        return torch.cat(probabilities), torch.cat(qualities)


def traced_decoder(decoder: SpadeMaskDecoder, example: Sequence[np.ndarray]) -> Any:
    """The decoder traced by OpenVINO's PyTorch front end for one sample of the sizes of ``example`` (its
    inputs as in ``decoder_inputs``), in float32, its constant subgraphs (the output convolution's sliced
    weights) folded: outputs probability (1,1,64^3), quality (1,1)."""
    openvino = import_openvino()
    from openvino import passes
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it freezes
        traced = TorchScriptPythonDecoder(_DecoderOutputs(decoder).eval(),
                                          example_input=tuple(torch.from_numpy(array) for array in example))
    front_end = FrontEndManager().load_by_framework("pytorch")
    model = front_end.convert(front_end.load(traced))
    model.reshape({port: openvino.PartialShape([1, *array.shape[1:]]) for port, array in zip(model.inputs, example)})
    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(model)
    return model


def _quantizable_convolutions(model: Any) -> List[Any]:
    """The convolutions (and transposed ones) whose weights are constants."""
    return [node for node in model.get_ordered_ops()
            if node.get_type_name() in ("Convolution", "ConvolutionBackpropData")
            and node.input_value(1).get_node().get_type_name() == "Constant"]


def _output_key(output: Any) -> Tuple[str, int]:
    return output.get_node().get_friendly_name(), output.get_index()


def _activation_ranges(model: Any, convolutions: List[Any], calibration: Sequence[Sequence[np.ndarray]]
                       ) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """(low, high) of each convolution input over the calibration inputs, widened to contain 0."""
    probe = model.clone()
    by_name = {node.get_friendly_name(): node for node in probe.get_ordered_ops()}
    sources: Dict[Tuple[str, int], str] = {}
    for convolution in convolutions:
        source = by_name[convolution.get_friendly_name()].input_value(0)
        key = _output_key(source)
        if key not in sources:
            sources[key] = f"calibration_{len(sources)}"
            source.get_tensor().add_names({sources[key]})
            probe.add_outputs([source])
    compiled = openvino_core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    ranges = {key: (0.0, 0.0) for key in sources}
    for inputs in calibration:
        results = request.infer(list(inputs))
        for key, name in sources.items():
            values = results[compiled.output(name)]
            low, high = ranges[key]
            ranges[key] = (min(low, float(values.min())), max(high, float(values.max())))
    return ranges


def _fake_quantize(source: Any, low: np.ndarray, high: np.ndarray, levels: int) -> Any:
    import_openvino()
    from openvino import opset13

    low_constant, high_constant = opset13.constant(np.asarray(low)), opset13.constant(np.asarray(high))
    return opset13.fake_quantize(source, low_constant, high_constant, low_constant, high_constant, levels)
