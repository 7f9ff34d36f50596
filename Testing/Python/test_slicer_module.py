"""The CT-SAM3D module panel and its helpers: weights download (from a ModelScope hub on loopback;
nothing leaves this machine), checksum records, cache location, consent-gated dependency install,
model loading from a tiny checkpoint made here, and the self-test."""

import hashlib
import importlib
import json
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
import slicer
from conftest import REPO_ROOT
from modelscope_server import ModelScopeServer

from standins.slicer_standins import pytorchutils, qt
from standins.slicer_standins.application import makeModuleParent
from standins.slicer_standins.fixtures import pumpUntil, slicerEnv  # noqa: F401  (used by pytestmark)

pytestmark = pytest.mark.usefixtures("slicerEnv")

PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: several download chunks
SLOW_CHUNK_SECONDS = 2.0
"""The slow server's pause after each 1 MiB: a whole download takes 3 of them, so a wait that stopped in
time is told from one that did not with a margin a loaded machine cannot erase."""


@pytest.fixture
def hub():
    server = ModelScopeServer({"ckpt_1000/params.pth": PAYLOAD})
    yield server
    server.close()


def test_downloaded_weights_record_the_hosts_checksum_and_changes_are_refused(hub, tmp_path):
    from CTSAM3DSlicerLib import weights
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    target = tmp_path / "params.pth"
    result = weights.downloadAuthorsWeights(str(target), endpoint=hub.endpoint)
    sha256 = hashlib.sha256(PAYLOAD).hexdigest()
    assert result.verified and result.sha256 == sha256 and target.read_bytes() == PAYLOAD
    record = json.loads(weights.checksumRecordPath(str(target)).read_text())
    assert record["sha256"] == sha256 and record["verified_by_host"] is True and record["size"] == len(PAYLOAD)
    assert weights.checksumDescription(str(target)) == f"{sha256} (verified against ModelScope's checksum)"
    with open(target, "r+b") as stream:
        stream.write(b"corrupt")
    with pytest.raises(weights.ChecksumMismatchError, match="download it again"):
        CTSAM3DLogic().loadModel(str(target))


def test_a_download_the_host_could_not_confirm_says_so(hub, tmp_path):
    from CTSAM3DSlicerLib import weights

    hub.listing_status = 500
    target = tmp_path / "params.pth"
    assert not weights.downloadAuthorsWeights(str(target), endpoint=hub.endpoint).verified
    assert weights.checksumDescription(str(target)).endswith("(computed here; not confirmed by the host)")


def test_cache_location_and_settings(tmp_path):
    from CTSAM3DSlicerLib import weights

    from CTSAM3DLib.download import default_weights_path

    assert weights.defaultWeightsPath() == str(default_weights_path()), "one folder for Slicer and ctsam3d"
    assert weights.defaultWeightsPath().startswith(str(tmp_path)), "the tests' CTSAM3D_CACHE is honoured"
    assert weights.configuredWeightsPath() == ""
    chosen = tmp_path / "mine.pth"
    chosen.write_bytes(b"x")
    weights.setSettingsValue("WeightsPath", str(chosen))
    assert weights.configuredWeightsPath() == str(chosen)


def test_nothing_is_downloaded_at_import(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access at import time")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "build_opener", refuse)
    import CTSAM3DSlicerLib.weights

    import CTSAM3D

    importlib.reload(CTSAM3DSlicerLib.weights)
    importlib.reload(CTSAM3D)


# ------------------------------------------------------------ dependencies
@pytest.fixture
def fakePyTorchUtils(monkeypatch):
    """PyTorchUtils that installs successfully (see slicer_standins.pytorchutils); returns its calls."""
    calls = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorchutils.makeModule("installed", calls))
    monkeypatch.setattr(
        slicer.util, "pip_install", lambda *a, **k: pytest.fail("pip must not be used"), raising=False
    )
    return calls


def pretendTorchMissing(monkeypatch, stillMissingAfterInstall=False):
    from CTSAM3DSlicerLib import dependencies

    state = {"installed": False}
    realFindSpec = dependencies.importlib.util.find_spec

    def findSpec(name, *args):
        if name == "torch" and (not state["installed"] or stillMissingAfterInstall):
            return None
        return realFindSpec(name, *args)

    monkeypatch.setattr(dependencies.importlib.util, "find_spec", findSpec)
    return state


