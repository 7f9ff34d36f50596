"""The mask decoder on a CPU, candidate runtimes side by side on the same patches (issue 26).

    python -m bench.bench_cpu_decoders [--repeats 5] [--output cpu-decoders.md]

For one refining decode (two clicks and the previous mask as prompt) on the central patch of every CT in
../shared/data, each candidate's median seconds on the chest CT's patch (taken in turns, so that machine
noise hits all alike), its speed-up over the float32 network (the authors' decoder) and its lowest mask
Dice against float32 over the CTs:

- float32: ``SpadeMaskDecoder``, the network as the authors run it;
- int8 (torch, today): ``Int8SpadeDecoder`` (oneDNN int8 convolutions, activation scales per call);
- onnxruntime float32 / int8: the decoder exported to ONNX and run by ONNX Runtime; int8 is static
  quantization (QDQ, per-channel weights);
- openvino float32 / bfloat16: the decoder converted by OpenVINO from torch and compiled for its CPU
  plugin with that inference precision;
- openvino int8 (CTSAM3DLib): the project's "openvino-int8" decoder (``CTSAM3DLib.model.openvino_decoder``:
  FakeQuantize on every convolution, calibrated on synthetic phantoms, none of these CTs);
- openvino int8 (NNCF): the decoder converted by OpenVINO, quantized by NNCF (post-training, static
  activation ranges), with its default preset, with the mixed preset (asymmetric activations), the mixed
  preset with full bias correction, and the mixed preset with layers kept in float: the prompt's
  ``mlp_shared`` convolutions (3 input channels), the first SPADE block and the output layers, or the
  first and last SPADE blocks;
- float32 channels-last (torch): the authors' decoder with its weights and inputs in the channels-last 3D
  layout (oneDNN's preferred one);
- batches: the torch decoders given the central patches of all CTs as one batch (what cross-patch
  prompting does with a level of neighbours), seconds per patch.
Static quantization by NNCF and ONNX Runtime is calibrated on the other CTs' patches (the timed chest CT is
held out).

A candidate whose package is missing is reported as such (``pip install onnx onnxruntime onnxscript
openvino nncf``); only openvino is an (optional) dependency of the project. NNCF sends usage statistics to
Intel unless you opted out (``opt_in_out --opt_out``); this script imports openvino with them off.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from bench.common import central_patch, dice, load_network, log, machine_description, shared_data
from CTSAM3DLib.inference import prepare_network

CTS = ("chest-abdomen-ct", "abdomen-ct-3mm", "aorta-ct-1.5mm", "body-ct-3mm")
POINTS = torch.tensor([[[32.0, 32.0, 32.0], [40.0, 30.0, 27.0]]])
LABELS = torch.tensor([[1, 0]])
Decoder = Callable[[List[np.ndarray], np.ndarray], np.ndarray]
"""features (4 arrays), prompt (1,3,64^3) -> probability (1,1,64^3)."""


class DecoderOnly(torch.nn.Module):
    """The SPADE decoder as one module of (features..., prompt), for export."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = net.mask_decoder

    def forward(self, f0, f1, f2, f3, prompt):
        probability, _ = self.decoder([f0, f1, f2, f3], prompt)
        return probability


def inputs_of(net, patch: torch.Tensor):
    """A refining decode's inputs: the features and the prompt (mask prompt from a first click)."""
    with torch.no_grad():
        features = net.encode(patch)
        first, _ = net.decode(features, POINTS[:, :1], LABELS[:, :1])
        prompt = net.decoder_prompt(POINTS, LABELS, first, torch.float32)
    return [f.numpy() for f in features], prompt.numpy()


def export_onnx(net, example, folder: Path) -> Path:
    path = folder / "decoder.onnx"
    features, prompt = example
    arguments = tuple(torch.from_numpy(a) for a in [*features, prompt])
    torch.onnx.export(DecoderOnly(net).eval(), arguments, str(path), input_names=["f0", "f1", "f2", "f3", "prompt"],
                      output_names=["probability"], opset_version=17, dynamo=False)
    return path


