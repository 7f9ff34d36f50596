"""The int8 decoder through OpenVINO ("openvino-int8"): its quantisation, its cache on disk, when "auto" picks
it, and that nothing in it talks to the network. Its agreement with float32 on the real CTs, batches and
sessions is checked with the other precisions in test_inference.py; speed by bench/bench_cpu_decoders.py.

openvino is in the test extra: a missing package fails here, it is never skipped."""

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from CTSAM3DLib import inference, openvino_cache
from CTSAM3DLib.inference import available_precisions, choose_precision, prepare_network
from CTSAM3DLib.model import build_model
from CTSAM3DLib.model.openvino_decoder import calibration_inputs, import_openvino, openvino_core, phantom

openvino = import_openvino()  # quietly (see test_building_and_running_the_decoder_sends_nothing_anywhere)
CPU = torch.device("cpu")
REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif("int8" not in available_precisions(CPU),
                                reason="OpenVINO's int8 path is offered only on CPUs with int8 convolutions")


@pytest.fixture(scope="module")
def built(reference_net, tmp_path_factory):
    """A cache folder holding the decoder of ``reference_net`` (built once for the module)."""
    folder = tmp_path_factory.mktemp("built")
    openvino_cache.openvino_decoder(reference_net, 2, False, folder / "openvino")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder for this test -> its ``openvino`` folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CTSAM3D_CACHE", str(folder))
    return folder / "openvino"


@pytest.fixture
def cached(built, tmp_path, monkeypatch):
    """A copy of ``built`` for this test -> its ``openvino`` folder."""
    folder = tmp_path / "cached"
    shutil.copytree(built, folder)
    monkeypatch.setenv("CTSAM3D_CACHE", str(folder))
    return folder / "openvino"