def test_dependencies_install_only_with_consent_and_through_pytorchutils(monkeypatch, fakePyTorchUtils):
    from CTSAM3DSlicerLib import dependencies

    state = pretendTorchMissing(monkeypatch)
    assert dependencies.missingPackages() == ["torch"]
    questions = []
    assert dependencies.ensureDependencies(lambda q: questions.append(q) or False) is False
    assert fakePyTorchUtils == [] and "torch" in questions[0]

    original = dependencies.installTorch

    def installThenPresent():
        original()
        state["installed"] = True

    monkeypatch.setattr(dependencies, "installTorch", installThenPresent)
    assert dependencies.ensureDependencies(lambda q: True) is True
    assert fakePyTorchUtils == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]
    assert set(dependencies.BUNDLED_WITH_SLICER) == {"numpy", "SimpleITK"}


@pytest.mark.parametrize(
    "outcome, message",
    [
        ("installerFailed", "No matching distribution found for torch"),
        ("stillMissing", "cannot be imported"),
    ],
)
def test_failed_torch_installs_are_explained(monkeypatch, outcome, message):
    from CTSAM3DSlicerLib import dependencies

    pretendTorchMissing(monkeypatch)
    calls = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorchutils.makeModule(outcome, calls))
    with pytest.raises(dependencies.DependencyError, match=message):
        dependencies.ensureDependencies(lambda q: True)
    assert calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]


def test_missing_pytorch_extension_is_explained(monkeypatch):
    from CTSAM3DSlicerLib import dependencies

    pretendTorchMissing(monkeypatch)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(dependencies.DependencyError, match="Extension Manager"):
        dependencies.ensureDependencies(lambda q: True)


# ------------------------------------------------------------------ panel
def makeWidget():
    import CTSAM3D

    CTSAM3D.CTSAM3D(makeModuleParent())
    widget = CTSAM3D.CTSAM3DWidget()
    widget.setup()
    return widget


def tinyCheckpoint(directory):
    import CTSAM3DLib
    from CTSAM3DLib.model import build_model
    from CTSAM3DLib.reference_weights import deterministic_state_dict

    network = build_model("tiny")
    network.load_state_dict(deterministic_state_dict(network))
    path = str(directory / "tiny.pth")
    CTSAM3DLib.save_checkpoint(path, network)
    return path


def test_panel_downloads_with_progress_then_loads_the_model(tmp_path, monkeypatch):
    widget = makeWidget()
    assert "ModelScope" in widget.licenceLabel.text and "own terms" in widget.licenceLabel.text
    assert widget.modelStateLabel.text == "not loaded" and not widget.loadButton.enabled
    # In testing mode the consent dialog answers "not OK" (as in Slicer), so the button downloads nothing.
    widget.downloadButton.click()
    assert not widget._busy and not widget.progressBar.visible

    source = Path(tinyCheckpoint(tmp_path))
    hub = ModelScopeServer({"ckpt_1000/params.pth": source})
    from CTSAM3DSlicerLib import weights

    destination = Path(weights.defaultWeightsPath())
    seenDuringDownload = []

    def lookAtThePanel():
        # The download waits with events processed, so the GUI is live (and this timer fires) meanwhile.
        seenDuringDownload.append(
            (widget.cancelButton.enabled, widget.downloadButton.enabled, widget.progressBar.visible, widget._busy)
        )

    qt.QTimer.singleShot(0, lookAtThePanel)
    try:
        widget.startDownload(str(destination), endpoint=hub.endpoint)
    finally:
        hub.close()
    assert seenDuringDownload == [(True, False, True, True)]
    assert widget.weightsPathEdit.currentPath == str(destination)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    assert widget.checksumLabel.text == f"{sha256} (verified against ModelScope's checksum)"
    assert not widget.progressBar.visible and widget.downloadButton.enabled

    widget.deviceCombo.currentText = "cpu"
    assert slicer.app.userSettings().value("CTSAM3D/Device") == "cpu"
    assert widget.loadButton.enabled
    widget.loadButton.click()
    assert widget.modelStateLabel.text.startswith("loaded") and "cpu" in widget.modelStateLabel.text
    widget.cleanup()


