"""The web client (``ctsam3d serve`` at ``/``) end to end in headless Chromium, driven as a user drives it:
against a real server on loopback with a stand-in network (a threshold, exact to check) on an oblique,
flipped CT, and against ``ctsam3d serve`` with the real network. The page's overlays are compared with the
masks the server holds, its clicks with the voxels clicked, its saved NIfTI with the CT's geometry."""

import os
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk
from browser_helpers import (
    ClientPage,
    assert_page_holds,
    bright_voxel,
    build_web_client,
    launch_chromium,
    oblique_flipped_ct,
    server_mask,
    sync_browser,
)
from conftest import REPO_ROOT
from dicom_series import write_volume_series
from server_helpers import free_port, request, wait_until

from CTSAM3DLib import protocol
from CTSAM3DLib.image_files import read_image
from CTSAM3DLib.server import web
from standins.networks import GatedNet

TOKEN = "token-of-the-browser-tests-0123456789"


@pytest.fixture(scope="module")
def built_client():
    """The client built from ``web/`` once per module, before any test asks the server for its page."""
    build_web_client()


@pytest.fixture(scope="module")
def browser(built_client):
    playwright = sync_browser()
    chromium = launch_chromium(playwright)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def oblique(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("oblique")
    return folder, oblique_flipped_ct(data_dir / "abdomen-ct-3mm" / "ct.nii.gz", folder)


@pytest.fixture
def client(browser):
    opened = []

    def open_page(url, token=None):
        opened.append(ClientPage(browser, url, token))
        return opened[-1]

    yield open_page
    for page in opened:
        page.close()


def geometry_of(image):
    return {"origin": image.GetOrigin(), "spacing": image.GetSpacing(), "direction": image.GetDirection()}


def assert_same_geometry(page_geometry, image):
    for name, value in geometry_of(image).items():
        np.testing.assert_allclose(page_geometry[name], value, atol=1e-4, err_msg=name)


def continuous_index(image, point_lps):
    return np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps]))


def test_the_page_is_sent_with_a_strict_policy_and_says_when_it_is_not_built(built_client, serve, tmp_path):
    server = serve(tokens=[TOKEN])
    status, page = request(server.url, "GET", "/")
    assert status == 200 and b'<script type="module" src="/web/app.js">' in page
    from fastapi import FastAPI

    from CTSAM3DLib.server.app import BackgroundServer

    bare = FastAPI()
    web.add_web_client(bare, tmp_path)
    with BackgroundServer(bare) as unbuilt:
        status, page = request(unbuilt.url, "GET", "/")
        assert status == 503 and web.BUILD_COMMAND.encode() in page
        assert request(unbuilt.url, "GET", "/web/app.js")[0] == 404
    # Only dcm2niix's worker may compile WebAssembly; the page and its script may not.
    policies = {}
    for name in ("", "web/app.js", "web/worker.jpeg.js"):
        with urllib.request.urlopen(f"{server.url}/{name}") as response:
            policies[name] = response.headers["Content-Security-Policy"]
    assert "'wasm-unsafe-eval'" in policies["web/worker.jpeg.js"]
    assert policies[""] == policies["web/app.js"] == web.CONTENT_SECURITY_POLICY and "unsafe" not in policies[""]
    assert policies["web/worker.jpeg.js"].replace(" 'wasm-unsafe-eval'", "") == policies[""]
    assert request(server.url, "GET", "/web/../app.py")[0] == 404
    assert request(server.url, "GET", "/web/index.html")[0] == 404


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd"])
def test_the_page_reads_an_oblique_flipped_ct_as_simpleitk_does(serve, client, oblique, name):
    """Voxels (named by their SHA-256 on the wire) and LPS geometry, from NIfTI's and NRRD's RAS headers."""
    folder, image = oblique
    server = serve(tokens=[TOKEN])
    page = client(server.url)
    page.load(TOKEN)
    state = page.open_ct(folder / name)
    assert state["image"] == protocol.array_digest(sitk.GetArrayFromImage(image))
    assert_same_geometry(state["geometry"], image)
    assert state["dims"] == list(image.GetSize())
    assert not page.problems, page.problems


