"""Helpers of the browser tests: the web client built from ``web/`` (npm), Debian's Chromium driven by
Playwright (``executable_path``: no browser download), and the page as a test sees it.

The page publishes what a test reads as ``window.ctsam3d`` (its state, SHA-256 names of its masks and of
the overlays NiiVue draws, canvas positions of world points); tests act on it only as a user does, with
the mouse, the keyboard and its controls.
"""

import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO_ROOT
from server_helpers import request

from CTSAM3DLib import protocol

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError as missing:
    pytest.fail(f"the browser tests need Playwright ({missing}): pip install -e '.[test]'", pytrace=False)

WEB_DIR = REPO_ROOT / "web"
CHROMIUM = Path(os.environ.get("CTSAM3D_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
"""WebGL2 without a GPU: Chromium's software renderer (SwiftShader), as on a CI machine."""

VIEWPORT = {"width": 1400, "height": 900}


def build_web_client() -> None:
    """Builds the client from ``web/`` as the README says (npm ci, then the build), so that the tests run the
    sources as they are; fails loudly without npm."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the browser tests build the web client with npm (Node.js 18 or later), which is not "
                    "installed: apt-get install -y nodejs npm", pytrace=False)
    for command in (["ci", "--no-audit", "--no-fund"], ["run", "build"]):
        done = subprocess.run([npm, *command], cwd=WEB_DIR, capture_output=True, text=True, timeout=600)
        if done.returncode:
            pytest.fail(f"npm {' '.join(command)} in {WEB_DIR} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)


def launch_chromium(playwright: Any) -> Browser:
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install -y chromium "
                    "(.ci/run installs it; CTSAM3D_CHROMIUM names another)", pytrace=False)
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


class ClientPage:
    """The web client in one browser tab, for one server; it records the console's errors and any
    Content-Security-Policy violation."""

    def __init__(self, browser: Browser, url: str, token: Optional[str]) -> None:
        self.url, self.token = url, token
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.page: Page = self.context.new_page()
        self.problems: List[str] = []
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        # The browser logs every answer of 4xx; the page's own errors and CSP violations are what matters.
        if message.type == "error" and not text.startswith("Failed to load resource"):
            self.problems.append(text)

    def load(self, token: Optional[str] = None) -> Any:
        response = self.page.goto(self.url + "/")
        if token is not None:
            self.give_token(token)
        return response

    def give_token(self, token: str) -> None:
        self.page.wait_for_selector("#token-dialog[open]")
        self.page.fill("#token", token)
        self.page.click("#token-ok")

    def open_ct(self, path: Path, max_patches: Optional[int] = None) -> Dict[str, Any]:
        if max_patches is not None:
            self.page.fill("#max-patches", str(max_patches))
        self.page.set_input_files("#open", str(path))
        opened = "() => window.ctsam3d.state() !== null && window.ctsam3d.state().segments.length > 0"
        self.page.wait_for_function(opened, timeout=120_000)
        return self.idle()

    def idle(self) -> Dict[str, Any]:
        """The page's state once every action under way has finished (a failed one leaves its message)."""
        self.page.evaluate("window.ctsam3d.idle()")
        return self.page.evaluate("window.ctsam3d.state()")

    def error(self) -> str:
        return self.page.evaluate("window.ctsam3d.error()")

    def canvas_position(self, index: Sequence[float]) -> List[float]:
        """Where a voxel (x, y, z index) lies on the screen, once the slices are moved through it."""
        self.page.evaluate("i => window.ctsam3d.showIndex(i)", list(index))
        position = self.page.evaluate("i => window.ctsam3d.canvasPositionOfIndex(i)", list(index))
        assert position is not None, f"no view shows the voxel {index}"
        box = self.page.locator("#viewer").bounding_box()
        return [box["x"] + position[0], box["y"] + position[1]]

    def click(self, index: Sequence[float], negative: bool = False) -> Dict[str, Any]:
        """A left click on a voxel (Shift held: negative)."""
        x, y = self.canvas_position(index)
        if negative:
            self.page.keyboard.down("Shift")
        self.page.mouse.click(x, y)
        if negative:
            self.page.keyboard.up("Shift")
        return self.idle()

    def colour_at(self, x: float, y: float) -> List[int]:
        """The RGB of the screen's pixel at (x, y): what the user sees there."""
        from PIL import Image

        png = self.page.screenshot(clip={"x": x, "y": y, "width": 1, "height": 1})
        return list(Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0)))

    def location_value(self) -> float:
        """The CT's value NiiVue itself reports under the crosshair (where the last click put it)."""
        return self.page.evaluate("window.ctsam3d.location().value")

    def drag(self, index_a: Sequence[float], index_b: Sequence[float]) -> Dict[str, Any]:
        """A left drag from one voxel to another, on the view that shows the first."""
        start = self.canvas_position(index_a)
        end = self.page.evaluate("i => window.ctsam3d.canvasPositionOfIndex(i)", list(index_b))
        box = self.page.locator("#viewer").bounding_box()
        self.page.mouse.move(*start)
        self.page.mouse.down()
        self.page.mouse.move(box["x"] + end[0], box["y"] + end[1], steps=8)
        self.page.mouse.up()
        return self.idle()

    def press(self, selector: str) -> Dict[str, Any]:
        self.page.click(selector)
        return self.idle()

    def close(self) -> None:
        self.context.close()