def test_panel_cancel_stops_a_slow_download(tmp_path):
    widget = makeWidget()
    slow = ModelScopeServer({"params.pth": PAYLOAD})
    slow.chunk_delay = SLOW_CHUNK_SECONDS
    try:
        destination = tmp_path / "params.pth"
        progressWhenCancelled = []

        def cancelOnceBytesArrive():
            if widget._progress[0] > 0:
                progressWhenCancelled.append(widget._progress[0])
                widget.cancelButton.click()
            else:
                qt.QTimer.singleShot(20, cancelOnceBytesArrive)

        qt.QTimer.singleShot(20, cancelOnceBytesArrive)
        started = time.monotonic()
        widget.startDownload(str(destination), endpoint=slow.endpoint)
        assert progressWhenCancelled and progressWhenCancelled[0] < len(PAYLOAD)
        assert time.monotonic() - started < 2 * SLOW_CHUNK_SECONDS, "the download ran to its end"
        assert not widget._busy and not widget.progressBar.visible
        assert not destination.exists() and not list(tmp_path.glob("*.part"))
        assert widget.weightsPathEdit.currentPath == ""
    finally:
        slow.close()
        widget.cleanup()


def test_closing_slicer_during_a_download_stops_waiting_for_it(tmp_path, caplog):
    """The main window closes (lastWindowClosed) while the panel waits for a download in its own event loop:
    the wait ends at once, with no error box on the way out."""
    widget = makeWidget()
    slow = ModelScopeServer({"params.pth": PAYLOAD})
    slow.chunk_delay = SLOW_CHUNK_SECONDS
    try:
        qt.QTimer.singleShot(100, lambda: slicer.app.emit("lastWindowClosed()"))
        started = time.monotonic()
        widget.startDownload(str(tmp_path / "params.pth"), endpoint=slow.endpoint)
        waited = time.monotonic() - started
        assert waited < 2 * SLOW_CHUNK_SECONDS, "Slicer waited for the download to end before quitting"
        assert not widget._busy and not widget.progressBar.visible
        assert "failed" not in caplog.text
    finally:
        slow.close()
        widget.cleanup()


def test_self_test_runs_whole_with_the_real_network_built_in_memory(tmp_path):
    """CTSAM3DTest as Slicer runs it (slicer.selfTests), on the real network with reference weights made in
    memory: nothing is downloaded and no checkpoint is written (the 300 MB file of earlier versions); the only
    files written are the OpenVINO decoder that "auto" builds once per weights, in the cache folder."""
    import CTSAM3D

    CTSAM3D.CTSAM3D(makeModuleParent())
    slicer.app.emit("startupCompleted()")
    before = set(tmp_path.rglob("*"))
    slicer.selfTests["CTSAM3D"]()
    logic = CTSAM3D.CTSAM3DLogic.shared()
    assert type(logic.network).__name__ == "CTSAM3D" and logic.loadedCheckpoint is None
    assert logic.lastClickSeconds > 0 and "total" in logic.lastTiming
    from CTSAM3DLib.download import cache_folder

    decoders = cache_folder() / "openvino"
    written = {path for path in set(tmp_path.rglob("*")) - before if path.is_file()}
    assert all(decoders in path.parents for path in written), sorted(written)
    assert {path.name for path in written} <= {"decoder.xml", "decoder.bin"}


SELF_TEST_WITHOUT_TORCH = """
import builtins, sys
realImport = builtins.__import__

def refuseTorch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")
    return realImport(name, *args, **kwargs)

builtins.__import__ = refuseTorch
sys.path[:0] = [{standins!r}]
import importlib.util
realFindSpec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "torch" else realFindSpec(name, *a)
import slicer
import slicer_standins
slicer_standins.installModules()
slicer_standins.newScene({cache!r}, {temp!r})
from slicer_standins.application import makeModuleParent
import CTSAM3D
CTSAM3D.CTSAM3D(makeModuleParent())
slicer.app.emit("startupCompleted()")
assert [e.name for e in slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()] == ["CT-SAM3D"]
assert not [name for name in sys.modules if name == "torch" or name.startswith("torch.")], "torch was imported"
slicer.selfTests["CTSAM3D"]()
print("SELF-TEST RETURNED")
"""


