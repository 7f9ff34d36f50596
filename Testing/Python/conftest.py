"""Shared fixtures: the real data and reference files in ``../shared`` beside the clone.

A missing data folder is a failure, never a skip: a suite that silently skips its data tests
proves nothing.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("CTSAM3D_SHARED", REPO_ROOT.parent / "shared"))
DATA_DIR = SHARED_DIR / "data"
REFERENCE_DIR = SHARED_DIR / "reference"
REFERENCE_FIXTURE = REFERENCE_DIR / "official_restv2_tiny_reference.npz"
REFERENCE_LAYOUT = REFERENCE_DIR / "official_restv2_tiny_state_dict.tsv"


def require(path: Path) -> Path:
    """Return ``path`` or fail the test loudly when it does not exist."""
    if not path.exists():
        pytest.fail(
            f"required test data is missing: {path} (the suite reads ../shared beside the clone; "
            "set CTSAM3D_SHARED to its location)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache_folder(tmp_path_factory):
    """``CTSAM3D_CACHE`` for the whole run, inherited by the processes the tests start: what the code keeps
    in the user's cache folder (weights, OpenVINO decoders built once per weights) stays out of the real one
    and starts empty, as on a fresh machine."""
    folder = tmp_path_factory.mktemp("ctsam3d-cache")
    previous = os.environ.get("CTSAM3D_CACHE")
    os.environ["CTSAM3D_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["CTSAM3D_CACHE"]
    else:
        os.environ["CTSAM3D_CACHE"] = previous


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA_DIR)


@pytest.fixture(scope="session")
def reference_fixture():
    import numpy as np

    with np.load(require(REFERENCE_FIXTURE)) as arrays:
        return {key: arrays[key] for key in arrays.files}


@pytest.fixture(scope="session")
def reference_layout_path() -> Path:
    return require(REFERENCE_LAYOUT)


@pytest.fixture(scope="module")
def reference_net():
    """The full-size CT-SAM3D network with the deterministic reference weights (the numbers of the authors'
    fixture), one per test module."""
    from CTSAM3DLib.model import build_model
    from CTSAM3DLib.reference_weights import deterministic_state_dict

    net = build_model("tiny")
    net.load_state_dict(deterministic_state_dict(net), strict=True)
    return net


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """A full-size CT-SAM3D checkpoint with seeded random weights (the reference rule is tested elsewhere)."""
    import torch

    from CTSAM3DLib import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "weights.pth"
    save_checkpoint(path, build_model("tiny"))
    return path


@pytest.fixture(scope="module")
def abdomen(data_dir):
    """The 3 mm abdomen CT as an image (a module may define its own ``abdomen`` instead)."""
    import SimpleITK as sitk

    return sitk.ReadImage(str(require(data_dir / "abdomen-ct-3mm" / "ct.nii.gz")))


@pytest.fixture
def serve():
    """serve(network, port, **create_app options) -> a started ``ctsam3d serve`` on loopback; all stopped
    after the test."""
    from server_helpers import Servers

    servers = Servers()
    yield servers.start
    servers.stop()


@pytest.fixture
def editor(request):
    """A Segment Editor showing the CT-SAM3D effect on a scene of two blobs (``test_slicer_effect.Editor``),
    cleaned up after the test."""
    request.getfixturevalue("slicerEnv")
    from test_slicer_effect import Editor

    created = Editor()
    yield created
    created.harness.cleanup()