def decode_twice(decoder, net, image):
    """A first click and a refining one on ``image`` (1,1,64^3), through ``decoder(features, prompt)``."""
    points = torch.tensor([[[32.0, 32.0, 32.0], [40.0, 30.0, 27.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        features = net.encode(image)
        first, _ = decoder(features, net.decoder_prompt(points[:, :1], labels[:, :1], None, torch.float32))
        return decoder(features, net.decoder_prompt(points, labels, first, torch.float32))


def test_auto_picks_openvino_where_it_imports_and_int8_where_it_does_not(monkeypatch):
    assert "openvino-int8" in available_precisions(CPU) and choose_precision(CPU) == "openvino-int8"
    monkeypatch.setattr(inference, "openvino_available", lambda: False)
    assert "openvino-int8" not in available_precisions(CPU) and choose_precision(CPU) == "int8"
    with pytest.raises(ValueError, match="precision 'openvino-int8' is not available on cpu"):
        prepare_network(build_model("tiny"), CPU, "openvino-int8")


def test_the_decoder_is_built_once_then_read_from_the_cache(reference_net, cache, monkeypatch):
    first = prepare_network(reference_net, CPU, "openvino-int8")
    kept = list(cache.iterdir())
    assert [path.name for path in kept] == [openvino_cache.decoder_key(reference_net.mask_decoder)]
    assert sorted(path.name for path in kept[0].iterdir()) == ["decoder.bin", "decoder.xml"]
    assert kept[0].joinpath("decoder.bin").stat().st_size < 40e6, "weights kept as int8 codes, not float32"

    def no_build(*args, **kwargs):
        raise AssertionError("the cached decoder must be read, not built again")

    monkeypatch.setattr(openvino_cache, "quantized_decoder_model", no_build)
    second = prepare_network(reference_net, CPU, "openvino-int8")
    image, _, _ = phantom(11)
    expected, expected_quality = decode_twice(first._cpu_decoder, reference_net, image)
    probability, quality = decode_twice(second._cpu_decoder, reference_net, image)
    assert torch.equal(probability, expected) and torch.equal(quality, expected_quality)


def test_other_weights_get_another_model(reference_net, cached):
    other = copy.deepcopy(reference_net)
    with torch.no_grad():
        other.mask_decoder.spade5.conv_1.weight.mul_(0.5)
    assert openvino_cache.decoder_key(other.mask_decoder) != openvino_cache.decoder_key(reference_net.mask_decoder)
    image, _, _ = phantom(12)
    ours, _ = decode_twice(prepare_network(reference_net, CPU, "openvino-int8")._cpu_decoder, reference_net, image)
    theirs, _ = decode_twice(prepare_network(other, CPU, "openvino-int8")._cpu_decoder, other, image)
    assert len(list(cached.iterdir())) == 2 and not torch.equal(ours, theirs)


def test_an_unreadable_cached_model_is_built_again_with_a_warning(reference_net, cached):
    place = cached / openvino_cache.decoder_key(reference_net.mask_decoder)
    (place / "decoder.xml").write_text("<net>truncated")
    with pytest.warns(UserWarning, match="cannot be read.*building it again"):
        prepared = prepare_network(reference_net, CPU, "openvino-int8")
    assert openvino_core().read_model(str(place / "decoder.xml")) is not None, "the cache was repaired"
    probability, _ = decode_twice(prepared._cpu_decoder, reference_net, phantom(13)[0])
    assert probability.shape == (1, 1, 64, 64, 64)


def test_a_file_in_the_caches_place_costs_a_warning_not_the_session(reference_net, tmp_path, monkeypatch):
    """As with a read-only folder, in a form that root (as in CI) cannot write through either."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CTSAM3D_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="cannot be kept"):
        prepared = prepare_network(reference_net, CPU, "openvino-int8")
    assert decode_twice(prepared._cpu_decoder, reference_net, phantom(15)[0])[0].shape == (1, 1, 64, 64, 64)
    assert blocker.read_text() == "not a folder"


def test_threads_decoding_at_once_each_get_their_own_answer(reference_net, cached):
    prepared = prepare_network(reference_net, CPU, "openvino-int8")
    images = [phantom(seed)[0] for seed in (21, 22, 23)]
    expected = [decode_twice(prepared._cpu_decoder, reference_net, image)[0] for image in images]
    results = [None] * len(images)

    def work(index):
        results[index] = decode_twice(prepared._cpu_decoder, reference_net, images[index])[0]

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, wanted in zip(results, expected):
        assert torch.equal(got, wanted)


SIGNAL_AFTER_TWO_DECODERS = """
import gc, signal, sys
from CTSAM3DLib.model.openvino_decoder import OpenVinoDecoder, import_openvino
read = lambda: import_openvino().Core().read_model(sys.argv[1])
first, second = OpenVinoDecoder(read(), 1, False), OpenVinoDecoder(read(), 1, False)
del first; gc.collect()
del second; gc.collect()
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_signal_after_two_decoders_were_dropped_is_handled_not_a_crash(built):
    # Two sessions closed in the order they were opened, then Ctrl+C (or a DataLoader worker's exit, which
    # is how the full test run died): each decoder used to own a Core whose CPU plugin unmapped the main
    # thread's signal stack when it went, and the signal killed the process with SIGSEGV.
    model = next(built.glob("openvino/*/decoder.xml"))
    result = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_TWO_DECODERS, str(model)],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert (result.returncode, result.stdout.strip()) == (0, "interrupted"), result.stderr[-3000:]


def test_calibration_phantoms_look_like_normalised_ct_patches(reference_net):
    inputs = calibration_inputs(reference_net, count=4)
    assert len(inputs) == 4
    image, click, mask = phantom(3)
    assert image.shape == mask.shape == (1, 1, 64, 64, 64) and image.min() >= 0 and image.max() <= 1
    x, y, z = click[0, 0].round().long().tolist()
    assert mask[0, 0, z, y, x] == 1, "the positive click lies in the ellipsoid it is the mask of"
    assert [array.shape for array in inputs[0]] == [(1, 128, 16, 16, 16), (1, 128, 8, 8, 8), (1, 128, 4, 4, 4),
                                                    (1, 256, 2, 2, 2), (1, 3, 64, 64, 64)]
    assert not inputs[0][4][0, 0].any() and inputs[1][4][0, 0].any(), "with and without a previous mask"
    np.testing.assert_array_equal(calibration_inputs(reference_net, count=1)[0][4], inputs[0][4])


TELEMETRY_PROBE = """
import json, os, socket, sys
import openvino_telemetry
import torch

connections, telemetry = [], []


def refuse(self, address):
    connections.append(str(address))
    raise OSError("this test allows no connection")


def note(self, *args, **kwargs):
    telemetry.append(kwargs.get("app_name") or (args[:1] or ["?"])[0])
    self.consent = False  # what a declined user's instance holds: it sends nothing


socket.socket.connect = refuse
openvino_telemetry.Telemetry.__init__ = note
if sys.argv[1] == "plain":
    import openvino
else:
    from CTSAM3DLib.inference import prepare_network
    from CTSAM3DLib.model import build_model

    prepare_network(build_model("tiny"), torch.device("cpu"), "openvino-int8")
    import openvino
    openvino.convert_model(torch.nn.Linear(2, 2), example_input=torch.zeros(1, 2))
print(json.dumps({"connections": connections, "telemetry": telemetry, "nncf": "nncf" in sys.modules,
                  "consent_folder": os.path.exists(os.path.expanduser("~/intel"))}))
"""


def telemetry_probe(mode, home):
    environment = {**os.environ, "CTSAM3D_CACHE": str(home), "CI": "", "HOME": str(home)}
    child = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, mode], cwd=REPO_ROOT, env=environment,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_building_and_running_the_decoder_sends_nothing_anywhere(tmp_path):
    """A plain ``import openvino`` starts OpenVINO's usage statistics (and so would its converter and NNCF,
    unless the user opted out). Through CTSAM3DLib none starts, even for a convert_model call afterwards in
    the same process; no connection is opened and no consent folder written."""
    assert telemetry_probe("plain", tmp_path / "plain")["telemetry"], "the probe must see openvino's statistics"
    assert telemetry_probe("ours", tmp_path / "ours") == {"connections": [], "telemetry": [], "nncf": False,
                                                          "consent_folder": False}
