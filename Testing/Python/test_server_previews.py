"""Previews of a multi-patch prompt through ``ctsam3d serve`` (a prompt with "previews": true) and
``RemoteSession(..., preview=)``, over real HTTP on loopback, on the real abdomen CT (stored RAS: flipped
axes), with stand-in networks whose click spreads into up to ten patches. ``PacedNet`` holds each level
of neighbours until the client has seen the preview before it, so a preview held back until the answer
fails the test rather than depending on timing."""

import asyncio
import json
import socket

import numpy as np
import pytest
from server_helpers import inside, request, wait_until

from CTSAM3DLib import protocol
from CTSAM3DLib.interface import MaskUpdate
from CTSAM3DLib.remote import RemoteSession, ServerError
from CTSAM3DLib.server.disconnects import ClientGoneError
from CTSAM3DLib.server.previews import PreviewChannel
from CTSAM3DLib.session import InteractiveSession
from standins.networks import CrossPatchThresholdNet, PacedNet

OPTIONS = {"max_patches": 10}


def local(image):
    return InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", **OPTIONS)


def assert_same_updates(remote_updates, local_updates, what):
    assert len(remote_updates) == len(local_updates), what
    for there, here in zip(remote_updates, local_updates):
        assert there.start == here.start, what
        np.testing.assert_array_equal(there.mask, here.mask, err_msg=what)


def session_path(session, action):
    return f"{protocol.API}/sessions/{session.session_id}/{action}"


def test_previews_stream_as_the_mask_grows_and_equal_the_local_sessions(serve, abdomen):
    """A click, a box and a set_clicks that cross-patch prompting carries over two or more levels: the
    remote session shows each preview while the server still works (the paced network waits for it), the
    same MaskUpdates the local session previews, and then the same result."""
    network = PacedNet()
    server = serve(network)
    remote, here = RemoteSession(server.url, abdomen, **OPTIONS), local(abdomen)
    a, b = inside(abdomen, 60, 50, 15), inside(abdomen, 64, 52, 15)
    steps = [
        ("add_click", (a,)),
        ("add_box", ([v - 60 for v in a], [v + 60 for v in a])),
        ("set_clicks", ([(a, True), (b, False)],)),
    ]
    for name, arguments in steps:
        remote_previews, local_previews = [], []

        def shown(update, previews=remote_previews):
            previews.append(update)
            network.seen()

        remote_update = getattr(remote, name)(*arguments, preview=shown)
        local_update = getattr(here, name)(*arguments, preview=local_previews.append)
        assert len(local_previews) >= 2, f"{name} should spread over two levels of neighbours at least"
        assert_same_updates(remote_previews, local_previews, name)
        assert_same_updates([remote_update], [local_update], name)
        np.testing.assert_array_equal(remote.mask_array(), here.mask_array(), err_msg=name)
        assert remote.clicks == here.clicks and remote.patch_count == here.patch_count == 10, name
        if name == "add_box":
            remote.reset()
            here.reset()
    assert remote_previews[0].mask.sum() < remote_previews[-1].mask.sum(), "the previews grow"


def test_without_previews_the_answer_is_unchanged(serve, abdomen):
    """A prompt that does not ask for previews is answered one JSON object, as before; "previews" must be a
    boolean; a click that stays in one patch streams its answer alone."""
    server = serve(CrossPatchThresholdNet())
    remote = RemoteSession(server.url, abdomen, **OPTIONS)
    a = inside(abdomen, 60, 50, 15)
    status, answer = request(server.url, "POST", session_path(remote, "click"), {"point_lps": list(a)})
    assert status == 200 and answer["clicks"] == 1 and answer["patches_open"] == 10
    status, answer = request(server.url, "POST", session_path(remote, "click"),
                             {"point_lps": list(a), "previews": "yes"})
    assert (status, answer["kind"], answer["error"]) == (400, protocol.KIND_BAD_REQUEST,
                                                         "previews must be true or false")
    status, answer = request(server.url, "POST", session_path(remote, "click"),
                             {"point_lps": list(a), "previews": True, "expected_clicks": 5})
    assert status == 409 and answer["kind"] == protocol.KIND_CLICK_COUNT, "a refusal is answered as before"
    one_patch = RemoteSession(server.url, abdomen, cross_patch=False)
    status, body = request(server.url, "POST", session_path(one_patch, "click"),
                           {"point_lps": list(a), "previews": True})
    frames = [protocol.read_frame(line) for line in body.splitlines()]
    assert status == 200 and [kind for kind, _ in frames] == [protocol.FRAME_ANSWER]
    assert frames[0][1]["answer"]["patches_open"] == 1


