"""``ctsam3d serve`` and ``RemoteSession`` over real HTTP on loopback (uvicorn on a thread), with stand-in
networks: the same masks as a local session, and every refusal and fault the protocol promises to handle."""

import http.client
import json
import resource
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from server_helpers import free_port, inside, request, wait_until

from CTSAM3DLib import protocol
from CTSAM3DLib.interface import SessionInputError
from CTSAM3DLib.remote import RemoteSession, ServerError, server_health
from CTSAM3DLib.server.app import BackgroundServer, create_app
from CTSAM3DLib.server.registry import FairQueue, QueueFullError
from CTSAM3DLib.session import InteractiveSession
from standins.networks import CrossPatchThresholdNet, SlowNet, WatchedNet
from standins.payloads import zlib_bomb

TOKEN = "s3cret-token-for-tests"
OTHER_TOKEN = "another-users-token"
OPTIONS = {"max_patches": 3}


def local(image, **options):
    return InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", **{**OPTIONS, **options})


def assert_same_update(remote_update, local_update):
    assert remote_update.start == local_update.start
    np.testing.assert_array_equal(remote_update.mask, local_update.mask)


def session_path(session, action=""):
    return f"{protocol.API}/sessions/{session.session_id}" + (f"/{action}" if action else "")


# ------------------------------------------------------------------------------------------- parity
def test_remote_session_gives_what_a_local_session_gives(serve, abdomen):
    """Click, negative click, undo, set_clicks, box, reset to an initial mask, click: the same update,
    mask, clicks and patch count at every step; the mask carries the image's geometry."""
    server = serve(tokens=[TOKEN])
    remote = RemoteSession(server.url, abdomen, TOKEN, **OPTIONS)
    here = local(abdomen)
    a, b, c = inside(abdomen, 60, 50, 15), inside(abdomen, 64, 52, 15), inside(abdomen, 30, 40, 10)
    start = sitk.Cast(sitk.BinaryThreshold(abdomen, 100, 3000), sitk.sitkUInt8)
    steps = [
        ("add_click", (a,)), ("add_click", (b, False)), ("undo", ()), ("set_clicks", ([(a, True), (c, True)],)),
        ("add_box", ([p - 20 for p in a], [p + 25 for p in a])), ("add_click", (b, False)), ("undo", ()),
        ("reset", (start,)), ("add_click", (c,)),
    ]
    for name, arguments in steps:
        updates = [getattr(session, name)(*arguments) for session in (remote, here)]
        if name != "reset":
            assert_same_update(*updates)
        np.testing.assert_array_equal(remote.mask_array(), here.mask_array(), err_msg=name)
        assert remote.clicks == here.clicks and remote.patch_count == here.patch_count, name
    assert remote.mask_array().sum() > 1000
    assert set(remote.last_timing) == set(here.last_timing)
    mask = remote.mask
    assert (mask.GetSize(), mask.GetOrigin(), mask.GetSpacing(), mask.GetDirection()) == \
        (abdomen.GetSize(), abdomen.GetOrigin(), abdomen.GetSpacing(), abdomen.GetDirection())
    status, health = request(server.url, "GET", "/health", token=TOKEN)
    assert status == 200 and health["sessions"] == 1 and health["queue"] == 0 and health["device"] == "cpu"
    status, metrics = request(server.url, "GET", "/metrics", token=TOKEN)
    text = metrics.decode()
    click_route = f'route="{protocol.API}/sessions/{{session_id}}/click",method="POST"'
    assert f"ctsam3d_request_duration_seconds_count{{{click_route}}} 4" in text
    assert "ctsam3d_sessions_open 1" in text and "ctsam3d_sessions_created_total 1" in text
    assert "ctsam3d_queue_length 0" in text and "process_resident_memory_bytes" in text
    remote.close()
    assert request(server.url, "GET", "/health", token=TOKEN)[1]["sessions"] == 0


