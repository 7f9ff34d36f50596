"""CT-SAM3D module: settings panel (weights, device, dependencies) and registration of the
Segment Editor effect "CT-SAM3D". The work is done by CTSAM3DLogic (usable without this GUI)."""

import logging
import os
import threading

import ctk
import numpy as np
import qt
import slicer
from CTSAM3DSlicerLib import CORE_ORIGIN, dependencies, weights
from CTSAM3DSlicerLib.logic import CTSAM3DLogic
from CTSAM3DSlicerLib.worker import InferenceWorker, WorkerStoppedError, shutdownAllWorkers, waitProcessingEvents
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from CTSAM3DLib.download import DEFAULT_ENDPOINT, MODEL_PAGE, DownloadCancelledError
from CTSAM3DLib.files import sha256_of

__all__ = ["CTSAM3D", "CTSAM3DLogic", "CTSAM3DTest", "CTSAM3DWidget"]

DEVICES = ("auto", "cpu", "cuda", "mps")
RUN_ON = ("This computer", "A server")


class CTSAM3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CT-SAM3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SlicerCTSAM3D developers"]
        self.parent.helpText = (
            "Interactive 3D segmentation of CT from clicks with CT-SAM3D. Set up the network weights and the "
            "device here, then use the 'CT-SAM3D' effect in the Segment Editor.<p>"
            f"Inference core (CTSAM3DLib) in use: {CORE_ORIGIN}."
        )
        self.parent.acknowledgementText = (
            "CT-SAM3D network by Guo et al. (alibaba-damo-academy/ct-sam3d). " + weights.LICENCE_NOTE
        )
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)
        # A running prediction or download must never hold up quitting. The main window closes while the
        # effect or the panel may wait for a job in their own event loop, and aboutToQuit comes only once
        # Slicer's main event loop has returned, which it cannot do before that wait ends.
        slicer.app.connect("lastWindowClosed()", shutdownAllWorkers)
        slicer.app.connect("aboutToQuit()", shutdownAllWorkers)

    def registerEditorEffect(self):
        """Register the "CT-SAM3D" effect with the Segment Editor's effect factory."""
        import SegmentEditorCTSAM3DLib
        from qSlicerSegmentationsEditorEffectsPythonQt import qSlicerSegmentEditorScriptedEffect

        effectPath = os.path.join(os.path.dirname(SegmentEditorCTSAM3DLib.__file__), "SegmentEditorEffect.py")
        instance = qSlicerSegmentEditorScriptedEffect(None)
        instance.setPythonSource(effectPath.replace("\\", "/"))
        instance.self().register()


