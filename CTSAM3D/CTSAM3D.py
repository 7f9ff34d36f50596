"""CT-SAM3D module: settings panel (weights, device, dependencies) and registration of the
Segment Editor effect "CT-SAM3D". The work is done by CTSAM3DLogic (usable without this GUI)."""

import logging
import os
import tempfile
import threading

import ctk
import numpy as np
import qt
import slicer
from CTSAM3DSlicerLib import dependencies, weights
from CTSAM3DSlicerLib.logic import CTSAM3DLogic
from CTSAM3DSlicerLib.worker import InferenceWorker
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

__all__ = ["CTSAM3D", "CTSAM3DLogic", "CTSAM3DTest", "CTSAM3DWidget"]

DEVICES = ("auto", "cpu", "cuda", "mps")


class CTSAM3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CT-SAM3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SlicerCTSAM3D developers"]
        self.parent.helpText = (
            "Interactive 3D segmentation of CT from clicks with CT-SAM3D. Set up the network weights and the "
            "device here, then use the 'CT-SAM3D' effect in the Segment Editor."
        )
        self.parent.acknowledgementText = (
            "CT-SAM3D network by Guo et al. (alibaba-damo-academy/ct-sam3d). " + weights.LICENCE_NOTE
        )
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

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
        self._downloader = InferenceWorker()
        self._download = None
        self._cancelDownload = threading.Event()
        self._progress = [0, None]

        weightsSection = ctk.ctkCollapsibleButton()
        weightsSection.text = "Network weights"
        self.layout.addWidget(weightsSection)
        weightsForm = qt.QFormLayout(weightsSection)
        self.weightsPathEdit = ctk.ctkPathLineEdit()
        self.weightsPathEdit.filters = ctk.ctkPathLineEdit.Files
        self.weightsPathEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt)"]
        self.weightsPathEdit.currentPath = weights.configuredWeightsPath()
        self.weightsPathEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        weightsForm.addRow("Weights file:", self.weightsPathEdit)
        self.downloadButton = qt.QPushButton("Download the authors' weights")
        self.downloadButton.toolTip = f"Streams {weights.AUTHORS_WEIGHTS_URL} into Slicer's cache folder"
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

        modelSection = ctk.ctkCollapsibleButton()
        modelSection.text = "Model"
        self.layout.addWidget(modelSection)
        modelForm = qt.QFormLayout(modelSection)
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

        self._downloadTimer = qt.QTimer()
        self._downloadTimer.interval = 100
        self._downloadTimer.connect("timeout()", self._onDownloadTimer)
        self._statusTimer = qt.QTimer()
        self._statusTimer.interval = 1000
        self._statusTimer.connect("timeout()", self.updateStatus)
        self.updateStatus()

    def cleanup(self):
        self._downloadTimer.stop()
        self._statusTimer.stop()
        self._cancelDownload.set()

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
        recorded = weights.recordedChecksum(path) if path and os.path.isfile(path) else None
        self.checksumLabel.text = recorded or ("not recorded" if path else "no weights chosen")
        self.modelStateLabel.text = self.logic.modelState()
        seconds = self.logic.lastClickSeconds
        self.lastClickLabel.text = "-" if seconds is None else f"{seconds:.2f} s"
        self.loadButton.enabled = bool(path) and not missing and self._download is None

    # ------------------------------------------------------------- weights
    def onWeightsPathChanged(self, path):
        weights.setSettingsValue("WeightsPath", path)
        if path and os.path.isfile(path) and weights.recordedChecksum(path) is None:
            with slicer.util.tryWithErrorDisplay("Could not read the weights file.", waitCursor=True):
                weights.recordChecksum(path, weights.computeSha256(path), "local file")
        self.updateStatus()

    def onDownload(self):
        message = (
            f"Download the CT-SAM3D weights from\n{weights.AUTHORS_WEIGHTS_URL}\ninto "
            f"{weights.defaultWeightsPath()}?\n\n{weights.LICENCE_NOTE}"
        )
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle="CT-SAM3D weights"):
            return
        self.startDownload(weights.AUTHORS_WEIGHTS_URL, weights.defaultWeightsPath())

    def startDownload(self, url, destination):
        """Stream ``url`` to ``destination`` on a background thread, with progress and cancel."""
        self._cancelDownload.clear()
        self._progress = [0, None]

        def progress(done, total):
            self._progress = [done, total]

        self._download = self._downloader.submit(
            weights.download, url, destination, progress, self._cancelDownload.is_set
        )
        self.progressBar.visible = True
        self.progressBar.value = 0
        self.downloadButton.enabled = False
        self.cancelButton.enabled = True
        self._downloadTimer.start()

    def onCancelDownload(self):
        self._cancelDownload.set()

    def _onDownloadTimer(self):
        done, total = self._progress
        if total:
            self.progressBar.maximum = 100
            self.progressBar.value = int(100 * done / total)
        else:
            self.progressBar.maximum = 0
        self.progressBar.format = f"{done / 1e6:.1f} MB"
        if self._download is None or not self._download.done():
            return
        self._downloadTimer.stop()
        download, self._download = self._download, None
        self.progressBar.visible = False
        self.downloadButton.enabled = True
        self.cancelButton.enabled = False
        try:
            result = download.result()
        except weights.DownloadCancelledError:
            slicer.util.showStatusMessage("CT-SAM3D weights download cancelled", 3000)
        except Exception as error:
            slicer.util.errorDisplay(f"Download of the CT-SAM3D weights failed: {error}")
        else:
            self.weightsPathEdit.currentPath = result.path
            weights.setSettingsValue("WeightsPath", result.path)
            slicer.util.showStatusMessage(f"CT-SAM3D weights downloaded (SHA-256 {result.sha256})", 5000)
        self.updateStatus()

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
        with slicer.util.tryWithErrorDisplay("Could not load the CT-SAM3D model.", waitCursor=True):
            self.logic.loadModel(self.weightsPathEdit.currentPath, self.deviceCombo.currentText)
        self.updateStatus()