def test_a_second_session_on_the_same_image_uploads_nothing(serve, abdomen):
    server = serve()
    with RemoteSession(server.url, abdomen), RemoteSession(server.url, abdomen):
        pass
    _, metrics = request(server.url, "GET", "/metrics")
    assert f'route="{protocol.API}/images/{{digest}}",method="PUT",status="201"}} 1' in metrics.decode()
    assert f'route="{protocol.API}/images/{{digest}}",method="HEAD",status="200"}} 1' in metrics.decode()


def test_the_client_runs_without_torch(serve, abdomen, data_dir):
    server = serve()
    script = (
        "import sys, SimpleITK as sitk\n"
        "from CTSAM3DLib import RemoteSession\n"
        f"image = sitk.ReadImage({str(data_dir / 'abdomen-ct-3mm' / 'ct.nii.gz')!r})\n"
        f"with RemoteSession({server.url!r}, image, max_patches=3) as session:\n"
        f"    session.add_click({list(inside(abdomen, 60, 50, 15))!r})\n"
        "    print(int(session.mask_array().sum()), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    voxels, torch_loaded = result.stdout.split()
    here = local(abdomen)
    here.add_click(inside(abdomen, 60, 50, 15))
    assert int(voxels) == int(here.mask_array().sum()) > 0 and torch_loaded == "False"


# ------------------------------------------------------------------------------------------- access
def test_requests_without_the_right_token_are_refused(serve, abdomen):
    server = serve(tokens=[TOKEN, OTHER_TOKEN])
    for token in (None, "wrong", TOKEN + "x"):
        status, answer = request(server.url, "POST", f"{protocol.API}/sessions", {}, token=token)
        assert status == 401 and answer["kind"] == "unauthorized"
    assert request(server.url, "GET", "/metrics")[0] == 401
    assert request(server.url, "GET", "/health")[0] == 200
    # The connection test of the Slicer module: /health answers anyone, the token is checked too.
    assert server_health(server.url, TOKEN)["status"] == "ok"
    for token in (None, "wrong"):
        with pytest.raises(PermissionError, match="refused"):
            server_health(server.url, token)
    with pytest.raises(PermissionError, match="refused"):
        RemoteSession(server.url, abdomen, "wrong")
    # A session is reachable only with the token that opened it.
    mine = RemoteSession(server.url, abdomen, TOKEN)
    status, answer = request(server.url, "GET", session_path(mine, "mask"), token=OTHER_TOKEN)
    assert status == 404 and answer["kind"] == "unknown_session"
    assert request(server.url, "GET", session_path(mine, "mask"), token=TOKEN)[0] == 200


def test_session_ids_cannot_be_guessed(serve, abdomen):
    server = serve()
    sessions = [RemoteSession(server.url, abdomen) for _ in range(3)]
    ids = [session.session_id for session in sessions]
    assert len(set(ids)) == 3 and all(len(i) >= 32 for i in ids)
    for forged in ("1", "0" * 32, ids[0][:-1] + ("A" if ids[0][-1] != "A" else "B"), "../sessions"):
        status, answer = request(server.url, "POST", f"{protocol.API}/sessions/{forged}/click",
                                 {"point_lps": list(inside(abdomen, 60, 50, 15))})
        assert status == 404, forged
    assert all(len(session.clicks) == 0 for session in sessions)
    assert request(server.url, "GET", session_path(sessions[0], "mask"))[1]["clicks"] == 0


# ------------------------------------------------------------------------------------------- bad requests
def upload_headers(dtype="int16", shape="64,64,64"):
    return {protocol.DTYPE_HEADER: dtype, protocol.SHAPE_HEADER: shape}


def test_malformed_requests_are_refused_with_one_line_errors(serve, abdomen):
    server = serve()
    session = RemoteSession(server.url, abdomen)
    point = list(inside(abdomen, 60, 50, 15))
    array = np.zeros((4, 5, 6), dtype=np.int16)
    digest = protocol.array_digest(array)
    body = zlib.compress(array.tobytes())
    cases = [
        ("POST", session_path(session, "click"), b"{not json", {"Content-Type": "application/json"}, "bad_request"),
        ("POST", session_path(session, "click"), [1, 2, 3], {}, "bad_request"),
        ("POST", session_path(session, "click"), {"point_lps": "60,50,15"}, {}, "bad_request"),
        ("POST", session_path(session, "click"), {"point_lps": point[:2]}, {}, "bad_request"),
        ("POST", session_path(session, "click"), {"point_lps": point, "positive": "yes"}, {}, "bad_request"),
        ("POST", session_path(session, "click"), {"point_lps": point, "expected_clicks": 0.5}, {}, "bad_request"),
        ("POST", session_path(session, "box"), {"corners_lps": [point]}, {}, "bad_request"),
        ("PUT", session_path(session, "clicks"), {"clicks": [point]}, {}, "bad_request"),
        ("POST", f"{protocol.API}/sessions", {"image": "abc"}, {}, "bad_request"),
        ("POST", f"{protocol.API}/sessions", {"image": digest, "origin": [0, 0], "spacing": [1, 1, 1],
                                          "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}, {}, "unknown_image"),
        ("PUT", f"{protocol.API}/images/{digest}", body, upload_headers("complex64", "4,5,6"), "bad_request"),
        ("PUT", f"{protocol.API}/images/{digest}", body, upload_headers("int16", "4,5"), "bad_request"),
        ("PUT", f"{protocol.API}/images/{digest}", body, upload_headers("int16", "4,5,\u00b2"), "bad_request"),
        ("PUT", f"{protocol.API}/images/{digest}", body, upload_headers("int16", "4,5,7"), "bad_request"),
        ("PUT", f"{protocol.API}/images/{digest}", body[:-10], upload_headers("int16", "4,5,6"), "bad_request"),
        ("PUT", f"{protocol.API}/images/{digest}", b"not zlib", upload_headers("int16", "4,5,6"), "bad_request"),
        ("PUT", f"{protocol.API}/images/{digest}", zlib.compress(bytes(240)), upload_headers("uint16", "4,5,6"),
         "bad_request"),
        ("PUT", f"{protocol.API}/images/{'f' * 64}", body, upload_headers("int16", "4,5,6"), "bad_request"),
        ("PUT", f"{protocol.API}/images/not-a-digest", body, upload_headers("int16", "4,5,6"), "bad_request"),
    ]
    for method, path, payload, headers, kind in cases:
        status, answer = request(server.url, method, path, payload, headers)
        expected = 404 if kind == "unknown_image" else 400
        assert status == expected and answer["kind"] == kind, (path, payload, answer)
        assert "\n" not in answer["error"] and answer["error"]
    status, answer = request(server.url, "GET", f"{protocol.API}/nothing-here")
    assert status == 404 and answer["kind"] == "not_found"
    with pytest.raises(SessionInputError, match="at most 256 clicks"):
        session.set_clicks([(point, True)] * 257)
    # The session was not touched, and the right upload is taken.
    assert request(server.url, "GET", session_path(session, "mask"))[1]["clicks"] == 0
    upload = request(server.url, "PUT", f"{protocol.API}/images/{digest}", body, upload_headers("int16", "4,5,6"))
    assert upload[0] == 201
    assert request(server.url, "HEAD", f"{protocol.API}/images/{digest}")[0] == 200


def test_bad_input_reaches_the_client_as_the_local_session_errors(serve, abdomen):
    server = serve()
    session = RemoteSession(server.url, abdomen)
    point = inside(abdomen, 60, 50, 15)
    status, answer = request(server.url, "POST", session_path(session, "click"),
                             {"point_lps": [float("nan"), 0.0, 0.0], "expected_clicks": 0})
    assert status == 400 and answer["kind"] == "input" and "finite" in answer["error"]
    with pytest.raises(SessionInputError, match="finite"):
        session.add_click([float("nan"), point[1], point[2]])
    with pytest.raises(SessionInputError, match="lies outside the image"):
        session.add_click([5000.0, 0.0, 0.0])
    with pytest.raises(SessionInputError, match="flat"):
        session.add_box(point, [point[0], point[1] + 10, point[2] + 10])
    with pytest.raises(IndexError, match="nothing to undo"):
        session.undo()
    with pytest.raises(SessionInputError, match="grid"):
        session.reset(sitk.Image([10, 10, 10], sitk.sitkUInt8))
    with pytest.raises(SessionInputError, match="max_patches"):
        RemoteSession(server.url, abdomen, max_patches=0)
    with pytest.raises(TypeError, match="device"):
        RemoteSession(server.url, abdomen, device="cuda")
    assert session.clicks == [] and session.mask_array().sum() == 0
    session.add_click(point)
    assert len(session.clicks) == 1
    not_ct = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, (40, 40, 40)).astype(np.float32))
    with pytest.warns(UserWarning, match="server: the image's lowest value is .* may not be a CT"):
        RemoteSession(server.url, not_ct)


def headers_only(port, request_line, headers, body=b""):
    """Sends a request's line and headers, and ``body`` (which may be less than they announce), then reads
    the answer: what a client gets when the server refuses before the whole body is sent."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        lines = [f"{request_line} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reply = http.client.HTTPResponse(connection)
        reply.begin()
        return reply.status, json.loads(reply.read())


def test_oversized_bodies_are_refused_before_they_are_read(serve, abdomen):
    server = serve(max_image_bytes=1 << 20)
    digest = "a" * 64
    # The stated array is too large, or its Content-Length: refused from the headers alone, no body sent.
    for headers in (upload_headers("float64", "256,256,256"), upload_headers("int16", "64,64,64")):
        status, answer = headers_only(server.port, f"PUT {protocol.API}/images/{digest}",
                                      {**headers, "Content-Length": str(10 << 20)})
        assert status == 413 and answer["kind"] == "too_large", answer
    # A chunked body states no length: it is cut off once it passes the limit (263 kB here), even when it is
    # a valid stream that inflates to nothing (empty blocks, 5 bytes each).
    empty_blocks = b"x\x9c" + b"\x00\x00\x00\xff\xff" * 60000
    status, answer = headers_only(server.port, f"PUT {protocol.API}/images/{digest}",
                                  {**upload_headers("uint8", "64,64,64"), "Transfer-Encoding": "chunked"},
                                  b"".join(b"%x\r\n" % len(part) + part + b"\r\n" for part in
                                           (empty_blocks[i:i + 65536] for i in range(0, len(empty_blocks), 65536))))
    assert status == 413 and "exceeds" in answer["error"], answer
    status, answer = request(server.url, "POST", f"{protocol.API}/sessions", b"{" + b" " * (2 << 20) + b"}")
    assert status == 413
    big = sitk.Image([128, 128, 40], sitk.sitkFloat32)
    with pytest.raises(SessionInputError, match="at most 1.0 MiB"):
        RemoteSession(server.url, big)
    assert request(server.url, "GET", "/health")[0] == 200


def test_a_compression_bomb_is_refused_without_being_expanded(serve, abdomen):
    server = serve()
    bomb = zlib_bomb(1 << 30)
    assert len(bomb) < 2 << 20
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    status, answer = request(server.url, "PUT", f"{protocol.API}/images/{'b' * 64}", bomb,
                             upload_headers("int16", "128,128,128"))  # states 4 MiB
    elapsed = time.perf_counter() - started
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert status == 413 and "decompresses to more than" in answer["error"]
    assert peak_growth < 200 << 20, f"the server's peak memory grew by {peak_growth >> 20} MiB"
    assert elapsed < 5, "inflating 1 GiB takes seconds; refusing after 4 MiB does not"
    with RemoteSession(server.url, abdomen) as session:
        session.add_click(inside(abdomen, 60, 50, 15))
        assert session.mask_array().sum() > 0


# ------------------------------------------------------------------------------------------- faults
def test_a_diverged_session_is_brought_back_to_the_clients_prompts(serve, abdomen):
    """Another request adds a click behind the client's back (as a retried request whose first answer was
    lost would): the server answers 409 and the client resynchronises, boxes included."""
    server = serve()
    a, b, c = inside(abdomen, 60, 50, 15), inside(abdomen, 64, 52, 15), inside(abdomen, 70, 45, 12)
    box = ([p - 20 for p in a], [p + 25 for p in a])
    for with_box in (False, True):
        remote, here = RemoteSession(server.url, abdomen, **OPTIONS), local(abdomen)
        for session in (remote, here):
            if with_box:
                session.add_box(*box)
            session.add_click(a)
        count = len(remote.clicks)
        status, answer = request(server.url, "POST", session_path(remote, "click"),
                                 {"point_lps": list(c), "positive": False, "expected_clicks": count})
        assert status == 200 and answer["clicks"] == count + 1
        status, answer = request(server.url, "POST", session_path(remote, "click"),
                                 {"point_lps": list(c), "expected_clicks": count})
        assert status == 409 and answer["kind"] == "click_count" and answer["clicks"] == count + 1
        assert_same_update(remote.add_click(b, False), here.add_click(b, False))
        np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
        assert request(server.url, "GET", session_path(remote, "mask"))[1]["clicks"] == count + 1
        assert_same_update(remote.undo(), here.undo())
        np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


def test_the_number_of_sessions_is_bounded(serve, abdomen):
    server = serve(max_sessions=2)
    first, second = RemoteSession(server.url, abdomen), RemoteSession(server.url, abdomen)
    with pytest.raises(ServerError, match="maximum of 2 sessions") as refused:
        RemoteSession(server.url, abdomen)
    assert refused.value.status == 503
    first.close()
    with RemoteSession(server.url, abdomen) as third:
        third.add_click(inside(abdomen, 60, 50, 15))
    second.add_click(inside(abdomen, 60, 50, 15))


def test_idle_sessions_expire_and_their_memory_is_freed(serve, abdomen):
    network = WatchedNet()
    # Long enough that a loaded machine still checks the live session before it expires.
    server = serve(network, idle_timeout_s=3.0, sweep_interval_s=0.05)
    remote, here = RemoteSession(server.url, abdomen, **OPTIONS), local(abdomen)
    for session in (remote, here):
        session.add_click(inside(abdomen, 60, 50, 15))
    assert network.features and all(ref() is not None for ref in network.features)
    wait_until(lambda: request(server.url, "GET", "/health")[1]["sessions"] == 0, timeout_s=30.0, what="expiry")
    assert all(ref() is None for ref in network.features), "an expired session's patches are still held"
    _, metrics = request(server.url, "GET", "/metrics")
    assert "ctsam3d_sessions_expired_total 1" in metrics.decode()
    # The client opens a new session and replays its click without being asked to.
    assert_same_update(remote.add_click(inside(abdomen, 64, 52, 15), False),
                       here.add_click(inside(abdomen, 64, 52, 15), False))
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


def test_a_server_restart_is_survived_transparently(serve, abdomen):
    first = serve()
    remote, here = RemoteSession(first.url, abdomen, **OPTIONS), local(abdomen)
    a = inside(abdomen, 60, 50, 15)
    for session in (remote, here):
        session.add_box([p - 20 for p in a], [p + 25 for p in a])
        session.add_click(inside(abdomen, 64, 52, 15), False)
    first.stop()
    # The click is sent while nothing listens; the client retries until the new server is up.
    answers = []
    clicking = threading.Thread(target=lambda: answers.append(remote.add_click(inside(abdomen, 40, 45, 12))))
    clicking.start()
    time.sleep(0.3)
    second = serve(port=first.port)
    clicking.join(30)
    assert answers, "the click did not come back"
    assert_same_update(answers[0], here.add_click(inside(abdomen, 40, 45, 12)))
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
    assert remote.clicks == here.clicks
    assert request(second.url, "GET", session_path(remote, "mask"))[1]["clicks"] == 3


def test_an_unreachable_server_raises_a_connection_error_naming_it(abdomen):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"cannot reach the CT-SAM3D server at {url}"):
        RemoteSession(url, abdomen, retries=2)
    assert time.perf_counter() - started < 5


def test_a_client_that_disconnects_mid_click_leaves_the_session_consistent(serve, abdomen):
    network = SlowNet(decode_s=0.4)
    server = serve(network)
    remote = RemoteSession(server.url, abdomen, **OPTIONS)
    a, b = inside(abdomen, 60, 50, 15), inside(abdomen, 64, 52, 15)
    remote.add_click(a)
    network.started.clear()
    body = json.dumps({"point_lps": list(b), "positive": False, "expected_clicks": 1}).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(f"POST {session_path(remote, 'click')} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                       f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert network.started.wait(10)
    connection.close()
    status, answer = request(server.url, "GET", session_path(remote, "mask"))  # queued behind the click
    assert status == 200 and answer["clicks"] in (1, 2)
    here = local(abdomen)
    here.set_clicks([(a, True), (b, False)][:answer["clicks"]])
    np.testing.assert_array_equal(protocol.decode_update(answer["update"], here.mask_array().shape).mask,
                                  here.mask_array())
    # The client, which never saw that click, carries on from its own prompts.
    here.set_clicks([(a, True)])
    assert_same_update(remote.add_click(b), here.add_click(b))
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


def test_cookies_from_a_load_balancer_are_kept(abdomen):
    app = create_app(CrossPatchThresholdNet(), device="cpu")
    seen = []

    @app.middleware("http")
    async def affinity(request, call_next):
        seen.append(request.cookies.get("replica"))
        response = await call_next(request)
        response.set_cookie("replica", "r1")
        return response

    with BackgroundServer(app) as server, RemoteSession(server.url, abdomen) as session:
        session.add_click(inside(abdomen, 60, 50, 15))
    assert seen[0] is None and len(seen) > 3 and all(value == "r1" for value in seen[1:])


# ------------------------------------------------------------------------------------------- fairness
def test_one_sessions_burst_does_not_starve_another(serve, abdomen):
    network = SlowNet(decode_s=0.25)
    server = serve(network)
    point = inside(abdomen, 60, 50, 15)
    busy, other = RemoteSession(server.url, abdomen, cross_patch=False), \
        RemoteSession(server.url, abdomen, cross_patch=False)
    for session in (busy, other):
        session.add_click(point)
    finished = []

    def click(session, label):
        request(server.url, "POST", session_path(session, "click"), {"point_lps": list(point)})
        finished.append(label)

    burst = [threading.Thread(target=click, args=(busy, "busy")) for _ in range(6)]
    for thread in burst:
        thread.start()
    wait_until(lambda: request(server.url, "GET", "/health")[1]["queue"] == 5, what="the burst to queue")
    click(other, "other")
    for thread in burst:
        thread.join(30)
    ahead = finished.index("other")
    # Served in turn: at most the burst's running click (and one that might start as "other" arrives)
    # comes first; first come, first served would put all six ahead.
    assert ahead <= 2, finished
    assert finished.count("busy") == 6


def test_the_fair_queue_takes_keys_in_turn_and_each_key_in_order():
    ran = []
    gate = threading.Event()
    queue = FairQueue(max_pending_per_key=4, tick_s=60, on_tick=lambda: None)
    first = queue.submit("a", gate.wait)
    futures = [queue.submit(key, lambda key=key, n=n: ran.append(f"{key}{n}")) for key, n in
               [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("b", 2)]]
    with pytest.raises(QueueFullError):
        queue.submit("a", lambda: None)
    cancelled = queue.submit("c", lambda: ran.append("never"))
    assert cancelled.cancel()
    queue.start()
    gate.set()
    for future in [first, *futures]:
        future.result(10)
    queue.stop()
    assert ran == ["b1", "c1", "a1", "b2", "a2", "a3"]


def test_the_local_and_the_remote_session_are_both_segmenters(serve, abdomen):
    """Callers (the command line, the Slicer logic, the evaluation) type against ``Segmenter``: both sessions
    offer each of its members, with its parameters first, in its order."""
    import inspect

    from CTSAM3DLib.interface import Segmenter

    server = serve()
    remote = RemoteSession(server.url, abdomen)
    here = local(abdomen)
    assert isinstance(remote, Segmenter) and isinstance(here, Segmenter)
    for cls in (InteractiveSession, RemoteSession):
        for name in ("add_click", "add_box", "undo", "set_clicks", "reset", "mask_array"):
            wanted = list(inspect.signature(getattr(Segmenter, name)).parameters)
            offered = list(inspect.signature(getattr(cls, name)).parameters)
            assert offered[:len(wanted)] == wanted, (cls.__name__, name, offered)
    remote.close()