def server_mask(url: str, session: str, shape: Sequence[int], token: Optional[str]) -> np.ndarray:
    """The whole mask of a session, as the server holds it: (z, y, x) uint8."""
    status, answer = request(url, "GET", f"{protocol.API}/sessions/{session}/mask", token=token)
    assert status == 200, answer
    return protocol.decode_update(answer["update"], shape).mask


def assert_page_holds(state: Dict[str, Any], index: int, mask: np.ndarray) -> None:
    """The page's copy of a segment's mask and the overlay NiiVue draws are both exactly ``mask``."""
    name = protocol.array_digest(mask.astype(np.uint8))
    segment = state["segments"][index]
    assert segment["mask"] == name, "the page's mask differs from the server's"
    assert segment["overlay"] == name, "the overlay the page shows differs from the server's mask"
    assert segment["overlayVoxels"] == int(np.count_nonzero(mask))


def oblique_flipped_ct(source: Path, folder: Path) -> sitk.Image:
    """The CT resampled onto an oblique grid (turned 25 degrees about z and 12 about x) whose first axis runs
    the other way, written as ``ct.nii.gz`` and ``ct.nrrd`` in ``folder`` (made per test run, never committed)."""
    image = sitk.ReadImage(str(source))
    turn = sitk.Euler3DTransform()
    turn.SetRotation(np.deg2rad(12), 0.0, np.deg2rad(25))
    matrix = np.array(turn.GetMatrix()).reshape(3, 3) @ np.diag([-1.0, 1.0, 1.0])
    size = [110, 96, 28]
    spacing = [3.0, 3.2, 3.5]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    origin = centre - matrix @ (np.array(spacing) * (np.array(size) - 1) / 2)
    oblique = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                            matrix.flatten().tolist(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(oblique, str(folder / "ct.nii.gz"))
    sitk.WriteImage(oblique, str(folder / "ct.nrrd"))
    return oblique


def bright_voxel(image: sitk.Image, near: Sequence[float], above_hu: float = 150.0) -> List[int]:
    """The index (x, y, z) of the voxel nearest the continuous index ``near`` whose 3x3x3 neighbourhood is all
    above ``above_hu`` (bright whichever voxel a click lands on)."""
    values = sitk.GetArrayFromImage(image)
    bright = values > above_hu
    core = bright.copy()
    for axis in range(3):
        core &= np.roll(bright, 1, axis) & np.roll(bright, -1, axis)
    core[[0, -1], :, :] = core[:, [0, -1], :] = core[:, :, [0, -1]] = False
    candidates = np.argwhere(core)
    assert len(candidates), "no bright voxel in the image"
    zyx = candidates[np.argmin(((candidates - np.array(near)[::-1]) ** 2).sum(axis=1))]
    return [int(v) for v in zyx[::-1]]


def sync_browser():
    """Playwright's synchronous API, started (the caller stops it)."""
    return sync_playwright().start()
