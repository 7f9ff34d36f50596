"""Interactive speed of CT-SAM3D: every precision path against plain float32.

Measures, with warm-up and medians over repeats, per device and precision:
- the network alone: the image encoder, the decoder (a refining click: two clicks and a mask prompt);
- the session's own cost: ``InteractiveSession`` with an *instant* network (the encoder returns its
  input, the decoder a fixed ball), for a click that opens a patch and a refining click, with each way
  of sampling patches (exact SimpleITK, or torch where the network runs);
- through ``InteractiveSession.add_click``: a click that opens a patch and a refining click (patch
  sampling and the mask update included), with the Dice and largest probability difference against
  float32, and one click that cross-patch prompting carries into 16 patches (``--cross-patch-cap``), with
  when its first preview (the clicked patch alone, ``PreviewCallback``) was ready;
- in a fresh process: the session's start, its first click and a later click that opens a patch
  (the warm-up a user would feel), and the peak memory.
Then the agreement with float32 on patches of every CT in ../shared/data. Runs on the CPU, and on the
GPU when torch sees one. Writes a markdown table (``--output``).

    python -m bench.bench_inference                    # everything, 5 repeats
    python -m bench.bench_inference --repeats 9 --output bench/results.md

The weights are the deterministic reference weights (same numbers as the authors' fixture), not
trained ones: timings are those of the real network; masks carry no anatomical meaning.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from bench.common import (
    REPO_ROOT,
    central_patch,
    dice,
    load_network,
    log,
    machine_description,
    shared_data,
    synchronise,
    timed,
)
from CTSAM3DLib import InteractiveSession
from CTSAM3DLib.inference import available_precisions, choose_precision, prepare_network
from CTSAM3DLib.runtime import Runtime
from standins.networks import InstantNetwork

CTS = ("chest-abdomen-ct", "abdomen-ct-3mm", "aorta-ct-1.5mm", "body-ct-3mm")
TIMED_CT = "chest-abdomen-ct"


def agreement(probability: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
    """(Dice of the masks at 0.5, largest absolute probability difference)."""
    p, r = probability.float().cpu().numpy(), reference.float().cpu().numpy()
    return dice(p > 0.5, r > 0.5), float(np.abs(p - r).max())


# ---------------------------------------------------------------------------- memory
def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the peak resident set size (VmHWM).
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _status_kib("VmHWM")
    return None if peak is None else peak / 1024


# ---------------------------------------------------------------------------- inputs
def central_points(image: sitk.Image) -> List[Tuple[float, float, float]]:
    """Three click points (LPS) near the scan's centre, all within one patch: the first opens it."""
    size = np.array(image.GetSize(), dtype=np.float64)
    spacing = np.array(image.GetSpacing())
    centre = (size - 1) / 2
    step = 10.0 / spacing  # 10 mm in voxels
    indices = [centre, centre + step * np.array([1, 0, 0]), centre + step * np.array([0, -1, 1])]
    return [image.TransformContinuousIndexToPhysicalPoint(index.tolist()) for index in indices]


def decoder_inputs(device: torch.device):
    """Clicks (x, y, z patch voxels) of a refining step: a positive click at the centre and a negative one."""
    points = torch.tensor([[[32.0, 32.0, 32.0], [40.0, 30.0, 27.0]]], device=device)
    labels = torch.tensor([[1, 0]], device=device)
    return points, labels


# ---------------------------------------------------------------------------- measurements
def network_rows(net, image, device, precisions, repeats) -> Tuple[List[Dict], Dict]:
    """Encoder and decoder alone, per precision, against float32 on the same inputs. The
    precisions take turns within every repeat, so a change in the machine's load hits them alike."""
    patch = central_patch(image).to(device)
    points, labels = decoder_inputs(device)
    prepared = {precision: prepare_network(net, device, precision) for precision in precisions}
    with torch.no_grad():
        features = prepared["float32"].encode(patch)
        first, _ = prepared["float32"].decode(features, points[:, :1], labels[:, :1])
        expected, _ = prepared["float32"].decode(features, points, labels, first)
        times = {precision: {"encode": [], "decode": []} for precision in precisions}
        for repeat in range(repeats + 1):  # the first round warms up
            log(f"  network, round {repeat + 1} of {repeats + 1}")
            for precision, network in prepared.items():
                encode_s = timed(lambda n=network: n.encode(patch), device)
                decode_s = timed(lambda n=network: n.decode(features, points, labels, first), device)
                if repeat:
                    times[precision]["encode"].append(encode_s)
                    times[precision]["decode"].append(decode_s)
        rows = []
        for precision, network in prepared.items():
            decoded, _ = network.decode(features, points, labels, first)
            end_to_end, _ = network.decode(network.encode(patch), points, labels, first)
            decoder_dice, decoder_diff = agreement(decoded, expected)
            both_dice, both_diff = agreement(end_to_end, expected)
            rows.append({
                "precision": precision,
                "encode": statistics.median(times[precision]["encode"]),
                "decode": statistics.median(times[precision]["decode"]),
                "decoder_dice": decoder_dice, "decoder_diff": decoder_diff,
                "both_dice": both_dice, "both_diff": both_diff,
            })
    baseline = {key: rows[0][key] for key in ("encode", "decode")}
    return rows, baseline