class CTSAM3DWidget(ScriptedLoadableModuleWidget):
    """Thin panel over CTSAM3DLogic and CTSAM3DSlicerLib.weights/dependencies."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = CTSAM3DLogic.shared()
        self._fileWorker = InferenceWorker("CTSAM3D files")
        self._busy = False
        self._cancelDownload = threading.Event()
        self._progress = (0, None)

        weightsForm = self._addSection("Network weights")
        self.weightsPathEdit = ctk.ctkPathLineEdit()
        self.weightsPathEdit.filters = ctk.ctkPathLineEdit.Files
        self.weightsPathEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt)"]
        self.weightsPathEdit.currentPath = weights.configuredWeightsPath()
        self.weightsPathEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        weightsForm.addRow("Weights file:", self.weightsPathEdit)
        self.downloadButton = qt.QPushButton("Download the authors' weights")
        self.downloadButton.toolTip = (
            f"Downloads the authors' checkpoint from {MODEL_PAGE} into your cache folder "
            "(the one 'ctsam3d download-weights' uses), verified against the checksum ModelScope publishes"
        )
        self.downloadButton.connect("clicked()", self.onDownload)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        self.cancelButton.connect("clicked()", self.onCancelDownload)
        downloadRow = qt.QHBoxLayout()
        downloadRow.addWidget(self.downloadButton)
        downloadRow.addWidget(self.cancelButton)
        weightsForm.addRow(downloadRow)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        weightsForm.addRow(self.progressBar)
        self.checksumLabel = qt.QLabel()
        self.checksumLabel.textInteractionFlags = qt.Qt.TextSelectableByMouse
        weightsForm.addRow("SHA-256:", self.checksumLabel)
        self.licenceLabel = qt.QLabel(weights.LICENCE_NOTE)
        self.licenceLabel.wordWrap = True
        weightsForm.addRow("Licence:", self.licenceLabel)

        self._setupServerSection()

        modelForm = self._addSection("Model")
        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(list(DEVICES))
        self.deviceCombo.currentText = self.logic.device
        self.deviceCombo.connect("currentTextChanged(QString)", self.onDeviceChanged)
        modelForm.addRow("Device:", self.deviceCombo)
        self.dependenciesLabel = qt.QLabel()
        self.installButton = qt.QPushButton("Install missing packages...")
        self.installButton.connect("clicked()", self.onInstallDependencies)
        modelForm.addRow("Python packages:", self.dependenciesLabel)
        modelForm.addRow(self.installButton)
        self.loadButton = qt.QPushButton("Load model")
        self.loadButton.connect("clicked()", self.onLoadModel)
        modelForm.addRow(self.loadButton)
        self.modelStateLabel = qt.QLabel()
        self.modelStateLabel.wordWrap = True
        modelForm.addRow("Model:", self.modelStateLabel)
        self.lastClickLabel = qt.QLabel()
        modelForm.addRow("Last click:", self.lastClickLabel)
        self.layout.addStretch(1)

        self._statusTimer = qt.QTimer()
        self._statusTimer.interval = 1000
        self._statusTimer.connect("timeout()", self.updateStatus)
        self.updateStatus()

    def _addSection(self, title):
        """A collapsible section of the panel; returns its form layout."""
        section = ctk.ctkCollapsibleButton()
        section.text = title
        self.layout.addWidget(section)
        return qt.QFormLayout(section)

    def _setupServerSection(self):
        form = self._addSection("Where the network runs")
        self.runOnCombo = qt.QComboBox()
        self.runOnCombo.addItems(list(RUN_ON))
        self.runOnCombo.toolTip = (
            "A server ('ctsam3d serve', e.g. on a department GPU machine) runs the network for many Slicer "
            "users; this computer then needs no PyTorch and no weights. The effect works the same either way."
        )
        form.addRow("Run the network on:", self.runOnCombo)
        self.serverURLEdit = qt.QLineEdit(weights.settingsValue("ServerURL"))
        self.serverURLEdit.placeholderText = "http://gpu-server:8000"
        form.addRow("Server address:", self.serverURLEdit)
        self.serverTokenEdit = qt.QLineEdit(weights.settingsValue("ServerToken"))
        self.serverTokenEdit.echoMode = qt.QLineEdit.Password
        self.serverTokenEdit.placeholderText = "the token its administrator gave you (none on this computer)"
        form.addRow("Token:", self.serverTokenEdit)
        self.testConnectionButton = qt.QPushButton("Test connection")
        self.testConnectionButton.connect("clicked()", self.onTestConnection)
        self.connectionLabel = qt.QLabel()
        self.connectionLabel.wordWrap = True
        form.addRow(self.testConnectionButton)
        form.addRow("Server:", self.connectionLabel)
        self.runOnCombo.currentIndex = 1 if self.logic.serverURL is not None else 0
        self.runOnCombo.connect("currentIndexChanged(int)", self.onRunOnChanged)
        self.serverURLEdit.connect("editingFinished()", self.onRunOnChanged)
        self.serverTokenEdit.connect("editingFinished()", self.onRunOnChanged)
        self._showServerFields()

    def cleanup(self):
        self._statusTimer.stop()
        self._cancelDownload.set()
        self._fileWorker.shutdown()

    def enter(self):
        """Shown: keep the model state and the last click's time current while the panel is visible."""
        self.updateStatus()
        self._statusTimer.start()

    def exit(self):
        self._statusTimer.stop()

    def updateStatus(self):
        missing = dependencies.missingPackages()
        self.dependenciesLabel.text = "all present" if not missing else "missing: " + ", ".join(missing)
        self.installButton.enabled = bool(missing)
        path = self.weightsPathEdit.currentPath
        self.checksumLabel.text = weights.checksumDescription(path) if path and os.path.isfile(path) else (
            "no weights chosen")
        self.modelStateLabel.text = self.logic.modelState()
        seconds = self.logic.lastClickSeconds
        self.lastClickLabel.text = "-" if seconds is None else f"{seconds:.2f} s"
        self.loadButton.enabled = bool(path) and not missing and not self._busy

    # ------------------------------------------------------------- weights
    def onWeightsPathChanged(self, path):
        weights.setSettingsValue("WeightsPath", path)
        if path and os.path.isfile(path) and weights.recordedChecksum(path) is None:
            with slicer.util.tryWithErrorDisplay("Could not read the weights file."):
                sha256 = self.runWithProgress(sha256_of, path, label="Computing the SHA-256")
                weights.recordChecksum(path, sha256, "local file", verifiedByHost=False)
        self.updateStatus()

    def onDownload(self):
        message = (
            f"Download the CT-SAM3D weights (about 300 MB) from\n{MODEL_PAGE}\ninto "
            f"{weights.defaultWeightsPath()}?\n\n{weights.LICENCE_NOTE}"
        )
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle="CT-SAM3D weights"):
            return
        self.startDownload(weights.defaultWeightsPath())

    def runWithProgress(self, function, *arguments, label="", cancellable=False, **keywords):
        """Run ``function(*arguments, progress[, isCancelled], **keywords)`` on the worker while Slicer
        stays responsive, showing ``progress(done, total)`` in the progress bar; returns its result."""
        if self._busy:
            raise RuntimeError("another CT-SAM3D file operation is running")
        self._busy = True
        self._cancelDownload.clear()
        self._progress = (0, None)

        def progress(done, total):
            self._progress = (done, total)

        extra = (self._cancelDownload.is_set,) if cancellable else ()
        job = self._fileWorker.submit(lambda: function(*arguments, progress, *extra, **keywords))
        self.progressBar.visible = True
        self.progressBar.value = 0
        self.downloadButton.enabled = False
        self.cancelButton.enabled = cancellable
        try:
            return waitProcessingEvents(job, slicer.app.processEvents, lambda: self._showProgress(label))
        finally:
            self._busy = False
            self.progressBar.visible = False
            self.downloadButton.enabled = True
            self.cancelButton.enabled = False
            self.updateStatus()

    def _showProgress(self, label):
        done, total = self._progress
        if total:
            self.progressBar.maximum = 100
            self.progressBar.value = int(100 * done / total)
        else:
            self.progressBar.maximum = 0
        self.progressBar.format = f"{label}: {done / 1e6:.1f} MB"

    def startDownload(self, destination, endpoint=DEFAULT_ENDPOINT):
        """Download the authors' checkpoint into ``destination`` on the worker (from ``endpoint``, ModelScope
        or a mirror), with progress and cancel, keeping Slicer responsive; returns when it ends (the outcome
        is shown, never raised)."""
        try:
            result = self.runWithProgress(weights.downloadAuthorsWeights, destination, label="Downloading",
                                          cancellable=True, endpoint=endpoint)
        except DownloadCancelledError:
            slicer.util.showStatusMessage("CT-SAM3D weights download cancelled", 3000)
        except WorkerStoppedError:
            return  # Slicer is quitting: no message box on the way out (the partial file resumes next time)
        except Exception as error:
            slicer.util.errorDisplay(f"Download of the CT-SAM3D weights failed: {error}")
        else:
            self.weightsPathEdit.currentPath = result.path
            weights.setSettingsValue("WeightsPath", result.path)
            checked = "verified against ModelScope's checksum" if result.verified else "the host gave no checksum"
            slicer.util.showStatusMessage(f"CT-SAM3D weights downloaded (SHA-256 {result.sha256}, {checked})", 5000)
        self.updateStatus()

    def onCancelDownload(self):
        self._cancelDownload.set()

    # ------------------------------------------------------------ server
    def _showServerFields(self):
        onServer = self.runOnCombo.currentIndex == 1
        for widget in (self.serverURLEdit, self.serverTokenEdit, self.testConnectionButton):
            widget.enabled = onServer

    def onRunOnChanged(self, *_):
        """Keep the choice (and the address and token) in the settings and hand it to the logic."""
        onServer = self.runOnCombo.currentIndex == 1
        url, token = self.serverURLEdit.text.strip(), self.serverTokenEdit.text.strip()
        weights.setSettingsValue("RunOn", "server" if onServer else "computer")
        weights.setSettingsValue("ServerURL", url)
        weights.setSettingsValue("ServerToken", token)
        self._showServerFields()
        if onServer and url:
            try:
                self.logic.useServer(url, token or None)
            except ValueError as error:
                self.connectionLabel.text = str(error)
                return
        else:
            self.logic.useThisComputer()
        self.connectionLabel.text = ""
        self.updateStatus()

    def onTestConnection(self):
        url, token = self.serverURLEdit.text.strip(), self.serverTokenEdit.text.strip()
        self.connectionLabel.text = f"Connecting to {url}..."
        try:
            health = self.logic.serverHealth(url, token or None)
        except Exception as error:
            self.connectionLabel.text = f"Cannot use the server: {error}"
            return
        self.connectionLabel.text = (
            f"Connected: CT-SAM3D server {health.get('version', '?')} on {health.get('device', '?')}, "
            f"{health.get('sessions', '?')} session(s) open"
        )

    # ------------------------------------------------------------ model
    def onDeviceChanged(self, device):
        weights.setSettingsValue("Device", device)
        self.logic.device = device
        self.logic.setNetwork(None)
        self.updateStatus()

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Could not install the Python packages.", waitCursor=True):
            dependencies.ensureDependencies(
                lambda question: slicer.util.confirmOkCancelDisplay(question, windowTitle="CT-SAM3D")
            )
        self.updateStatus()

    def onLoadModel(self):
        self.loadButton.enabled = False
        try:
            with slicer.util.tryWithErrorDisplay("Could not load the CT-SAM3D model."):
                self.logic.loadModel(self.weightsPathEdit.currentPath, self.deviceCombo.currentText,
                                     onTick=self._showLoadProgress)
        finally:
            self.modelStateLabel.text = self.logic.modelState()
            self.updateStatus()

    def _showLoadProgress(self):
        progress = self.logic.progress
        if progress is not None:
            done = f"{100 * progress.done // progress.total}%" if progress.total else "..."
            self.modelStateLabel.text = f"{progress.stage}: {done}"