def quantize_onnx(path: Path, calibration, folder: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([dict(zip(["f0", "f1", "f2", "f3", "prompt"], [*features, prompt]))
                               for features, prompt in calibration])

        def get_next(self):
            return next(self.items, None)

    output = folder / "decoder-int8.onnx"
    quantize_static(str(path), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return output


def onnxruntime_decoder(path: Path) -> Decoder:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda features, prompt: session.run(None, dict(zip(["f0", "f1", "f2", "f3", "prompt"],
                                                               [*features, prompt])))[0]


def openvino_model(net, example):
    """The decoder in float32 as OpenVINO's PyTorch front end traces it (``convert_model`` would start
    OpenVINO's usage statistics)."""
    from CTSAM3DLib.model.openvino_decoder import traced_decoder

    features, prompt = example
    return traced_decoder(net.mask_decoder, [*features, prompt])


KEPT_IN_FLOAT = {
    "prompt and ends": [r".*mlp_shared.*", r".*spade1\..*", r".*upscale5.*", r"__module\.decoder/aten::_convolution.*"],
    "first and last SPADE blocks": [r".*spade1\..*", r".*spade5\..*"],
}
"""NNCF ignored scopes (node-name patterns of the decoder converted by OpenVINO) of the int8 variants."""


def openvino_int8_model(model, calibration, preset: str = "default", bias_correction: str = "fast",
                        kept_in_float: str = ""):
    import nncf

    options = {}
    if preset == "mixed":
        options["preset"] = nncf.QuantizationPreset.MIXED
    if kept_in_float:
        options["ignored_scope"] = nncf.IgnoredScope(patterns=KEPT_IN_FLOAT[kept_in_float])
    return nncf.quantize(model, nncf.Dataset([[*features, prompt] for features, prompt in calibration]),
                         subset_size=len(calibration), fast_bias_correction=bias_correction == "fast", **options)


def openvino_decoder(model, precision: str) -> Decoder:
    from CTSAM3DLib.model.openvino_decoder import openvino_core

    compiled = openvino_core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    return lambda features, prompt: request.infer([*features, prompt])[compiled.output(0)].copy()


def project_openvino_decoder(net, folder: Path) -> Decoder:
    from CTSAM3DLib.inference import cpu_bfloat16_native
    from CTSAM3DLib.openvino_cache import openvino_decoder as build

    decoder = build(net, torch.get_num_threads(), cpu_bfloat16_native(), folder)

    def run(features, prompt):
        return decoder([torch.from_numpy(f) for f in features], torch.from_numpy(prompt))[0].numpy()

    return run


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only the candidates whose name contains one of these (float32 always runs)")
    args = parser.parse_args(argv)
    net = load_network()
    cases = [name for name in CTS if (args.data / name / "ct.nii.gz").exists()]
    if not cases:
        log(f"no CTs under {args.data}")
        return 2
    examples = {name: inputs_of(net, central_patch(sitk.ReadImage(str(args.data / name / "ct.nii.gz"))))
                for name in cases}
    int8 = prepare_network(net, torch.device("cpu"), "int8")

    def torch_float32(features, prompt):
        with torch.no_grad():
            return net.mask_decoder([torch.from_numpy(f) for f in features], torch.from_numpy(prompt))[0].numpy()

    def torch_int8(features, prompt):
        return int8._cpu_decoder([torch.from_numpy(f) for f in features], torch.from_numpy(prompt))[0].numpy()

    channels_last = copy.deepcopy(net.mask_decoder).to(memory_format=torch.channels_last_3d)

    def torch_float32_channels_last(features, prompt):
        with torch.no_grad():
            inputs = [torch.from_numpy(f).contiguous(memory_format=torch.channels_last_3d) for f in features]
            prompt = torch.from_numpy(prompt).contiguous(memory_format=torch.channels_last_3d)
            return channels_last(inputs, prompt)[0].contiguous().numpy()

    candidates: Dict[str, Decoder] = {"float32 (authors' decoder)": torch_float32, "int8 (torch, today)": torch_int8,
                                      "float32 channels-last (torch)": torch_float32_channels_last}
    batched = {f"int8 (torch), {len(cases)} patches as one batch, per patch": torch_int8,
               f"float32 (torch), {len(cases)} patches as one batch, per patch": torch_float32}
    missing: Dict[str, str] = {}
    calibration = [examples[case] for case in cases[1:]] or [examples[cases[0]]]
    builders = {
        "onnxruntime float32": lambda folder: onnxruntime_decoder(export_onnx(net, examples[cases[0]], folder)),
        "onnxruntime int8": lambda folder: onnxruntime_decoder(
            quantize_onnx(export_onnx(net, examples[cases[0]], folder), calibration, folder)),
        "openvino float32": lambda folder: openvino_decoder(openvino_model(net, examples[cases[0]]), "f32"),
        "openvino bfloat16": lambda folder: openvino_decoder(openvino_model(net, examples[cases[0]]), "bf16"),
        "openvino int8 (CTSAM3DLib, today's openvino-int8)": lambda folder: project_openvino_decoder(net, folder),
        "openvino int8 (NNCF)": lambda folder: openvino_decoder(
            openvino_int8_model(openvino_model(net, examples[cases[0]]), calibration), "f32"),
        "openvino int8 (NNCF, mixed preset)": lambda folder: openvino_decoder(
            openvino_int8_model(openvino_model(net, examples[cases[0]]), calibration, "mixed"), "f32"),
        "openvino int8 (NNCF, mixed, full bias correction)": lambda folder: openvino_decoder(
            openvino_int8_model(openvino_model(net, examples[cases[0]]), calibration, "mixed", "full"), "f32"),
        **{f"openvino int8 (NNCF, mixed, {kept} in float)": functools.partial(
            lambda folder, kept: openvino_decoder(
                openvino_int8_model(openvino_model(net, examples[cases[0]]), calibration, "mixed", "fast", kept),
                "f32"), kept=kept) for kept in KEPT_IN_FLOAT},
    }
    if args.only:
        def chosen(name: str) -> bool:
            return name.startswith("float32 (authors'") or any(text in name for text in args.only)

        candidates = {name: candidate for name, candidate in candidates.items() if chosen(name)}
        batched = {name: candidate for name, candidate in batched.items() if chosen(name)}
        builders = {name: build for name, build in builders.items() if chosen(name)}
    with tempfile.TemporaryDirectory() as folder:
        for name, build in builders.items():
            log(f"building {name}")
            try:
                candidates[name] = build(Path(folder))
            except Exception as error:  # a missing package or a converter's failure: say which
                missing[name] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        results = measure(candidates, batched, examples, args.repeats)
    report = table(results, missing, args)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


def measure(candidates: Dict[str, Decoder], batched: Dict[str, Decoder], examples,
            repeats: int) -> Dict[str, Dict[str, float]]:
    """Median seconds per patch on the first CT's patch (``batched``: on every CT's patch as one batch) and the
    lowest Dice against float32 over the CTs; the candidates are timed in turns, round after round."""
    reference = {name: candidates["float32 (authors' decoder)"](*example) for name, example in examples.items()}
    batch = ([np.concatenate(level) for level in zip(*(features for features, _ in examples.values()))],
             np.concatenate([prompt for _, prompt in examples.values()]))
    timed = {**{name: (candidate, next(iter(examples.values())), 1) for name, candidate in candidates.items()},
             **{name: (candidate, batch, len(examples)) for name, candidate in batched.items()}}
    times: Dict[str, List[float]] = {name: [] for name in timed}
    for candidate, inputs, _ in timed.values():
        candidate(*inputs)  # warm-up
    for round_number in range(repeats):
        log(f"round {round_number + 1} of {repeats}")
        for name, (candidate, inputs, patches) in timed.items():
            started = time.perf_counter()
            candidate(*inputs)
            times[name].append((time.perf_counter() - started) / patches)
    results = {}
    for name, candidate in candidates.items():
        dices = [dice(candidate(*example) > 0.5, reference[case] > 0.5) for case, example in examples.items()]
        results[name] = {"seconds": statistics.median(times[name]), "dice": min(dices)}
    for name, candidate in batched.items():
        probabilities = candidate(*batch)
        dices = [dice(probabilities[row:row + 1] > 0.5, reference[case] > 0.5) for row, case in enumerate(examples)]
        results[name] = {"seconds": statistics.median(times[name]), "dice": min(dices)}
    return results


def table(results, missing, args) -> str:
    base = results["float32 (authors' decoder)"]["seconds"]
    only = f" --only {' '.join(repr(text) for text in args.only)}" if args.only else ""
    lines = [f"`python -m bench.bench_cpu_decoders --repeats {args.repeats}{only}` on "
             f"{machine_description(torch.device('cpu'))}, torch {torch.__version__}", "",
             "| candidate | refining decode, per patch (s) | speed-up over float32 | lowest mask Dice vs float32 |",
             "| --- | --- | --- | --- |"]
    for name, found in results.items():
        lines.append(f"| {name} | {found['seconds']:.3f} | {base / found['seconds']:.2f}x | {found['dice']:.4f} |")
    lines += [f"| {name} | not run: {why} | | |" for name, why in missing.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