class CTSAM3DTest(ScriptedLoadableModuleTest):
    """Whole flow in a real Slicer: a CT and a tiny deterministic checkpoint made here, the logic from
    Python, then the effect inside a Segment Editor widget with undo."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.temporaryDirectory = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.temporaryDirectory.cleanup()

    def runTest(self):
        self.setUp()
        try:
            self.test_CTSAM3D_logic_and_effect()
        finally:
            self.tearDown()

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

    def makeCheckpoint(self):
        import CTSAM3DLib
        from CTSAM3DLib.model import build_model
        from CTSAM3DLib.reference_weights import deterministic_state_dict

        network = build_model("tiny")
        network.load_state_dict(deterministic_state_dict(network))
        path = os.path.join(self.temporaryDirectory.name, "tiny.pth")
        CTSAM3DLib.save_checkpoint(path, network)
        return path

    def waitForEffect(self, effect, seconds=300.0):
        timer = qt.QElapsedTimer()
        timer.start()
        while effect.isBusy():
            slicer.app.processEvents()
            self.assertLess(timer.elapsed(), seconds * 1000, "the effect did not finish")

    def test_CTSAM3D_logic_and_effect(self):
        self.delayDisplay("CT-SAM3D: building a CT and a tiny checkpoint")
        volumeNode, centreRAS = self.makeCT()
        logic = CTSAM3DLogic.shared()
        logic.loadModel(self.makeCheckpoint(), "cpu")
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
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentationNode)
        editorWidget.setSourceVolumeNode(volumeNode)
        editorNode.SetSelectedSegmentID(otherId)
        editorNode.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
        editorWidget.setActiveEffectByName("CT-SAM3D")
        effect = editorWidget.activeEffect().self()
        before = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)

        self.assertTrue(effect.addPromptRAS(centreRAS, True))
        self.waitForEffect(effect)
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