class CTSAM3DTest(ScriptedLoadableModuleTest):
    """The whole flow in a running Slicer, without network access or files: a CT made here, the
    authors' network with deterministic reference weights built in memory, the logic from Python,
    then the effect inside a Segment Editor widget with undo. Without PyTorch it checks what needs no
    network (module, effect registration, a clear message at the first click) and says how to install it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CTSAM3D_effect_without_network()
        missing = dependencies.missingPackages()
        if missing:
            message = (
                f"CT-SAM3D self-test: the network part was NOT run, because {', '.join(missing)} is not "
                "installed. Install it from the CT-SAM3D module ('Install missing packages...', which uses "
                "the PyTorch extension), restart Slicer, and run this test again."
            )
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_CTSAM3D_logic_and_effect()

    def makeCT(self):
        """An oblique, flipped CT (HU) with a bright ellipsoid; returns (volume node, centre RAS)."""
        k, j, i = np.mgrid[0:48, 0:64, 0:64]
        inside = ((i - 30) / 12.0) ** 2 + ((j - 34) / 10.0) ** 2 + ((k - 24) / 8.0) ** 2 <= 1.0
        voxels = np.where(inside, 150, -900).astype(np.int16)
        angle = np.deg2rad(20.0)
        cosine, sine = np.cos(angle), np.sin(angle)
        rotation = np.array([[cosine, -sine, 0.0], [sine, cosine, 0.0], [0.0, 0.0, 1.0]])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = rotation @ np.diag([-1.2, -1.2, 2.0])
        ijkToRAS[:3, 3] = (40.0, 25.0, -60.0)
        volumeNode = slicer.util.addVolumeFromArray(voxels, ijkToRAS, "CTSAM3D test CT")
        centreRAS = (ijkToRAS @ np.array([30, 34, 24, 1.0]))[:3]
        return volumeNode, centreRAS

    @staticmethod
    def makeNetwork():
        """The authors' CT-SAM3D network with the deterministic reference weights, in memory."""
        from CTSAM3DLib.model import build_model
        from CTSAM3DLib.reference_weights import deterministic_state_dict

        network = build_model("tiny")
        network.load_state_dict(deterministic_state_dict(network))
        return network

    def makeEditor(self, volumeNode, segmentationNode):
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentationNode)
        editorWidget.setSourceVolumeNode(volumeNode)
        return editorWidget, editorNode

    def waitForEffect(self, effect, seconds=300.0):
        timer = qt.QElapsedTimer()
        timer.start()
        while effect.isBusy():
            slicer.app.processEvents()
            self.assertLess(timer.elapsed(), seconds * 1000, "the effect did not finish")

    def test_CTSAM3D_effect_without_network(self):
        """Module and effect load without torch; clicks that cannot run say why, and write nothing."""
        self.delayDisplay("CT-SAM3D: the effect without a network")
        volumeNode, centreRAS = self.makeCT()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "first")
        editorWidget, editorNode = self.makeEditor(volumeNode, segmentationNode)
        editorNode.SetSelectedSegmentID(segmentId)
        editorWidget.setActiveEffectByName("CT-SAM3D")
        effect = editorWidget.activeEffect().self()
        editorWidget.setSourceVolumeNode(None)
        self.assertTrue(effect.addPromptRAS(centreRAS, True))
        self.waitForEffect(effect)
        self.assertIn("Select a source volume", effect.statusLabel.text)
        if dependencies.missingPackages():
            editorWidget.setSourceVolumeNode(volumeNode)
            CTSAM3DLogic.shared().setNetwork(None)
            self.assertTrue(effect.addPromptRAS(centreRAS, False))
            self.waitForEffect(effect)
            self.assertIn("PyTorch", effect.statusLabel.text)
        self.assertEqual(
            int(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode).sum()), 0
        )
        editorWidget.setActiveEffectByName("")

    def test_CTSAM3D_logic_and_effect(self):
        self.delayDisplay("CT-SAM3D: building a CT and the network (reference weights, in memory)")
        volumeNode, centreRAS = self.makeCT()
        logic = CTSAM3DLogic.shared()
        logic.device = "cpu"
        logic.setNetwork(self.makeNetwork())
        self.assertIn("loaded", logic.modelState())

        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = logic.segmentFromPoints(volumeNode, segmentationNode, None, [centreRAS], [])
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertEqual(labelmap.shape, slicer.util.arrayFromVolume(volumeNode).shape)
        self.delayDisplay(f"Logic: {int(labelmap.sum())} voxels in {logic.lastClickSeconds:.2f} s")

        self.delayDisplay("CT-SAM3D: effect in the Segment Editor")
        otherId = segmentationNode.GetSegmentation().AddEmptySegment("", "other")
        editorWidget, editorNode = self.makeEditor(volumeNode, segmentationNode)
        editorNode.SetSelectedSegmentID(otherId)
        editorNode.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
        editorWidget.setActiveEffectByName("CT-SAM3D")
        effect = editorWidget.activeEffect().self()
        before = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)

        self.assertTrue(effect.addPromptRAS(centreRAS, True))
        self.waitForEffect(effect)
        self.assertIn("Done", effect.statusLabel.text)
        positiveList = editorNode.GetNodeReference("CT-SAM3D.PositivePrompts")
        self.assertEqual(positiveList.GetNumberOfControlPoints(), 1)
        afterFirst = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, otherId, volumeNode)
        self.assertTrue(effect.addPromptRAS(centreRAS + np.array([0.0, 0.0, 30.0]), False))
        self.waitForEffect(effect)
        negativeList = editorNode.GetNodeReference("CT-SAM3D.NegativePrompts")
        self.assertEqual(negativeList.GetNumberOfControlPoints(), 1)
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode), before
        )

        editorWidget.undo()
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, otherId, volumeNode), afterFirst
        )
        editorWidget.undo()
        self.assertEqual(
            int(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, otherId, volumeNode).sum()), 0
        )
        editorWidget.setActiveEffectByName("")
        self.delayDisplay(f"Effect: last click {logic.lastClickSeconds:.2f} s")
        logging.info("CT-SAM3D self-test passed")