def _stream_click(port, session, point):
    """Sends a click asking for previews on a raw socket; returns the socket once the first preview arrived."""
    body = json.dumps({"point_lps": list(point), "previews": True, "expected_clicks": 0}).encode()
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(f"POST {session_path(session, 'click')} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                       f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while b'{"preview"' not in received:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection before the first preview"
        received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200") and protocol.STREAM_MEDIA_TYPE in head, head
    return connection


def test_a_client_that_leaves_mid_stream_abandons_its_click_and_the_session_carries_on(serve, abdomen):
    """The client hangs up after the first preview: the click is abandoned at the next preview (the worker
    is not held for it), the session is as before the click, and its client carries on."""
    network = PacedNet()
    server = serve(network)
    remote = RemoteSession(server.url, abdomen, **OPTIONS)
    a = inside(abdomen, 60, 50, 15)
    connection = _stream_click(server.port, remote, a)
    connection.close()
    click_route = f'route="{protocol.API}/sessions/{{session_id}}/click",method="POST",status="200"}} 1'
    wait_until(lambda: click_route in request(server.url, "GET", "/metrics")[1].decode(), 30,
               "the server to notice the client left")
    for _ in range(10):
        network.seen()
    status, answer = request(server.url, "GET", session_path(remote, "mask"))  # queued behind the click
    assert status == 200 and answer["clicks"] == 0 and answer["patches_open"] == 0
    assert not protocol.decode_update(answer["update"], remote.mask_array().shape).mask.any()
    assert network.levels == 1, "the click went on past the first preview after the client left"
    here = local(abdomen)
    np.testing.assert_array_equal(remote.add_click(a).mask, here.add_click(a).mask)
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


class CancelledError(Exception):
    """What the test's preview callback raises to cancel."""


def test_a_preview_that_raises_abandons_the_click_and_the_next_call_is_right(serve, abdomen):
    """Cancelling from the preview callback (what the Slicer effect's Cancel does): the call raises, the
    client's prompts and mask are as before; whether the server finished the click or abandoned it, the
    next call brings it back to the client's prompts first."""
    server = serve(CrossPatchThresholdNet())
    remote, here = RemoteSession(server.url, abdomen, **OPTIONS), local(abdomen)
    a, b = inside(abdomen, 60, 50, 15), inside(abdomen, 64, 52, 15)

    def cancel(update):
        raise CancelledError()

    with pytest.raises(CancelledError):
        remote.add_click(a, preview=cancel)
    assert remote.clicks == [] and not remote.mask_array().any()
    assert_same_updates([remote.set_clicks([(b, True)])], [here.set_clicks([(b, True)])], "after a cancel")
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
    with pytest.raises(CancelledError):
        remote.set_clicks([(b, True), (a, True)], preview=cancel)
    assert remote.clicks == here.clicks
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
    assert_same_updates([remote.add_click(a)], [here.add_click(a)], "the next click")
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


def test_an_error_after_a_preview_reaches_the_client_and_leaves_the_session_as_before(serve, abdomen):
    network = PacedNet(fail_at_level=2)
    server = serve(network)
    remote, here = RemoteSession(server.url, abdomen, **OPTIONS), local(abdomen)
    a = inside(abdomen, 60, 50, 15)
    previews = []

    def shown(update):
        previews.append(update)
        network.seen()

    with pytest.raises(ServerError, match="answered POST .*/click with 500: internal server error") as failure:
        remote.add_click(a, preview=shown)
    assert failure.value.kind == protocol.KIND_INTERNAL and len(previews) == 2, "the error came after two previews"
    assert remote.clicks == [] and not remote.mask_array().any()
    status, answer = request(server.url, "GET", session_path(remote, "mask"))
    assert status == 200 and answer["clicks"] == 0, "the failed click was taken back, the session kept"
    assert_same_updates([remote.add_click(a, preview=shown)], [here.add_click(a)], "the click again")
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


def test_the_server_holds_at_most_one_unsent_preview_and_none_once_the_client_left():
    """The worker never waits for a slow reader: each preview it offers replaces the one not sent yet; once
    the client left, offering one raises (which abandons the click)."""

    async def scenario():
        channel = PreviewChannel()
        updates = [MaskUpdate((n, 0, 0), np.ones((1, 1, n + 1), dtype=np.uint8)) for n in range(3)]
        loop = asyncio.get_running_loop()
        for update in updates:
            await loop.run_in_executor(None, channel.put, update)  # on another thread, as the worker does
        await asyncio.wait_for(channel.ready.wait(), 30)
        assert channel.take() is updates[-1] and channel.take() is None
        channel.leave()
        with pytest.raises(ClientGoneError):
            await loop.run_in_executor(None, channel.put, updates[0])
        assert channel.take() is None

    asyncio.run(scenario())