Steps = Dict[str, float]


def session_clicks(session: InteractiveSession, clicks) -> Tuple[float, List[float], Steps, Steps]:
    """From an empty session: (seconds of the click that opens the patch, seconds of each refining
    click, the step timings of the opening click and of the first refining click). A click's time is
    the whole add_click call, its mask update included."""
    session.reset()
    opening = timed(lambda: session.add_click(*clicks[0]), session.device)
    opening_steps = dict(session.last_timing)
    refining, steps = [], {}
    for click in clicks[1:]:
        refining.append(timed(lambda c=click: session.add_click(*c), session.device))
        steps = steps or dict(session.last_timing)
    return opening, refining, opening_steps, steps


def overhead_rows(image, device, repeats) -> List[Dict]:
    """The session's own cost per click, with InstantNetwork, for each way of sampling patches."""
    first, second, third = central_points(image)
    clicks = [(first, True), (second, True), (third, False)]
    rows = []
    for sampling in ("exact", "device"):
        session = InteractiveSession(InstantNetwork(device), image, device=device, cross_patch=False,
                                     sampling=sampling)
        opening, refining, sample, paste, refine_paste = [], [], [], [], []
        for repeat in range(repeats + 1):
            open_s, refine_s, open_steps, refine_steps = session_clicks(session, clicks)
            if repeat:
                opening.append(open_s)
                refining.extend(refine_s)
                sample.append(open_steps["sample"])
                paste.append(open_steps["paste"])
                refine_paste.append(refine_steps["paste"])
        rows.append({"sampling": sampling, "open": statistics.median(opening),
                     "refine": statistics.median(refining), "sample": statistics.median(sample),
                     "paste": statistics.median(paste), "refine_paste": statistics.median(refine_paste)})
    return rows


