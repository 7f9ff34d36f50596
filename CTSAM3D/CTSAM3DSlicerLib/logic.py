"""CTSAM3DLogic: CT-SAM3D in Slicer without any GUI (scriptable from the Python console).

Main-thread side: read MRML (volume voxels, geometry, prompts) and write the result. Worker side: verify
and load the weights, keep one CTSAM3DLib session per volume, run the clicks. Only SimpleITK images,
tuples and the network cross between the two. The main thread waits for the worker in
``worker.waitProcessingEvents`` (GIL released, events processed), never by polling from a timer.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import SimpleITK as sitk  # noqa: N813
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from CTSAM3DLib.constants import MAX_OPEN_PATCHES
from CTSAM3DLib.interface import Segmenter
from CTSAM3DLib.world import ras_to_lps

from . import coordinates, dependencies, weights
from .worker import InferenceWorker, LatestValue, waitProcessingEvents

SessionFactory = Callable[..., Segmenter]
"""(runtime, image in world LPS, device, cross_patch=..., max_patches=..., initial_mask=..., box_lps=...) ->
a ``CTSAM3DLib.interface.Segmenter`` (an ``InteractiveSession`` here, or a ``RemoteSession``). ``runtime`` is
the loaded network prepared for ``device`` (a ``CTSAM3DLib.runtime.Runtime``, shared by the sessions on it),
or None when sessions run on a server."""


class Prediction(NamedTuple):
    """A finished prediction. ``update``: what the clicks changed since the session's previous
    prediction (a ``CTSAM3DLib.interface.MaskUpdate`` on the volume's voxel grid); ``wholeMask()``: the
    whole mask (SimpleITK uint8 in the volume's world LPS geometry), built when called; ``session``:
    which session made it (a number that changes whenever the logic starts a new session);
    ``newSession``: True when that session started with this prediction (from the initial mask, or
    from nothing)."""

    update: Any
    wholeMask: Callable[[], sitk.Image]
    session: int
    newSession: bool


class PredictionCancelledError(Exception):
    """The user cancelled the prediction; nothing was written."""


class Progress(NamedTuple):
    """What the worker is doing: ``stage`` ("Verifying the weights", "Loading the network",
    "Segmenting"), and ``done`` of ``total`` units (bytes or patches; total 0 when unknown)."""

    stage: str
    done: int = 0
    total: int = 0


def defaultSessionFactory(runtime, image: sitk.Image, device: str, cross_patch: bool = True,
                          max_patches: int = MAX_OPEN_PATCHES, initial_mask: Optional[sitk.Image] = None,
                          box_lps=None):
    from CTSAM3DLib.session import InteractiveSession

    # Switched on, it runs whenever the network has a cross-patch model (CT-SAM3D always does).
    return InteractiveSession(runtime, image, device=device, cross_patch=None if cross_patch else False,
                              max_patches=max_patches, initial_mask=initial_mask, box_lps=box_lps)


def remoteSessionFactory(url: str, token: Optional[str] = None) -> SessionFactory:
    """Sessions run by a ``ctsam3d serve`` server at ``url`` (``CTSAM3DLib.remote.RemoteSession``: the same
    interface, no PyTorch needed here); the runtime and device arguments are the server's business."""

    def factory(runtime, image: sitk.Image, device: str, cross_patch: bool = True,
                max_patches: int = MAX_OPEN_PATCHES, initial_mask: Optional[sitk.Image] = None, box_lps=None):
        from CTSAM3DLib.remote import RemoteSession

        return RemoteSession(url, image, token=token or None, cross_patch=None if cross_patch else False,
                             max_patches=max_patches, initial_mask=initial_mask, box_lps=box_lps)

    return factory


def makeClicks(prompts: Sequence[Tuple[Sequence[float], bool]]) -> List[Tuple[Tuple[float, ...], bool]]:
    """CTSAM3DLib clicks ((point LPS, positive) pairs) from (point RAS, positive) pairs, order kept."""
    return [(ras_to_lps(pointRAS), bool(positive)) for pointRAS, positive in prompts]


class CTSAM3DLogic(ScriptedLoadableModuleLogic):
    """Loads the network, runs clicks and writes masks into segments.

    Typical console use::

        logic = CTSAM3DLogic()
        logic.loadModel("/path/to/params.pth")        # or: download with CTSAM3DSlicerLib.weights
        segmentId = logic.segmentFromPoints(volumeNode, segmentationNode, None, [[10.0, -20.0, 30.0]], [])

    The blocking calls (``loadModel``, ``predictMask``, ``segmentFromPoints``) keep Slicer responsive
    while they wait, and accept ``onTick()``, called as they wait, to show ``logic.progress``.
    """

    _shared: Optional[CTSAM3DLogic] = None

    @classmethod
    def shared(cls) -> CTSAM3DLogic:
        """The logic shared by the module panel and the effect, so the network is loaded once."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self, network=None, sessionFactory: SessionFactory = defaultSessionFactory) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.network = network
        self.sessionFactory = sessionFactory
        self.device = weights.settingsValue("Device", "auto")
        self.worker = InferenceWorker()
        self.loadedCheckpoint: Optional[str] = None
        self.lastClickSeconds: Optional[float] = None
        self.lastTiming: dict = {}
        self.progress: Optional[Progress] = None
        self._loading: Optional[Tuple[str, str, concurrent.futures.Future]] = None
        self._runtime: Optional[Tuple[Any, str, Any]] = None
        """(network, device, the ``CTSAM3DLib.runtime.Runtime`` of that network on that device): made on the
        worker at the first session, kept for the next ones while the network and device stay."""
        self.crossPatch = True
        self.maxPatches = MAX_OPEN_PATCHES
        self._session = None
        self._sessionKey: Optional[tuple] = None
        self._sessionNumber = 0
        self.serverURL: Optional[str] = None
        """Where sessions run when not here: a ``ctsam3d serve`` server (None: this computer)."""
        self._serverToken: Optional[str] = None
        if weights.settingsValue("RunOn", "computer") == "server" and weights.settingsValue("ServerURL"):
            self.useServer(weights.settingsValue("ServerURL"), weights.settingsValue("ServerToken") or None)

    # ----------------------------------------------------------------- model
    def modelState(self) -> str:
        if self.serverURL is not None:
            return f"on the server {self.serverURL}"
        if self.network is None:
            return "not loaded"
        where = self.loadedCheckpoint or "network set from Python"
        return f"loaded ({where}, device {self.device})"

    def setNetwork(self, network) -> None:
        """Use an already built network (any object with encode/decode), e.g. from Python."""
        self.network = network
        self.loadedCheckpoint = None
        self._runtime = None
        self.releaseSession()

    def loadModel(
        self, checkpointPath: Optional[str] = None, device: Optional[str] = None,
        onTick: Optional[Callable[[], None]] = None,
    ) -> None:
        """Verify (once per file version) and load the checkpoint (default: the weights chosen in the
        module panel) on the worker thread, keeping Slicer responsive meanwhile."""
        missing = dependencies.missingPackages()
        if missing:
            raise dependencies.DependencyError(
                f"CT-SAM3D needs PyTorch ({', '.join(missing)} is not installed): install it in the CT-SAM3D "
                "module ('Install missing packages...'), then restart Slicer"
            )
        path = checkpointPath or weights.configuredWeightsPath()
        if not path:
            raise ValueError(
                "no CT-SAM3D weights are configured: download or choose them in the CT-SAM3D module "
                "(or pass checkpointPath)"
            )
        device = device or self.device

        def load():
            self.progress = Progress("Verifying the weights")
            weights.verifyRecordedChecksum(
                path, lambda done, total: setattr(self, "progress", Progress("Verifying the weights", done, total or 0))
            )
            self.progress = Progress("Loading the network")
            import CTSAM3DLib
            from CTSAM3DLib.torch_warnings import hide_torch_internal_warnings

            # torch is imported from here on; its internals' warnings are not for a Slicer user.
            hide_torch_internal_warnings()
            return CTSAM3DLib.load_checkpoint(path, device=device)

        # Asked again while it loads (events are processed meanwhile): wait for that same load.
        joining = self._loading is not None and self._loading[:2] == (path, device)
        job = self._loading[2] if joining else self.worker.submit(load)
        if not joining:
            self._loading = (path, device, job)
        try:
            network = waitProcessingEvents(job, slicer.app.processEvents, onTick)
        finally:
            if not joining:
                self._loading = None
                self.progress = None
        self.network, self.device, self.loadedCheckpoint = network, device, path
        self._runtime = None
        self.releaseSession()

    def ensureModel(self, onTick: Optional[Callable[[], None]] = None) -> None:
        if self.network is None and self.serverURL is None:
            self.loadModel(onTick=onTick)

    def useServer(self, url: str, token: Optional[str] = None) -> None:
        """Run sessions on a ``ctsam3d serve`` server from now on (the network here is not needed)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server address must start with http:// or https://, got {url!r}")
        self.serverURL, self._serverToken = url.rstrip("/"), token
        self.releaseSession()

    def useThisComputer(self) -> None:
        """Run sessions here again, with the loaded network."""
        self.serverURL, self._serverToken = None, None
        self.releaseSession()

    def serverHealth(self, url: str, token: Optional[str] = None) -> dict:
        """The server's health report (version, device, sessions, queue); raises when it cannot be
        reached or refuses the token. Call on the main thread: it waits with events processed."""
        from CTSAM3DLib.remote import server_health

        return waitProcessingEvents(self.worker.submit(server_health, url, token, 10.0, 0), slicer.app.processEvents)

    def setCrossPatch(self, enabled: bool, maxPatches: int = MAX_OPEN_PATCHES) -> None:
        """Switch cross-patch prompting (carrying a segmentation into neighbouring patches) and its
        cap on open patches; takes effect at the next prediction (the session is rebuilt)."""
        if (bool(enabled), int(maxPatches)) != (self.crossPatch, self.maxPatches):
            self.crossPatch, self.maxPatches = bool(enabled), int(maxPatches)
            self.releaseSession()

    def releaseSession(self) -> None:
        """Forget the session (its clicks, patches and copy of the volume), e.g. when the scene closes."""
        self._session = None
        self._sessionKey = None

    # ------------------------------------------------------------ prediction
    @staticmethod
    def _volumeKey(volumeNode) -> tuple:
        return (
            volumeNode.GetID(),
            volumeNode.GetImageData().GetMTime(),
            coordinates.volumeIjkToWorldRas(volumeNode).round(6).tobytes(),
        )

    def startPrediction(
        self,
        volumeNode,
        prompts: Sequence[Tuple[Sequence[float], bool]],
        isCancelled: Optional[Callable[[], bool]] = None,
        initialMask: Optional[sitk.Image] = None,
        boxRAS: Optional[Sequence[float]] = None,
        preview: Optional[Callable[[Any], None]] = None,
    ) -> concurrent.futures.Future:
        """Queue the clicks (world RAS, click order) on the worker; the future gives a ``Prediction``,
        or raises PredictionCancelledError once
        ``isCancelled()`` (polled between batches of patches) turns true. ``initialMask`` (from
        ``coordinates.segmentOnVolumeGrid``) is where the segmentation starts; ``boxRAS`` (world RAS
        bounds: xmin, xmax, ymin, ymax, zmin, zmax) clips it. ``preview(update)`` is called ON THE WORKER
        with the mask as a click that cross-patch prompting carries on grows (a ``MaskUpdate`` against the
        mask before that click; ``CTSAM3DLib.interface.PreviewCallback``), whether the network runs here or
        on a server (which streams its previews). Call on the main thread."""
        if self.network is None and self.serverURL is None:
            raise RuntimeError("no CT-SAM3D network loaded: load it in the CT-SAM3D module or with loadModel")
        box = None if boxRAS is None else tuple(ras_to_lps(boxRAS[i::2]) for i in (0, 1))
        key = (self._volumeKey(volumeNode), id(initialMask) if initialMask is not None else None, box)
        image = coordinates.volumeToImage(volumeNode) if key != self._sessionKey else None
        clicks = makeClicks(prompts)
        network, factory, device = self.network, self.sessionFactory, self.device
        if self.serverURL is not None:
            factory, network = remoteSessionFactory(self.serverURL, self._serverToken), None
        options = {"cross_patch": self.crossPatch, "max_patches": self.maxPatches}
        if initialMask is not None:
            options["initial_mask"] = initialMask
        if box is not None:
            options["box_lps"] = box

        def checkCancelled():
            if isCancelled is not None and isCancelled():
                raise PredictionCancelledError("the prediction was cancelled; the segment was left as it was")

        def progress(done: int, planned: int) -> None:
            self.progress = Progress("Segmenting", done, planned)
            checkCancelled()

        def showPreview(update) -> None:
            checkCancelled()
            preview(update)

        def run():
            started = time.perf_counter()
            self.progress = Progress("Segmenting")
            if image is not None:
                self.releaseSession()
                self._session = factory(self._runtimeFor(network, device), image, device, **options)
                self._sessionKey = key
                self._sessionNumber += 1
            session = self._session
            if session is None:
                raise RuntimeError("the CT-SAM3D session was dropped (model or device changed); click again")
            checkCancelled()
            update = session.set_clicks(clicks, progress=progress, preview=None if preview is None else showPreview)
            self.lastClickSeconds = time.perf_counter() - started
            self.lastTiming = dict(getattr(session, "last_timing", {}) or {})
            return Prediction(update, lambda: session.mask, self._sessionNumber, image is not None)

        return self.worker.submit(run)

    def _runtimeFor(self, network, device: str):
        """The runtime of ``network`` on ``device`` (None for no network), prepared once: runs on the worker."""
        if network is None:
            return None
        kept = self._runtime
        if kept is None or kept[0] is not network or kept[1] != device:
            from CTSAM3DLib.runtime import Runtime

            kept = self._runtime = (network, device, Runtime(network, device))
        return kept[2]

    def predict(
        self,
        volumeNode,
        prompts: Sequence[Tuple[Sequence[float], bool]],
        isCancelled: Optional[Callable[[], bool]] = None,
        onTick: Optional[Callable[[], None]] = None,
        initialMask: Optional[sitk.Image] = None,
        boxRAS: Optional[Sequence[float]] = None,
        onPreview: Optional[Callable[[Any], None]] = None,
    ) -> Prediction:
        """Blocking form of startPrediction that keeps Slicer responsive while it waits. ``onPreview(update)``
        is called ON THE MAIN THREAD, as it waits, with the newest preview the worker made since the last
        call (a newer one supersedes an older one not yet shown); never after the prediction ended."""
        latest = LatestValue()

        def tick() -> None:
            update = latest.take()
            if update is not None and onPreview is not None:
                onPreview(update)
            if onTick is not None:
                onTick()

        try:
            return waitProcessingEvents(
                self.startPrediction(volumeNode, prompts, isCancelled, initialMask, boxRAS,
                                     latest.put if onPreview is not None else None),
                slicer.app.processEvents, tick,
            )
        finally:
            self.progress = None

    def predictMask(self, volumeNode, prompts: Sequence[Tuple[Sequence[float], bool]], **options) -> sitk.Image:
        """The whole mask (SimpleITK uint8, the volume's world LPS geometry) after ``predict`` (which takes
        the same keyword options)."""
        return self.predict(volumeNode, prompts, **options).wholeMask()

    def segmentFromPoints(
        self,
        volumeNode,
        segmentationNode,
        segmentId: Optional[str],
        positivePointsRAS: Sequence[Sequence[float]],
        negativePointsRAS: Sequence[Sequence[float]] = (),
        segmentName: str = "CT-SAM3D",
    ) -> str:
        """Segment from world-RAS points (positives clicked first) and replace the segment's content.

        Without the Segment Editor this writes directly (no masking, no editor undo). ``segmentId``
        None or "" adds a new segment. Returns the segment ID.
        """
        if not positivePointsRAS:
            raise ValueError("at least one positive point is needed")
        segmentation = segmentationNode.GetSegmentation()
        if segmentId and segmentation.GetSegment(segmentId) is None:
            raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'")
        self.ensureModel()
        prompts: List[Tuple[Sequence[float], bool]] = [(p, True) for p in positivePointsRAS]
        prompts += [(p, False) for p in negativePointsRAS]
        mask = self.predictMask(volumeNode, prompts)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("", segmentName)
        self.writeMask(mask, volumeNode, segmentationNode, segmentId)
        return segmentId

    @staticmethod
    def writeMask(mask: sitk.Image, volumeNode, segmentationNode, segmentId: str) -> int:
        """Replace the segment by ``mask`` (world LPS) in the segmentation's reference geometry."""
        labelmap = coordinates.segmentationReferenceImage(segmentationNode, volumeNode)
        voxels = coordinates.writeMaskIntoOrientedImage(
            mask, labelmap, coordinates.nodeToWorldMatrix(segmentationNode)
        )
        segmentationLogic = slicer.vtkSlicerSegmentationsModuleLogic
        if not segmentationLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentationNode, segmentId, segmentationLogic.MODE_REPLACE
        ):
            raise RuntimeError(f"could not write segment '{segmentId}'")
        return voxels