def test_the_page_opens_a_dicom_series_folder_where_simpleitk_puts_it(serve, client, oblique, tmp_path):
    """An oblique, left-handed CT written as a DICOM series (a file per slice, its own position and orientation),
    opened as a folder: dcm2niix (WebAssembly, in the page's worker) turns it into NIfTI in the browser. Every
    voxel the page sends lies on a voxel of SimpleITK's reading of the same series (this project's reader),
    with its value; a click there segments the right place, and the segments are saved in that geometry."""
    _, image = oblique
    folder = write_volume_series(image, tmp_path / "oblique-series")
    series = read_image(folder)
    server = serve(tokens=[TOKEN])
    page = client(server.url)
    page.load(TOKEN)
    page.page.set_input_files("#open-dicom", str(folder))
    page.page.wait_for_function("() => window.ctsam3d.state() !== null && window.ctsam3d.state().segments.length > 0",
                                timeout=120_000)
    state = page.idle()
    assert page.error() == "", page.error()
    # The page's grid is the series' grid, its axes perhaps in another order or direction: every voxel centre
    # of the one (the corners suffice: both maps are affine) is a voxel centre of the other.
    dims = state["dims"]
    assert sorted(dims) == sorted(series.GetSize())
    page_grid = sitk.Image([int(n) for n in dims], sitk.sitkUInt8)
    page_grid.SetOrigin(state["geometry"]["origin"])
    page_grid.SetSpacing(state["geometry"]["spacing"])
    page_grid.SetDirection(state["geometry"]["direction"])
    for corner in np.ndindex(2, 2, 2):
        index = [c * (n - 1) for c, n in zip(corner, dims)]
        on_series = continuous_index(series, page_grid.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(on_series, np.round(on_series), atol=1e-3)
    seen = sitk.Resample(series, page_grid, sitk.Transform(), sitk.sitkNearestNeighbor, -3000.0, sitk.sitkInt16)
    values = sitk.GetArrayFromImage(seen)
    assert values.min() > -3000, "a voxel of the page lies outside the series"
    assert state["image"] in (protocol.array_digest(values), protocol.array_digest(values.astype(np.float32)))

    voxel = bright_voxel(seen, [50, 45, 14])
    state = page.click(voxel)
    assert page.error() == "" and len(state["segments"][0]["prompts"]) == 1
    clicked = state["segments"][0]["prompts"][0]["point_lps"]
    np.testing.assert_allclose(continuous_index(seen, clicked), voxel, atol=0.5)
    mask = server_mask(server.url, state["segments"][0]["session"], values.shape, TOKEN)
    assert mask[voxel[2], voxel[1], voxel[0]] == 1
    assert_page_holds(state, 0, mask)
    with page.page.expect_download() as download:
        page.page.click("#save")
    assert download.value.suggested_filename == "oblique-series-segments.nii.gz"
    saved = tmp_path / "saved.nii.gz"
    download.value.save_as(saved)
    labels = sitk.ReadImage(str(saved))
    assert_same_geometry(geometry_of(labels), seen)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), mask)

    # DICOM SEG: read back with pydicom; every frame references a slice of the series by its UID, lies where
    # that slice lies, and holds the server's mask there (taken onto the series' own grid: the same voxels).
    with page.page.expect_download() as download:
        page.page.click("#save-seg")
    assert download.value.suggested_filename == "oblique-series-segments.seg.dcm"
    download.value.save_as(tmp_path / "segments.seg.dcm")
    assert_seg_holds(tmp_path / "segments.seg.dcm", folder, image,
                     sitk.Resample(sitk_mask(mask, page_grid), image, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert page.page.evaluate("localStorage.length") == 0, "dcmjs's log level was kept beyond the tab"
    assert not page.problems, page.problems


def sitk_mask(mask: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A (z, y, x) mask as an image on ``grid``'s geometry."""
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(grid)
    return image


def assert_seg_holds(path, folder, volume: sitk.Image, mask_on_volume: sitk.Image) -> None:
    """The DICOM SEG at ``path`` segments the series in ``folder`` (written from ``volume``, a file per slice)
    exactly as ``mask_on_volume``: a frame for each slice it touches, none for the others."""
    import pydicom

    seg = pydicom.dcmread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    slices = {dataset.SOPInstanceUID: dataset for dataset in map(pydicom.dcmread, sorted(map(str, folder.iterdir())))}
    number_of = {uid: int(dataset.InstanceNumber) - 1 for uid, dataset in slices.items()}
    first = next(iter(slices.values()))
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    expected = sitk.GetArrayFromImage(mask_on_volume)
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = number_of[uid]
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in slices[uid].ImagePositionPatient], atol=1e-3)
        np.testing.assert_array_equal(frame, expected[k], err_msg=f"the SEG's frame of slice {k}")
        seen.add(k)
    assert seen == {k for k in range(expected.shape[0]) if expected[k].any()}
    assert [segment.SegmentLabel for segment in seg.SegmentSequence] == ["Segment 1"]


def test_a_folder_without_a_dicom_series_is_refused_clearly(serve, client, tmp_path):
    server = serve(tokens=[TOKEN])
    page = client(server.url)
    page.load(TOKEN)
    empty = tmp_path / "not-dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    page.page.set_input_files("#open-dicom", str(empty))
    page.idle()
    assert page.error() == "That folder (1 files) could not be opened as a DICOM series: no DICOM image in it."
    assert page.page.evaluate("window.ctsam3d.state()") is None


def test_clicks_boxes_undo_segments_and_save_on_an_oblique_ct(serve, client, oblique, tmp_path):
    folder, image = oblique
    server = serve(tokens=[TOKEN])
    page = client(server.url)
    response = page.load(TOKEN)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    state = page.open_ct(folder / "ct.nii.gz", max_patches=4)
    shape = sitk.GetArrayViewFromImage(image).shape
    first = bright_voxel(image, [55, 40, 14])

    # A click lands on the voxel under the mouse: NiiVue shows that voxel's value there, and the page sends
    # its LPS point; the mask shown is the server's.
    state = page.click(first)
    assert page.error() == "" and len(state["segments"][0]["prompts"]) == 1
    assert page.location_value() == image[first]
    # What the screen shows there: the click's marker (green, 8 mm), just off the crosshair's lines.
    x, y = page.canvas_position(first)
    red, green, blue = page.colour_at(x + 4, y + 4)
    assert green > 150 and red < 120 and blue < 150, (red, green, blue)
    clicked = state["segments"][0]["prompts"][0]
    assert clicked["positive"] is True
    np.testing.assert_allclose(continuous_index(image, clicked["point_lps"]), first, atol=0.5)
    one = server_mask(server.url, state["segments"][0]["session"], shape, TOKEN)
    assert one[first[2], first[1], first[0]] == 1 and np.count_nonzero(one) > 100
    assert_page_holds(state, 0, one)

    # Shift + click: negative (the stand-in carves a ball around it).
    state = page.click(first, negative=True)
    assert state["segments"][0]["prompts"][1]["positive"] is False
    carved = server_mask(server.url, state["segments"][0]["session"], shape, TOKEN)
    assert carved[first[2], first[1], first[0]] == 0 and np.count_nonzero(carved) < np.count_nonzero(one)
    assert_page_holds(state, 0, carved)

    # Undo, then redo (sent again: the server keeps no redo).
    state = page.press("#undo")
    assert len(state["segments"][0]["prompts"]) == 1
    assert_page_holds(state, 0, server_mask(server.url, state["segments"][0]["session"], shape, TOKEN))
    assert_page_holds(state, 0, one)
    state = page.press("#redo")
    assert [p["positive"] for p in state["segments"][0]["prompts"]] == [True, False]
    assert_page_holds(state, 0, carved)

    # A second segment, its own session: a box drawn on the axial view around another bright voxel.
    state = page.press("#add-segment")
    assert len(state["segments"]) == 2 and state["segments"][1]["session"] != state["segments"][0]["session"]
    page.press('[data-layout="axial"]')
    page.press("#mode-box")
    second = bright_voxel(image, [30, 60, 14])
    state = page.drag([second[0] - 8, second[1] - 8, second[2]], [second[0] + 8, second[1] + 8, second[2]])
    assert page.error() == "", page.error()
    boxed = state["segments"][1]["prompts"]
    assert len(boxed) == 1 and "corners_lps" in boxed[0]
    low, high = np.array(boxed[0]["corners_lps"])
    assert np.all(low < high)
    inside = np.zeros(shape, dtype=bool)
    zz, yy, xx = np.indices(shape)
    points = np.stack([xx, yy, zz], axis=-1).reshape(-1, 3)
    world = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in points])
    inside = np.all((world >= low - 1e-6) & (world <= high + 1e-6), axis=1).reshape(shape)
    two = server_mask(server.url, state["segments"][1]["session"], shape, TOKEN)
    assert np.count_nonzero(two) > 0 and not np.any(two & ~inside), "the box's result leaves the box"
    assert_page_holds(state, 1, two)
    assert_page_holds(state, 0, carved)

    # "Start from this segment": a third session whose starting mask is the second segment's.
    page.press("#mode-click")
    page.press('[data-layout="multi"]')
    state = page.press("#start-from")
    assert len(state["segments"]) == 3 and state["segments"][2]["prompts"] == []
    assert_page_holds(state, 2, server_mask(server.url, state["segments"][2]["session"], shape, TOKEN))
    assert_page_holds(state, 2, two)
    state = page.click(second, negative=True)
    three = server_mask(server.url, state["segments"][2]["session"], shape, TOKEN)
    assert three[second[2], second[1], second[0]] == 0 and two[second[2], second[1], second[0]] == 1
    assert_page_holds(state, 2, three)
    assert_page_holds(state, 1, server_mask(server.url, state["segments"][1]["session"], shape, TOKEN))
    assert_page_holds(state, 1, two)

    # Save: one labelmap in the CT's geometry, later segments over earlier ones.
    with page.page.expect_download() as download:
        page.page.click("#save")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "ct-segments.nii.gz"
    labels = sitk.ReadImage(str(saved))
    assert_same_geometry(geometry_of(labels), image)
    expected = np.where(three == 1, 3, np.where(two == 1, 2, np.where(carved == 1, 1, 0)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    assert not page.problems, page.problems
    screenshot = os.environ.get("CTSAM3D_WEB_SCREENSHOT")
    if screenshot:
        page.page.screenshot(path=screenshot)


def test_an_expired_session_is_opened_again_and_its_prompts_replayed(serve, client, oblique):
    folder, image = oblique
    # The server's own expiry, run when the test says (its periodic sweep would race the page's steps).
    server = serve(tokens=[TOKEN], idle_timeout_s=1.0, sweep_interval_s=3600.0)
    registry = server.app.state.server.registry
    page = client(server.url)
    page.load(TOKEN)
    state = page.open_ct(folder / "ct.nii.gz", max_patches=2)
    shape = sitk.GetArrayViewFromImage(image).shape
    voxel = bright_voxel(image, [55, 40, 14])
    state = page.click(voxel)
    expired = state["segments"][0]["session"]
    time.sleep(1.5)
    assert registry.expire() == 1 and len(registry) == 0
    status, _ = request(server.url, "GET", f"{protocol.API}/sessions/{expired}/mask", token=TOKEN)
    assert status == 404
    state = page.click(voxel, negative=True)
    assert page.error() == ""
    assert "replayed 1 prompt" in page.page.evaluate("window.ctsam3d.message()")
    resumed = state["segments"][0]["session"]
    assert resumed != expired and len(state["segments"][0]["prompts"]) == 2
    status, answer = request(server.url, "GET", f"{protocol.API}/sessions/{resumed}/mask", token=TOKEN)
    assert status == 200 and answer["clicks"] == 2
    assert_page_holds(state, 0, server_mask(server.url, resumed, shape, TOKEN))
    assert not page.problems, page.problems


def test_a_wrong_token_is_asked_again_and_kept_for_the_tab_only(serve, client, oblique):
    folder, _ = oblique
    server = serve(tokens=[TOKEN])
    page = client(server.url)
    page.load("not-the-token")
    page.page.wait_for_function("() => document.querySelector('#token-problem').textContent.includes('refused')")
    page.give_token(TOKEN)
    state = page.open_ct(folder / "ct.nii.gz", max_patches=1)
    assert state["segments"][0]["session"]
    assert page.page.evaluate("sessionStorage.getItem('ctsam3d.token')") == TOKEN
    assert page.page.evaluate("localStorage.length") == 0
    other_tab = page.context.browser.new_context().new_page()
    other_tab.goto(server.url + "/")
    other_tab.wait_for_selector("#token-dialog[open]")
    other_tab.context.close()
    assert not page.problems, page.problems


def test_a_server_without_tokens_never_asks_for_one(serve, client, oblique):
    """``ctsam3d serve`` on loopback without a token file: the page opens, segments and keeps nothing."""
    folder, image = oblique
    server = serve()
    page = client(server.url)
    page.load()
    state = page.open_ct(folder / "ct.nii.gz", max_patches=1)
    state = page.click(bright_voxel(image, [55, 40, 14]))
    assert page.error() == "" and len(state["segments"][0]["prompts"]) == 1
    assert page.page.evaluate("document.querySelector('#token-dialog').open") is False
    assert page.page.evaluate("sessionStorage.length + localStorage.length") == 0
    shape = sitk.GetArrayViewFromImage(image).shape
    assert_page_holds(state, 0, server_mask(server.url, state["segments"][0]["session"], shape, None))
    assert not page.problems, page.problems


def test_a_lost_connection_is_said_and_nothing_is_lost(serve, client, oblique):
    """The network goes (every request fails, as when a cable is pulled or the server stops): the page says it
    is trying again, then that the server cannot be reached, and keeps its prompts and masks; once the network
    is back the click works. A click whose answer is lost after the server applied it counts once: the page's
    retry meets the server's click count (409) and brings the session back to the page's prompts first."""
    folder, image = oblique
    server = serve(tokens=[TOKEN])
    page = client(server.url)
    page.load(TOKEN)
    state = page.open_ct(folder / "ct.nii.gz", max_patches=2)
    shape = sitk.GetArrayViewFromImage(image).shape
    state = page.click(bright_voxel(image, [55, 40, 14]))
    before = state["segments"][0]

    second = bright_voxel(image, [30, 60, 14])
    page.page.route("**/v1/**", lambda route: route.abort("internetdisconnected"))
    x, y = page.canvas_position(second)
    page.page.mouse.click(x, y)
    page.page.wait_for_function(
        "() => document.querySelector('#busy-text').textContent.includes('connection to the server was lost')")
    state = page.idle()
    assert "Cannot reach the CT-SAM3D server" in page.error() and "Nothing on this page was lost" in page.error()
    assert page.error() in page.page.inner_text("#message")
    assert state["segments"][0]["prompts"] == before["prompts"] and state["segments"][0]["mask"] == before["mask"]
    page.page.unroute("**/v1/**")

    applied = []

    def lose_the_answer(route):
        if applied:
            route.continue_()
            return
        applied.append(route.fetch().status)  # the server applies the click; its answer never arrives
        route.abort("connectionreset")

    page.page.route("**/click", lose_the_answer)
    state = page.click(second, negative=True)
    assert applied == [200] and page.error() == ""
    assert [prompt["positive"] for prompt in state["segments"][0]["prompts"]] == [True, False]
    status, answer = request(server.url, "GET", f"{protocol.API}/sessions/{state['segments'][0]['session']}/mask",
                             token=TOKEN)
    assert status == 200 and answer["clicks"] == 2
    assert_page_holds(state, 0, server_mask(server.url, state["segments"][0]["session"], shape, TOKEN))
    assert all("Cannot reach the CT-SAM3D server" in problem for problem in page.problems), page.problems


def test_server_errors_reach_the_user_as_messages(serve, client, oblique):
    folder, _ = oblique
    server = serve(tokens=[TOKEN], max_patches=2)
    page = client(server.url)
    page.load(TOKEN)
    page.page.fill("#max-patches", "3")
    page.page.set_input_files("#open", str(folder / "ct.nii.gz"))
    page.idle()
    assert "max_patches is at most 2" in page.error() and "400" in page.error()
    assert "max_patches is at most 2" in page.page.inner_text("#message")


def test_a_ct_too_large_for_the_server_and_a_full_server_are_said_plainly(serve, client, oblique):
    """413 (the CT is larger than the server takes) and 503 (the server holds its maximum of sessions, with
    its Retry-After): messages that say what happened and what to do; nothing is half-open afterwards."""
    folder, image = oblique
    small = serve(tokens=[TOKEN], max_image_bytes=100_000)
    page = client(small.url)
    page.load(TOKEN)
    page.page.set_input_files("#open", str(folder / "ct.nii.gz"))
    page.idle()
    assert page.error().startswith("Too large for this server (413): the array is 0.6 MiB"), page.error()

    full = serve(tokens=[TOKEN], max_sessions=1)
    page = client(full.url)
    page.load(TOKEN)
    state = page.open_ct(folder / "ct.nii.gz", max_patches=1)
    state = page.press("#add-segment")
    assert page.error().startswith("The server is busy (503): this server holds its maximum of 1 sessions")
    assert len(state["segments"]) == 1 and state["segments"][0]["session"]


def test_a_full_queue_is_said_plainly(serve, client, oblique):
    """429: another client of the same session filled its queue (one click running, held there by the
    stand-in's gate, one waiting) when the page clicks."""
    folder, image = oblique
    network = GatedNet()
    server = serve(network, tokens=[TOKEN], max_queued_per_session=1)
    page = client(server.url)
    page.load(TOKEN)
    state = page.open_ct(folder / "ct.nii.gz", max_patches=1)
    voxel = bright_voxel(image, [55, 40, 14])
    path = f"{protocol.API}/sessions/{state['segments'][0]['session']}/click"
    body = {"point_lps": list(image.TransformIndexToPhysicalPoint(voxel))}
    others = [threading.Thread(target=request, args=(server.url, "POST", path, body), kwargs={"token": TOKEN})
              for _ in range(2)]
    network.hold()
    try:
        # One click running (held at the gate), then one waiting: a loaded machine may take its time over each.
        others[0].start()
        assert network.entered.wait(120), "the other client's first click never reached the network"
        others[1].start()
        wait_until(lambda: request(server.url, "GET", "/health", token=TOKEN)[1]["queue"] == 1, timeout_s=120,
                   what="the other client's second click to queue")
        page.click(voxel)
        # The page's click goes out once its view has handled the mouse: wait for its answer, gate still held.
        page.page.wait_for_function("() => window.ctsam3d.error() !== ''", timeout=60_000)
        state = page.idle()
    finally:
        network.release()
    for other in others:
        other.join(60)
    assert page.error().startswith("The server's queue for this segment is full (429)"), page.error()
    assert "Wait for the clicks under way, then try again." in page.error()
    assert state["segments"][0]["prompts"] == []


@pytest.fixture
def opener(tmp_path):
    """A BROWSER command (Python's webbrowser honours it) that records the address it is asked to open."""
    record = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\necho "$1" > {record}\n')
    script.chmod(0o755)
    return f"{script} %s", record


def test_serve_open_shows_the_page_with_the_real_network(random_weights, client, data_dir, tmp_path, opener):
    """``ctsam3d serve --open`` with CT-SAM3D (random weights: the mask means nothing, the plumbing is real):
    it prints the page's address and opens it; a click's overlay and the saved NIfTI match the server."""
    command, record = opener
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "CTSAM3DLib.cli", "serve", "--weights", str(random_weights), "--port", str(port),
         "--device", "cpu", "--token-file", str(tokens), "--open"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "BROWSER": command})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: record.is_file() and record.read_text().strip(), timeout_s=180,
                   what="ctsam3d serve --open opening the page")
        assert record.read_text().strip() == url + "/"
        ct = data_dir / "abdomen-ct-3mm" / "ct.nii.gz"
        image = sitk.ReadImage(str(ct))
        page = client(url)
        page.load(TOKEN)
        state = page.open_ct(ct, max_patches=1)
        assert_same_geometry(state["geometry"], image)
        state = page.click([60, 50, 15])
        assert page.error() == "" and len(state["segments"][0]["prompts"]) == 1
        mask = server_mask(url, state["segments"][0]["session"], sitk.GetArrayViewFromImage(image).shape, TOKEN)
        assert_page_holds(state, 0, mask)
        with page.page.expect_download() as download:
            page.page.click("#save")
        saved = tmp_path / "saved.nii.gz"
        download.value.save_as(saved)
        labels = sitk.ReadImage(str(saved))
        assert_same_geometry(geometry_of(labels), image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), mask)
        assert not page.problems, page.problems
    finally:
        process.terminate()
        out, err = process.communicate(timeout=60)
    assert f"web client: open {url}/ in a browser" in out, out + err