def test_module_loads_and_self_test_explains_itself_without_torch(tmp_path):
    """Slicer imports every module at start-up, before PyTorch may be installed: importing the module and
    registering the effect must not need torch, and the self-test must say plainly what to install."""
    import subprocess

    script = SELF_TEST_WITHOUT_TORCH.format(
        standins=str(REPO_ROOT / "standins"), cache=str(tmp_path / "cache"), temp=str(tmp_path / "temp")
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "SELF-TEST RETURNED" in completed.stdout
    assert "the network part was NOT run, because torch is not installed" in output
    assert "Install missing packages" in output and "ModuleNotFoundError" not in output


def test_weights_are_verified_once_per_file_version_on_the_worker_with_progress(tmp_path, monkeypatch):
    import os

    from CTSAM3DSlicerLib import weights
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    checkpoint = Path(tinyCheckpoint(tmp_path))
    weights.recordChecksum(str(checkpoint), hashlib.sha256(checkpoint.read_bytes()).hexdigest(), "test")
    hashed = []
    realHash = weights.sha256_of

    def spyHash(path, progress=None, *args):
        hashed.append(threading.current_thread() is threading.main_thread())
        return realHash(path, progress, *args)

    monkeypatch.setattr(weights, "sha256_of", spyHash)
    logic = CTSAM3DLogic()
    logic.loadModel(str(checkpoint), "cpu")
    assert hashed == [], "a freshly recorded file is the version that was hashed"

    os.utime(checkpoint, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: a new version
    seen = []
    logic.loadModel(str(checkpoint), "cpu", onTick=lambda: seen.append(logic.progress))
    assert hashed == [False], "the changed version is hashed once, off the main thread"
    verifying = [p for p in seen if p is not None and p.stage == "Verifying the weights" and p.total]
    assert verifying and verifying[-1].total == checkpoint.stat().st_size
    logic.loadModel(str(checkpoint), "cpu")
    monkeypatch.setattr(weights, "_verifiedVersions", {})  # as in a new Slicer session: only the record
    CTSAM3DLogic().loadModel(str(checkpoint), "cpu")
    assert hashed == [False], "a verified version is not hashed again, in this process or the next"

    with open(checkpoint, "r+b") as stream:
        stream.seek(1000)
        stream.write(b"corrupt")
    with pytest.raises(weights.ChecksumMismatchError, match="download it again"):
        logic.loadModel(str(checkpoint), "cpu")


def test_a_load_asked_for_while_one_runs_waits_for_it(tmp_path, monkeypatch):
    """Events are processed while the weights load, so a click (the effect's first) or the panel's Load
    button can ask again meanwhile: the checkpoint is read once."""
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    import CTSAM3DLib

    path = tmp_path / "weights.pth"
    path.write_bytes(b"not read: the loader is a stand-in")
    loads = []

    def slowLoad(checkpointPath, device):
        loads.append(checkpointPath)
        time.sleep(0.3)
        return types.SimpleNamespace(name="network")

    monkeypatch.setattr(CTSAM3DLib, "load_checkpoint", slowLoad)
    logic = CTSAM3DLogic()
    nested = []

    def loadAgain():
        logic.loadModel(str(path), "cpu")
        nested.append(logic.network)  # as the effect's first click goes on to segment

    qt.QTimer.singleShot(50, loadAgain)
    logic.loadModel(str(path), "cpu")
    assert loads == [str(path)] and len(nested) == 1 and nested[0] is logic.network
    assert logic.network.name == "network" and logic.loadedCheckpoint == str(path)


def test_panel_chooses_a_server_and_tests_the_connection_with_its_token():
    """The "Where the network runs" section: the choice, address and token are kept in the settings and
    reach the logic; Test connection says what the server is, and that a wrong token is refused."""
    from CTSAM3DSlicerLib import weights

    from CTSAM3DLib.server.app import BackgroundServer, create_app
    from standins.networks import ThresholdNet

    server = BackgroundServer(create_app(ThresholdNet(), device="cpu", tokens=["s3cret"])).start()
    try:
        widget = makeWidget()
        assert widget.runOnCombo.currentIndex == 0 and not widget.serverURLEdit.enabled
        widget.serverURLEdit.text = server.url
        widget.serverTokenEdit.text = "wrong"
        widget.runOnCombo.currentIndex = 1
        assert widget.logic.serverURL == server.url and widget.serverURLEdit.enabled
        assert weights.settingsValue("RunOn") == "server" and weights.settingsValue("ServerURL") == server.url
        widget.testConnectionButton.click()
        assert "refused" in widget.connectionLabel.text
        widget.serverTokenEdit.text = "s3cret"
        widget.serverTokenEdit.finishEditing()
        widget.testConnectionButton.click()
        assert widget.connectionLabel.text.startswith("Connected: CT-SAM3D server")
        assert "on cpu" in widget.connectionLabel.text
        assert widget.logic.modelState() == f"on the server {server.url}"
        widget.runOnCombo.currentIndex = 0
        assert widget.logic.serverURL is None and weights.settingsValue("RunOn") == "computer"
    finally:
        server.stop()


LOADED_FROM_A_MODULE_PATH = """
import importlib.util, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
# Slicer's own Python: no ctsam3d installed (drop this environment's editable install) and nothing of the
# clone on sys.path until Slicer adds the module's folder.
sys.meta_path[:] = [finder for finder in sys.meta_path if not finder.__module__.startswith("__editable__")]
sys.path[:] = [entry for entry in sys.path if entry and Path(entry).resolve() != Path({repo!r})]
assert importlib.util.find_spec("CTSAM3DLib") is None, "ctsam3d is installed in this process"
sys.path.insert(0, {standins!r})
import slicer
import slicer_standins
slicer_standins.installModules()
sys.path.remove(str(slicer_standins.MODULE_DIR))
sys.path.insert(0, {moduleFolder!r})
slicer_standins.newScene({cache!r}, {temp!r})
from slicer_standins.application import makeModuleParent
import CTSAM3D
module = CTSAM3D.CTSAM3D(makeModuleParent())
slicer.app.emit("startupCompleted()")
assert [e.name for e in slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()] == ["CT-SAM3D"]
import CTSAM3DLib
print("CORE", Path(CTSAM3DLib.__file__).parent)
print("HELP", module.parent.helpText)
"""


@pytest.mark.parametrize("layout", ["source checkout", "build"])
def test_module_loads_from_an_additional_module_path(tmp_path, layout):
    """Slicer loads a module from a folder named in its additional module paths with only that folder on
    sys.path: a clone's CTSAM3D/ folder (CTSAM3DLib one folder up), or a build's qt-scripted-modules
    (CTSAM3DLib beside the module). Either way the module loads, registers the effect, and says which
    CTSAM3DLib it uses."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    moduleFolder = repo / "CTSAM3D"
    if layout == "build":
        moduleFolder = tmp_path / "qt-scripted-modules"
        ignore = shutil.ignore_patterns("__pycache__", "CMakeLists.txt")
        shutil.copytree(repo / "CTSAM3D", moduleFolder, ignore=ignore)
        shutil.copytree(repo / "CTSAM3DLib", moduleFolder / "CTSAM3DLib", ignore=ignore)
    script = LOADED_FROM_A_MODULE_PATH.format(
        repo=str(repo), standins=str(REPO_ROOT / "standins"), moduleFolder=str(moduleFolder),
        cache=str(tmp_path / "cache"), temp=str(tmp_path / "temp"))
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               cwd=tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    expected = repo / "CTSAM3DLib" if layout == "source checkout" else moduleFolder / "CTSAM3DLib"
    assert f"CORE {expected}" in completed.stdout
    said = "the source checkout" if layout == "source checkout" else "the copy installed beside the module"
    assert f"CT-SAM3D: using CTSAM3DLib from {said}, {expected}" in completed.stderr
    assert f"Inference core (CTSAM3DLib) in use: {said}, {expected}" in completed.stdout


def test_after_loading_the_network_torchs_internal_warnings_stay_out_of_slicer(tmp_path):
    """Slicer's console shows every warning: torch's warnings about its own internals are dropped once the
    network is loaded; the project's own and other code's still show."""
    import warnings

    import torch
    from CTSAM3DSlicerLib import weights
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    checkpoint = Path(tinyCheckpoint(tmp_path))
    weights.recordChecksum(str(checkpoint), hashlib.sha256(checkpoint.read_bytes()).hexdigest(), "test")

    def method(self):
        return self

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        CTSAM3DLogic().loadModel(str(checkpoint), "cpu")
        torch.jit.script_method(method)  # warns from inside torch, as its internals do
        warnings.warn("the image's lowest value is 12", stacklevel=1)
    assert [str(warning.message) for warning in shown] == ["the image's lowest value is 12"]