def session_rows(net, image, device, precisions, repeats, data_dir: Path, cross_patch_cap: int = 16) -> List[Dict]:
    """New-patch and refining clicks through InteractiveSession, per precision taking turns
    within every repeat; masks and probabilities compared with the float32 session after the same
    clicks; a click carried into ``cross_patch_cap`` patches; then each precision's warm-up and peak memory in a
    process of its own."""
    first, second, third = central_points(image)
    clicks = [(first, True), (second, True), (third, False)]

    def new_session(precision: str) -> InteractiveSession:
        # One patch per click: cross-patch prompting would add a variable number of neighbour
        # patches (each an encoder, U-Net and decoder run), which the per-click targets exclude.
        return InteractiveSession(runtimes[precision], image, cross_patch=False)

    runtimes = {precision: Runtime(net, device, precision) for precision in precisions}
    sessions = {precision: new_session(precision) for precision in precisions}
    opening = {precision: [] for precision in precisions}
    refining = {precision: [] for precision in precisions}
    pastes = {precision: [] for precision in precisions}
    for repeat in range(repeats + 1):
        log(f"  session, round {repeat + 1} of {repeats + 1}")
        for precision, session in sessions.items():
            open_s, refine_s, _, steps = session_clicks(session, clicks)
            if repeat:
                opening[precision].append(open_s)
                refining[precision].extend(refine_s)
                pastes[precision].append(steps.get("paste", float("nan")))
    results = []
    reference = sessions["float32"]
    expected_mask = reference.mask_array()
    expected_probability = sitk.GetArrayFromImage(reference.probability())
    for precision, session in sessions.items():
        results.append({
            "precision": precision,
            "open": statistics.median(opening[precision]),
            "refine": statistics.median(refining[precision]),
            "paste": statistics.median(pastes[precision]),
            "dice": dice(session.mask_array(), expected_mask),
            "diff": float(np.abs(sitk.GetArrayFromImage(session.probability()) - expected_probability).max()),
        })
    sessions.clear()
    for row in results:
        row.update(cross_patch_run(runtimes[row["precision"]], image, max(1, repeats // 2), cross_patch_cap))
        row.update(fresh_process(device, row["precision"], data_dir))
    return results


def cross_patch_run(runtime: Runtime, image, repeats, cap: int = 16) -> Dict[str, float]:
    """One click that cross-patch prompting carries into 16 patches (the reference weights' masks reach
    every neighbour, so the cap is what stops it): median seconds and the patches it opened."""
    precision = runtime.precision
    session = InteractiveSession(runtime, image, max_patches=cap)
    times, first_previews = [], []
    for repeat in range(repeats + 1):
        log(f"  {cap}-patch click ({precision}), round {repeat + 1} of {repeats + 1}")
        session.reset()
        previews: List[float] = []

        def note_preview(update, previews=previews) -> None:
            previews.append(time.perf_counter())

        started = time.perf_counter()
        seconds = timed(lambda: session.add_click(central_points(image)[0], preview=note_preview), session.device)
        if repeat:
            times.append(seconds)
            first_previews.append(previews[0] - started if previews else seconds)
    return {"cross_patch": statistics.median(times), "cross_patch_patches": session.patch_count,
            "cross_patch_first_preview": statistics.median(first_previews)}


def fresh_process(device, precision, data_dir: Path) -> Dict[str, Optional[float]]:
    """What a user's first session costs, from a process of its own (this one's caches and leftovers
    would hide it): session start, first click, a later click that opens a patch, and peak memory (on
    the GPU what torch allocated; on the CPU the peak resident set)."""
    child = subprocess.run(
        [sys.executable, "-m", "bench.bench_inference", "--fresh-child", precision, "--data", str(data_dir),
         "--devices", str(device)],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        log(f"  fresh-process measurement for {precision} failed: {child.stderr.strip()[-300:]}")
        return {"start": None, "first": None, "later": None, "peak_mb": None}
    return json.loads(lines[-1])


def fresh_child(device: torch.device, precision: str, data_dir: Path) -> int:
    """The body of ``fresh_process``: prints {"start", "first", "later", "peak_mb"}."""
    image = sitk.ReadImage(str(data_dir / TIMED_CT / "ct.nii.gz"))
    net = load_network()
    gc.collect()
    # From here on: making the deterministic weights (float64 on the way) is no part of a session.
    reset_peak_memory(device)
    started = time.perf_counter()
    session = InteractiveSession(net, image, device=device, precision=precision, cross_patch=False)
    synchronise(device)
    start = time.perf_counter() - started
    first, second, third = central_points(image)
    first_s = timed(lambda: session.add_click(first), device)
    session.add_click(second)
    session.add_click(third, False)
    # As much work as the first click: a patch opened 120 mm away, where no patch is open.
    later_s = timed(lambda: session.add_click(np.add(first, (0.0, 0.0, 120.0))), device)
    print(json.dumps({"start": start, "first": first_s, "later": later_s, "peak_mb": peak_memory_mb(device)}))
    return 0


def accuracy_rows(net, data_dir: Path, device, precisions) -> List[Dict]:
    """Dice and largest probability difference against float32 on one patch of every CT
    (three clicks, each refining with the previous probability as mask prompt)."""
    rows = []
    prepared = {precision: prepare_network(net, device, precision) for precision in precisions}
    for name in CTS:
        path = data_dir / name / "ct.nii.gz"
        if not path.exists():
            raise SystemExit(f"missing {path}: the benchmark reads the real CTs of ../shared/data")
        patch = central_patch(sitk.ReadImage(str(path))).to(device)
        points = torch.tensor([[[32.0, 32.0, 32.0], [40.0, 30.0, 27.0], [24.0, 36.0, 30.0]]], device=device)
        labels = torch.tensor([[1, 0, 1]], device=device)
        outputs = {}
        with torch.no_grad():
            for precision, network in prepared.items():
                features = network.encode(patch)
                probability = None
                for count in (1, 2, 3):
                    probability, _ = network.decode(features, points[:, :count], labels[:, :count], probability)
                outputs[precision] = probability
        for precision in precisions:
            if precision == "float32":
                continue
            value_dice, value_diff = agreement(outputs[precision], outputs["float32"])
            rows.append({"ct": name, "precision": precision, "dice": value_dice, "diff": value_diff})
    return rows


# ---------------------------------------------------------------------------- report
def ratio(value: float, base: Optional[float]) -> str:
    return f"{base / value:.2f}x" if base else "-"


def seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(device, machine, overhead, network, base, sessions, accuracy, volume_mb, command) -> str:
    lines = [
        f"### {device.type.upper()}: {machine}",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}; command: `{command}`; "
        f"\"auto\" here means `{choose_precision(device)}`.",
        "",
        f"The session's own work per click on {TIMED_CT} (an instant network; milliseconds):",
        "",
        "| sampling | new-patch click | refining click | of which sampling (new patch) "
        "| paste (new patch / refining) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in overhead:
        lines.append(
            f"| {row['sampling']} | {1e3 * row['open']:.1f} | {1e3 * row['refine']:.1f} | {1e3 * row['sample']:.1f} "
            f"| {1e3 * row['paste']:.1f} / {1e3 * row['refine_paste']:.1f} |"
        )
    lines += [
        "",
        "The network alone:",
        "",
        "| path | encoder (s) | decoder (s) | speed-up enc / dec | decoder Dice vs fp32 | decoder max abs dp "
        "| encoder+decoder Dice | max abs dp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in network:
        lines.append(
            f"| {row['precision']} | {row['encode']:.3f} | {row['decode']:.3f} | "
            f"{ratio(row['encode'], base.get('encode'))} / {ratio(row['decode'], base.get('decode'))} | "
            f"{row['decoder_dice']:.4f} | {row['decoder_diff']:.4f} | {row['both_dice']:.4f} | {row['both_diff']:.4f} |"
        )
    session_base = next((row for row in sessions if row["precision"] == "float32"), None)
    lines += [
        "",
        f"Through `InteractiveSession.add_click` on {TIMED_CT} (512x512x133, {volume_mb:.0f} MB as loaded), "
        "seconds:",
        "",
        "| path | new-patch click | refining click | of which paste | speed-up new / refine "
        "| mask Dice vs fp32 | max abs dp | cross-patch click | its first preview |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sessions:
        lines.append(
            f"| {row['precision']} | {row['open']:.3f} | {row['refine']:.3f} | {row['paste']:.3f} | "
            f"{ratio(row['open'], session_base and session_base['open'])} / "
            f"{ratio(row['refine'], session_base and session_base['refine'])} | "
            f"{row['dice']:.4f} | {row['diff']:.4f} | {row['cross_patch']:.3f} ({row['cross_patch_patches']} "
            f"patches) | {row['cross_patch_first_preview']:.3f} |"
        )
    lines += [
        "",
        "A user's first session, in a fresh process (seconds; warm-up = first click minus a later click that "
        "opens a patch):",
        "",
        "| path | session start | first click | later new-patch click | warm-up | peak memory (MB) "
        "| above the volume (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sessions:
        warm_up = None if row["first"] is None else row["first"] - row["later"]
        peak = "- | -" if row["peak_mb"] is None else f"{row['peak_mb']:.0f} | {row['peak_mb'] - volume_mb:.0f}"
        lines.append(
            f"| {row['precision']} | {seconds(row['start'])} | {seconds(row['first'])} | {seconds(row['later'])} "
            f"| {seconds(warm_up)} | {peak} |"
        )
    if accuracy:
        lines += ["", "Agreement with float32 on every CT (one central patch, three clicks):", "",
                  "| CT | path | Dice | max abs dp |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['ct']} | {r['precision']} | {r['dice']:.4f} | {r['diff']:.4f} |" for r in accuracy]
    peak_label = "peak GPU memory allocated by torch during one session's four clicks" if device.type == "cuda" else (
        "peak resident memory of a fresh process (Python, torch, float32 network, the CT as loaded) while it opens "
        f"a session and makes four clicks; above the volume means minus its {volume_mb:.0f} MB")
    lines += ["", f"Memory: {peak_label}.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data(),
                        help="folder of the real CTs (default: ../shared/data beside the clone)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to measure (default: cpu, and cuda when present)")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="precisions to compare (default: every one available on the device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip the agreement table over every CT")
    parser.add_argument("--cross-patch-cap", type=int, default=16,
                        help="patches the cross-patch click may open (the reference weights' masks reach them all)")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--fresh-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fresh_child:
        return fresh_child(torch.device(args.devices[0]), args.fresh_child, args.data)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    chest_path = args.data / TIMED_CT / "ct.nii.gz"
    if not chest_path.exists():
        parser.error(f"missing {chest_path}: point --data at the shared CTs")
    image = sitk.ReadImage(str(chest_path))
    volume_mb = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent() / 2**20
    net = load_network()
    command = "python -m bench.bench_inference " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    for name in devices:
        device = torch.device(name)
        available = [p for p in available_precisions(device) if p != "auto"]
        precisions = ["float32"] + [p for p in (args.precisions or available) if p != "float32" and p in available]
        machine = machine_description(device)
        log(f"{device}: {machine}; precisions {', '.join(precisions)}")
        overhead = overhead_rows(image, device, args.repeats)
        network, base = network_rows(net, image, device, precisions, args.repeats)
        sessions = session_rows(net, image, device, precisions, args.repeats, args.data, args.cross_patch_cap)
        accuracy = [] if args.skip_accuracy else accuracy_rows(net, args.data, device, precisions)
        sections.append(report(device, machine, overhead, network, base, sessions, accuracy, volume_mb,
                               command.strip()))
    text = "\n".join(sections)
    print(text)
    if args.output:
        temporary = args.output.with_suffix(args.output.suffix + ".part")
        temporary.write_text(text)
        temporary.replace(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
