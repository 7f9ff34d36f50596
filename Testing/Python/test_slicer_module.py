"""The CT-SAM3D module panel and its helpers: weights download (local HTTP server and file:// only;
nothing leaves this machine), checksum records, cache location, consent-gated dependency install,
model loading from a tiny checkpoint made here, and the self-test's own building blocks."""

import hashlib
import http.server
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
from slicer_standins import pytorchutils, qt
from slicer_standins.application import makeModuleParent
from slicer_standins.fixtures import pumpUntil, slicerEnv  # noqa: F401  (used by pytestmark)

pytestmark = pytest.mark.usefixtures("slicerEnv")

PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: several download chunks


class Server:
    """A throw-away HTTP server on 127.0.0.1 serving PAYLOAD at /params.pth (optionally truncated or slow)."""

    def __init__(self, truncate=False, delay=0.0):
        payload = PAYLOAD

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                body = payload[: len(payload) // 2] if truncate else payload
                for start in range(0, len(body), 1 << 18):
                    self.wfile.write(body[start : start + (1 << 18)])
                    time.sleep(delay)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/params.pth"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = Server()
    yield running
    running.close()


def test_download_streams_checksums_records_and_renames(server, tmp_path):
    from CTSAM3DSlicerLib import weights

    target = tmp_path / "cache" / "CTSAM3D" / "params.pth"
    seen = []
    result = weights.download(
        server.url, str(target), progress=lambda done, total: seen.append((done, total))
    )
    assert target.read_bytes() == PAYLOAD
    assert result.sha256 == hashlib.sha256(PAYLOAD).hexdigest() and result.size == len(PAYLOAD)
    assert len(seen) > 1 and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert not list(target.parent.glob("*.part"))
    record = json.loads(weights.checksumRecordPath(str(target)).read_text())
    assert (
        record["sha256"] == result.sha256
        and record["source"] == server.url
        and record["size"] == len(PAYLOAD)
    )
    assert weights.verifyRecordedChecksum(str(target)) == result.sha256


def test_download_from_a_file_url(tmp_path):
    from CTSAM3DSlicerLib import weights

    source = tmp_path / "source.pth"
    source.write_bytes(PAYLOAD)
    result = weights.download(source.as_uri(), str(tmp_path / "copy.pth"))
    assert result.sha256 == hashlib.sha256(PAYLOAD).hexdigest()


def test_cancel_leaves_the_previous_file_and_no_partial_file(server, tmp_path):
    from CTSAM3DSlicerLib import weights

    target = tmp_path / "params.pth"
    target.write_bytes(b"previous weights")
    calls = []
    with pytest.raises(weights.DownloadCancelledError):
        weights.download(
            server.url, str(target), progress=lambda d, t: calls.append(d), isCancelled=lambda: bool(calls)
        )
    assert target.read_bytes() == b"previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.pth"]


def test_truncated_or_wrong_downloads_leave_nothing(tmp_path):
    from CTSAM3DSlicerLib import weights

    truncated = Server(truncate=True)
    try:
        with pytest.raises(OSError):
            weights.download(truncated.url, str(tmp_path / "a.pth"))
    finally:
        truncated.close()
    good = Server()
    try:
        with pytest.raises(weights.ChecksumMismatchError):
            weights.download(good.url, str(tmp_path / "b.pth"), expectedSha256="0" * 64)
    finally:
        good.close()
    assert list(tmp_path.iterdir()) == []


def test_changed_weights_are_refused_before_loading(server, tmp_path):
    from CTSAM3DSlicerLib import weights
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    target = tmp_path / "params.pth"
    weights.download(server.url, str(target))
    with open(target, "r+b") as stream:
        stream.write(b"corrupt")
    with pytest.raises(weights.ChecksumMismatchError, match="download it again"):
        CTSAM3DLogic().loadModel(str(target))


def test_cache_location_and_settings(tmp_path):
    from CTSAM3DSlicerLib import weights

    assert weights.defaultWeightsPath().startswith(slicer.app.cachePath)
    assert weights.AUTHORS_WEIGHTS_URL.startswith("https://modelscope.cn/")
    assert "xiuan123/CT-SAM3D" in weights.AUTHORS_WEIGHTS_URL and weights.AUTHORS_WEIGHTS_URL.endswith(
        "params.pth"
    )
    assert weights.configuredWeightsPath() == ""
    chosen = tmp_path / "mine.pth"
    chosen.write_bytes(b"x")
    weights.setSettingsValue("WeightsPath", str(chosen))
    assert weights.configuredWeightsPath() == str(chosen)


