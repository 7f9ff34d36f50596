"""Checkpoints: the authors' layout round-trips, nothing in a file is ever executed, nothing is
partially loaded, and every refusal names the file and the problem."""

import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch

from CTSAM3DLib import CheckpointError, build_model, load_checkpoint, read_checkpoint, resolve_device, save_checkpoint
from CTSAM3DLib.reference_weights import deterministic_state_dict


@pytest.fixture(scope="module")
def reference_state():
    return deterministic_state_dict(build_model("tiny"))


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory, reference_state):
    path = tmp_path_factory.mktemp("weights") / "params.pth"
    torch.save({"model_state_dict": reference_state}, path)
    return path


def assert_state_equal(net, state):
    ours = net.state_dict()
    assert list(ours) == list(state)
    for key, value in state.items():
        assert torch.equal(ours[key].cpu(), value), key


def test_authors_layout_round_trips(tmp_path, authors_file, reference_state):
    net = load_checkpoint(authors_file, device="cpu")
    assert not net.training
    assert_state_equal(net, reference_state)
    saved = save_checkpoint(tmp_path / "again.pth", net, extra={"epoch": 7, "note": "round trip"})
    content = read_checkpoint(saved)
    assert set(content) == {"model_state_dict", "epoch", "note"}
    assert_state_equal(load_checkpoint(saved, device="cpu"), reference_state)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_module_prefixed_and_bare_state_dicts_load(tmp_path, reference_state):
    prefixed = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": OrderedDict(("module." + k, v) for k, v in reference_state.items())}, prefixed)
    assert_state_equal(load_checkpoint(prefixed, device="cpu"), reference_state)
    bare = tmp_path / "bare.pth"
    torch.save(reference_state, bare)
    assert_state_equal(load_checkpoint(bare, device="cpu"), reference_state)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, reference_state):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": reference_state, "config": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: refusing to load '(posix|nt)\.system'"):
        load_checkpoint(path, device="cpu")
    assert not marker.exists()


def test_a_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "legacy.pth"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as stream:
        pickle.dump({"model_state_dict": Payload()}, stream, protocol=2)
    with pytest.raises(CheckpointError, match="legacy.pth"):
        load_checkpoint(path, device="cpu")
    assert not marker.exists()


def test_the_authors_config_object_becomes_a_plain_dict(tmp_path, reference_state, monkeypatch):
    module = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for key, value in self.items():
                setattr(self, key, value)

    EasyDict.__module__ = "easydict"
    EasyDict.__qualname__ = "EasyDict"
    module.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", module)
    path = tmp_path / "with-config.pth"
    torch.save({"model_state_dict": reference_state, "cfg": EasyDict(network="restv2_tiny", crop_size=[64, 64, 64])},
               path)
    monkeypatch.delitem(sys.modules, "easydict")
    content = read_checkpoint(path)
    assert type(content["cfg"]) is dict
    assert content["cfg"] == {"network": "restv2_tiny", "crop_size": [64, 64, 64]}
    assert_state_equal(load_checkpoint(path, device="cpu"), reference_state)


def test_missing_extra_and_misshaped_keys_are_named(tmp_path, reference_state):
    broken = OrderedDict(reference_state)
    del broken["mask_decoder.spade3.conv_0.weight"]
    broken["mask_decoder.extra.weight"] = torch.zeros(3)
    broken["cpp_predictor.model.2.0.conv.bias"] = torch.zeros(2)
    path = tmp_path / "broken.pth"
    torch.save({"model_state_dict": broken}, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, device="cpu")
    message = str(raised.value)
    assert "broken.pth" in message
    assert "1 missing: mask_decoder.spade3.conv_0.weight" in message
    assert "1 unexpected: mask_decoder.extra.weight" in message
    assert "cpp_predictor.model.2.0.conv.bias (2,) (expected (1,))" in message


def test_truncated_and_foreign_files_name_the_file(tmp_path, authors_file):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(authors_file.read_bytes()[: 1_000_000])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(truncated, device="cpu")
    foreign = tmp_path / "scan.nii.gz"
    foreign.write_bytes(b"\x1f\x8b\x08\x00" + bytes(200))
    with pytest.raises(CheckpointError, match="scan.nii.gz"):
        load_checkpoint(foreign, device="cpu")
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*absent.pth"):
        load_checkpoint(tmp_path / "absent.pth", device="cpu")


def test_a_non_ctsam3d_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="not a CT-SAM3D checkpoint"):
        load_checkpoint(path, device="cpu")


def test_a_failed_save_leaves_no_file(tmp_path):
    target = tmp_path / "never.pth"
    with pytest.raises(ValueError):
        save_checkpoint(target, {"a": torch.zeros(1)}, extra={"model_state_dict": {}})
    assert list(tmp_path.iterdir()) == []


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="Apple MPS is not available"):
            resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