def test_nothing_is_downloaded_at_import(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access at import time")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
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

    source = tmp_path / "served.pth"
    source.write_bytes(Path(tinyCheckpoint(tmp_path)).read_bytes())
    destination = tmp_path / "cache" / "CTSAM3D" / "params.pth"
    seenDuringDownload = []

    def lookAtThePanel():
        # The download waits with events processed, so the GUI is live (and this timer fires) meanwhile.
        seenDuringDownload.append(
            (widget.cancelButton.enabled, widget.downloadButton.enabled, widget.progressBar.visible, widget._busy)
        )

    qt.QTimer.singleShot(0, lookAtThePanel)
    widget.startDownload(source.as_uri(), str(destination))
    assert seenDuringDownload == [(True, False, True, True)]
    assert widget.weightsPathEdit.currentPath == str(destination)
    assert widget.checksumLabel.text == hashlib.sha256(source.read_bytes()).hexdigest()
    assert not widget.progressBar.visible and widget.downloadButton.enabled

    widget.deviceCombo.currentText = "cpu"
    assert slicer.app.userSettings().value("CTSAM3D/Device") == "cpu"
    assert widget.loadButton.enabled
    widget.loadButton.click()
    assert widget.modelStateLabel.text.startswith("loaded") and "cpu" in widget.modelStateLabel.text
    widget.cleanup()


def test_panel_cancel_stops_a_slow_download(tmp_path):
    widget = makeWidget()
    slow = Server(delay=0.2)
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
        widget.startDownload(slow.url, str(destination))
        assert progressWhenCancelled and progressWhenCancelled[0] < len(PAYLOAD)
        assert time.monotonic() - started < 9 * 0.2, "the download ran to its end"
        assert not widget._busy and not widget.progressBar.visible
        assert not destination.exists() and not list(tmp_path.glob("*.part"))
        assert widget.weightsPathEdit.currentPath == ""
    finally:
        slow.close()
        widget.cleanup()


def test_self_test_runs_whole_with_the_real_network_built_in_memory(tmp_path):
    """CTSAM3DTest as Slicer runs it (slicer.selfTests), on the real network with reference weights made in
    memory: no file is written (the 300 MB checkpoint of earlier versions), nothing is downloaded."""
    import CTSAM3D

    CTSAM3D.CTSAM3D(makeModuleParent())
    slicer.app.emit("startupCompleted()")
    before = set(tmp_path.rglob("*"))
    slicer.selfTests["CTSAM3D"]()
    logic = CTSAM3D.CTSAM3DLogic.shared()
    assert type(logic.network).__name__ == "CTSAM3D" and logic.loadedCheckpoint is None
    assert logic.lastClickSeconds > 0 and "total" in logic.lastTiming
    assert set(tmp_path.rglob("*")) == before


SELF_TEST_WITHOUT_TORCH = """
import builtins, sys
realImport = builtins.__import__

def refuseTorch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")
    return realImport(name, *args, **kwargs)

builtins.__import__ = refuseTorch
sys.path[:0] = [{testing!r}]
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
        testing=str(Path(__file__).resolve().parent), cache=str(tmp_path / "cache"), temp=str(tmp_path / "temp")
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "SELF-TEST RETURNED" in completed.stdout
    assert "the network part was NOT run, because torch is not installed" in output
    assert "Install missing packages" in output and "ModuleNotFoundError" not in output


def test_weights_are_verified_once_per_file_version_on_the_worker_with_progress(tmp_path, monkeypatch):
    import os
    import threading

    from CTSAM3DSlicerLib import weights
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    checkpoint = Path(tinyCheckpoint(tmp_path))
    weights.recordChecksum(str(checkpoint), hashlib.sha256(checkpoint.read_bytes()).hexdigest(), "test")
    hashed = []
    realHash = weights.computeSha256

    def spyHash(path, progress=None, *args):
        hashed.append(threading.current_thread() is threading.main_thread())
        return realHash(path, progress, *args)

    monkeypatch.setattr(weights, "computeSha256", spyHash)
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
