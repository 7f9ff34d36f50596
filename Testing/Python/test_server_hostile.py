"""``ctsam3d serve`` under hostile and careless clients (the attacks of ../shared/research/server-attack.md,
scaled down): every request's work and memory bounded, nobody locked out, bad input a 4xx."""

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from server_helpers import inside, request, wait_until

from CTSAM3DLib import protocol
from CTSAM3DLib.interface import SessionInputError
from CTSAM3DLib.remote import RemoteSession, ServerError
from CTSAM3DLib.session import InteractiveSession
from standins.networks import CrossPatchThresholdNet, SlowNet
from standins.payloads import zlib_bomb

IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def digest_of(image):
    return protocol.array_digest(sitk.GetArrayViewFromImage(image))


def open_body(image, **changes):
    body = {"image": digest_of(image), "origin": list(image.GetOrigin()), "spacing": list(image.GetSpacing()),
            "direction": list(image.GetDirection())}
    return {**body, **changes}


# ------------------------------------------------------------------------------------------- work per request
def test_max_patches_is_capped_by_the_server(serve, abdomen):
    """One click with max_patches 10**9 held the worker 447 s: the server caps the option (--max-patches)."""
    server = serve()
    RemoteSession(server.url, abdomen).close()  # uploads the image
    status, answer = request(server.url, "POST", f"{protocol.API}/sessions",
                             open_body(abdomen, options={"max_patches": 10**9}))
    assert status == 400 and answer["kind"] == "input" and "at most 64" in answer["error"], answer
    small = serve(max_patches=4)
    with pytest.raises(SessionInputError, match="max_patches is at most 4 on this server"):
        RemoteSession(small.url, abdomen, max_patches=5)
    with RemoteSession(small.url, abdomen, max_patches=4) as session:
        session.add_click(inside(abdomen, 60, 50, 15))
        assert session.patch_count >= 1


def test_set_clicks_adds_a_bounded_number_of_clicks_per_request(serve, abdomen):
    """64 scattered clicks in one PUT held the worker 75 s: the server adds a few per request, the client
    sends the rest, and the result is the local session's."""
    server = serve()
    rng = np.random.default_rng(3)
    points = [inside(abdomen, *xyz) for xyz in rng.uniform([10, 10, 3], [110, 90, 27], size=(20, 3))]
    clicks = [(point, bool(n % 3)) for n, point in enumerate(points)]
    remote = RemoteSession(server.url, abdomen, cross_patch=False)
    status, answer = request(server.url, "PUT", f"{protocol.API}/sessions/{remote.session_id}/clicks",
                             {"clicks": [[list(point), positive] for point, positive in clicks]})
    assert status == 200 and answer["clicks"] == 8, answer
    remote.close()

    remote = RemoteSession(server.url, abdomen, cross_patch=False)
    here = InteractiveSession(CrossPatchThresholdNet(), abdomen, device="cpu", cross_patch=False)
    remote_update, local_update = remote.set_clicks(clicks), here.set_clicks(clicks)
    assert remote_update.start == local_update.start
    np.testing.assert_array_equal(remote_update.mask, local_update.mask)
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
    assert remote.clicks == here.clicks and len(remote.clicks) == 20
    # Back to a prefix, then the whole list again: still the local session's.
    for wanted in (clicks[:3], clicks):
        remote.set_clicks(wanted), here.set_clicks(wanted)
        np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
    assert request(server.url, "GET", f"{protocol.API}/sessions/{remote.session_id}/mask")[1]["clicks"] == 20


def test_a_patch_covering_too_many_source_voxels_is_refused_at_open(serve, abdomen):
    """A tiny spacing makes one 96 mm patch cover the whole (up to 1 GiB) image, and one click's rendering
    take 38 bytes per voxel: refused when the session opens, before any work."""
    server = serve(max_patch_source_voxels=100_000)
    fine = sitk.Image(abdomen)
    fine.SetSpacing([0.2, 0.2, 0.2])
    with pytest.raises(SessionInputError, match="one 96 mm patch covers 369660 voxels of the image; this server "
                                                "takes at most 100000: resample the image to a coarser spacing"):
        RemoteSession(server.url, fine)
    with RemoteSession(server.url, abdomen) as session:  # 3 mm: 34 x 34 x 30 voxels per patch
        session.add_click(inside(abdomen, 60, 50, 15))
        assert session.mask_array().sum() > 0


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("changes", "message"), [
    ({"spacing": [1e-300] * 3}, "spacing must lie between 0.001 and 1000 mm"),
    ({"spacing": [1e300] * 3}, "spacing must lie between 0.001 and 1000 mm"),
    ({"origin": [1e308] * 3}, "origin must lie within 1e+06 mm of zero"),
    ({"direction": [100.0, 0, 0, 0, 100.0, 0, 0, 0, 100.0]}, "direction must be an orthonormal 3x3 matrix"),
    ({"direction": [1.0, 0.5, 0, 0, 1.0, 0, 0, 0, 1.0]}, "direction must be an orthonormal 3x3 matrix"),
])
def test_an_unphysical_geometry_is_refused_with_400(serve, abdomen, changes, message):
    """Spacing 1e-300 gave 500 at open; 1e300 gave 500 at the first click, after which the session kept the
    failed click and undo failed too; a scaled or sheared direction was taken silently."""
    server = serve()
    RemoteSession(server.url, abdomen).close()
    status, answer = request(server.url, "POST", f"{protocol.API}/sessions", open_body(abdomen, **changes))
    assert status == 400 and answer["kind"] == "bad_request" and message in answer["error"], answer
    rotated = open_body(abdomen, direction=[0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert request(server.url, "POST", f"{protocol.API}/sessions", rotated)[0] == 201


def test_deeply_nested_json_is_a_400_not_a_500(serve):
    server = serve()
    for body in (b"[" * 100_000, b'{"image": ' + b"[" * 50_000 + b"}"):
        status, answer = request(server.url, "POST", f"{protocol.API}/sessions", body,
                                 {"Content-Type": "application/json"})
        assert status == 400 and answer["kind"] == "bad_request" and "nested too deeply" in answer["error"], answer


# ------------------------------------------------------------------------------------------- memory budget
def raw_socket(port, head, body=b""):
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(head.encode() + body)
    return connection


def answer_of(connection):
    reply = http.client.HTTPResponse(connection)
    reply.begin()
    return reply.status, reply.headers, json.loads(reply.read())


@pytest.mark.parametrize(("method", "path"), [
    ("POST", f"{protocol.API}/sessions"), ("POST", f"{protocol.API}/sessions/{'d' * 32}/click"),
    ("PUT", f"{protocol.API}/sessions/{'d' * 32}/clicks"), ("PUT", f"{protocol.API}/images/{'c' * 64}"),
])
def test_a_request_without_a_valid_token_is_refused_before_its_body_is_read(serve, method, path):
    """The declared request bodies are read by the route's dependency only after the token is checked: a
    client that states a 512 KiB body and sends none of it gets its 401 at once."""
    server = serve(tokens=["secret"])
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{protocol.DTYPE_HEADER}: uint8\r\n{protocol.SHAPE_HEADER}: 64,64,64\r\n"
            f"Authorization: Bearer wrong\r\nContent-Length: {512 << 10}\r\n\r\n")
    connection = raw_socket(server.port, head)
    status, headers, answer = answer_of(connection)
    connection.close()
    assert status == 401 and answer["kind"] == "unauthorized" and headers["WWW-Authenticate"] == "Bearer", answer


def test_a_json_body_is_bounded_while_it_streams_in(serve):
    """A chunked body states no length: the declared request models get it from the bounded reader, which
    refuses it (413) once it passes 1 MiB, long before the client has sent it all."""
    server = serve()
    head = (f"POST {protocol.API}/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * (256 << 10)
    connection = raw_socket(server.port, head)
    try:
        for _ in range(5):
            connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, answer = answer_of(connection)
    finally:
        connection.close()
    assert status == 413 and answer["kind"] == "too_large" and "exceeds the 1048576 bytes" in answer["error"], answer


def test_uploads_beyond_the_memory_budget_are_refused_before_their_body_is_read(serve):
    """Three 1 MB zlib bodies stating 1 GiB each took 5.2 GB at once (and 40 could run): an upload reserves its
    array's bytes in the budget from its headers, so the next one that does not fit gets 503 and Retry-After
    at once, without a byte of its body read."""
    server = serve(max_memory_bytes=100 << 20, max_image_bytes=256 << 20)
    stated = 64 << 20
    bomb = zlib_bomb(stated, chunk_bytes=1 << 20)
    head = (f"PUT {protocol.API}/images/{'c' * 64} HTTP/1.1\r\nHost: 127.0.0.1\r\n{protocol.DTYPE_HEADER}: uint8\r\n"
            f"{protocol.SHAPE_HEADER}: 64,1024,1024\r\nContent-Length: {len(bomb)}\r\n\r\n")
    slow = raw_socket(server.port, head, bomb[:1000])  # holds its reservation while it trickles
    wait_until(lambda: request(server.url, "GET", "/health")[1]["memory"]["reserved_bytes"] >= stated,
               what="the first upload's reservation")
    refused = raw_socket(server.port, head)
    status, headers, answer = answer_of(refused)
    refused.close()
    assert status == 503 and answer["kind"] == "busy" and "memory budget (100 MiB" in answer["error"], answer
    assert headers["Retry-After"] == "10"
    slow.sendall(bomb[1000:])
    status, _, answer = answer_of(slow)
    assert status == 400 and "SHA-256" in answer["error"], answer  # inflated to its end, digest checked
    slow.close()
    assert request(server.url, "GET", "/health")[1]["memory"]["reserved_bytes"] == 0
    connection = raw_socket(server.port, head, bomb)  # the budget is free again
    assert answer_of(connection)[0] == 400
    connection.close()
    # An array that could never fit is too large, not a reason to come back later.
    too_large = raw_socket(server.port, head.replace("64,1024,1024", "128,1024,1024"))
    status, _, answer = answer_of(too_large)
    too_large.close()
    assert status == 413 and "more than this server's whole memory budget (100.0 MiB" in answer["error"], answer


def test_sessions_share_the_uploaded_image_and_are_bounded_by_the_budget(serve, abdomen):
    """Each session copied the image (+1 GiB per session on a 512 MiB image, 64 GiB from one token): sessions
    on one upload and geometry share one read-only image, hold only their masks, and a session that the
    budget cannot take is refused (503) when it opens."""
    voxels = int(np.prod(abdomen.GetSize()))
    image_bytes = 2 * voxels  # int16
    server = serve(max_memory_bytes=int(4.5 * image_bytes))
    state = server.app.state.server
    sessions = [RemoteSession(server.url, abdomen, cross_patch=False)]
    reserved = [state.budget.used_bytes]
    assert reserved[0] == image_bytes + image_bytes + 2 * voxels  # cached upload, shared image, masks
    with pytest.raises(ServerError, match="memory budget") as refused:
        while len(sessions) < 4:
            sessions.append(RemoteSession(server.url, abdomen, cross_patch=False))
            reserved.append(state.budget.used_bytes)
    assert refused.value.status == 503
    assert len(state.session_images) == 1
    # The second session took its masks only; the third fitted once the cached upload (which no session
    # needs) was dropped.
    assert len(sessions) == 3 and reserved[1] - reserved[0] == 2 * voxels
    assert reserved[2] == image_bytes + 3 * 2 * voxels <= state.budget.limit_bytes
    assert request(server.url, "HEAD", f"{protocol.API}/images/{digest_of(abdomen)}")[0] == 404
    for session in sessions:
        session.close()
    assert state.budget.used_bytes == 0 and len(state.session_images) == 0


def test_a_click_whose_work_the_budget_cannot_take_is_refused_and_changes_nothing(serve, abdomen):
    server = serve(max_memory_bytes=8 << 20)  # the session fits; a click's patches (32 MiB estimated) do not
    session = RemoteSession(server.url, abdomen, cross_patch=False)
    with pytest.raises(ServerError, match="memory budget .* cannot take the work of this click") as refused:
        session.add_click(inside(abdomen, 60, 50, 15))
    assert refused.value.status == 503
    status, answer = request(server.url, "GET", f"{protocol.API}/sessions/{session.session_id}/mask")
    assert status == 200 and answer["clicks"] == 0 and answer["patches_open"] == 0
    assert session.clicks == [] and session.mask_array().sum() == 0
    with pytest.raises(IndexError):
        session.undo()


# ------------------------------------------------------------------------------------------- nobody locked out
ATTACKER, HONEST = "attacker-token-0123456789", "honest-user-token-0123456789"


def test_the_worker_is_shared_per_token_before_per_session(serve, abdomen):
    """One token with 8 sessions x 4 queued clicks made an honest click wait for 8 jobs (9.7 s): turns go
    round the tokens first, so the honest click waits for at most the attacker's running job and one more."""
    network = SlowNet(decode_s=0.1)
    server = serve(network, tokens=[ATTACKER, HONEST], max_sessions_per_token=8)
    point = inside(abdomen, 60, 50, 15)
    attackers = [RemoteSession(server.url, abdomen, ATTACKER, cross_patch=False) for _ in range(4)]
    honest = RemoteSession(server.url, abdomen, HONEST, cross_patch=False)
    finished = []

    def click(session, token, label):
        status, _ = request(server.url, "POST", f"{protocol.API}/sessions/{session.session_id}/click",
                            {"point_lps": list(point)}, token=token)
        finished.append((label, status))

    flood = [threading.Thread(target=click, args=(session, ATTACKER, "attacker")) for session in attackers
             for _ in range(3)]
    for thread in flood:
        thread.start()
    wait_until(lambda: request(server.url, "GET", "/health", token=HONEST)[1]["queue"] >= 11, what="the flood")
    click(honest, HONEST, "honest")
    for thread in flood:
        thread.join(60)
    assert all(status == 200 for _, status in finished) and len(finished) == 13
    ahead = [label for label, _ in finished].index("honest")
    assert ahead <= 2, finished  # per session it would wait behind one click of each of the 4 sessions


def test_one_token_cannot_take_every_session(serve, abdomen):
    """One token opened all 32 sessions in 0.3 s and everybody else got 503: each token has a quota."""
    server = serve(tokens=[ATTACKER, HONEST], max_sessions=8)  # default quota: a quarter, 2 sessions
    mine = [RemoteSession(server.url, abdomen, ATTACKER) for _ in range(2)]
    with pytest.raises(ServerError, match="this token holds its maximum of 2 sessions") as refused:
        RemoteSession(server.url, abdomen, ATTACKER)
    assert refused.value.status == 503
    with RemoteSession(server.url, abdomen, HONEST) as honest:
        honest.add_click(inside(abdomen, 60, 50, 15))
    mine[0].close()
    RemoteSession(server.url, abdomen, ATTACKER).close()


def test_only_successful_requests_keep_a_session_alive(serve, abdomen):
    """Any request, even a refused one, renewed the idle timer: one cheap 409 per session per half hour held
    every place forever."""
    server = serve(idle_timeout_s=0.6, sweep_interval_s=0.05)
    session = RemoteSession(server.url, abdomen)
    stale = {"point_lps": list(inside(abdomen, 60, 50, 15)), "expected_clicks": 99}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, answer = request(server.url, "POST", f"{protocol.API}/sessions/{session.session_id}/click", stale)
        if status == 404:
            break
        assert status == 409, answer
        time.sleep(0.05)
    assert status == 404 and request(server.url, "GET", "/health")[1]["sessions"] == 0


def send_and_hang_up(port, method, path, payload):
    body = json.dumps(payload).encode()
    connection = raw_socket(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n", body)
    connection.close()


def test_work_of_clients_that_hung_up_is_dropped(serve, abdomen):
    """10 clicks whose clients had all hung up still ran: queued work is cancelled when its client leaves,
    and a session opened for a client that left is closed."""
    network = SlowNet(decode_s=1.0)
    server = serve(network)
    busy = RemoteSession(server.url, abdomen, cross_patch=False)
    other = RemoteSession(server.url, abdomen, cross_patch=False)
    network.started.clear()
    running = threading.Thread(target=busy.add_click, args=(inside(abdomen, 60, 50, 15),))
    running.start()
    assert network.started.wait(10)
    for _ in range(3):
        send_and_hang_up(server.port, "POST", f"{protocol.API}/sessions/{other.session_id}/click",
                         {"point_lps": list(inside(abdomen, 40, 50, 15))})
    send_and_hang_up(server.port, "POST", f"{protocol.API}/sessions", open_body(abdomen))
    wait_until(lambda: request(server.url, "GET", "/health")[1]["queue"] == 0, what="the queue to empty")
    running.join(30)
    status, answer = request(server.url, "GET", f"{protocol.API}/sessions/{other.session_id}/mask")
    assert status == 200 and answer["clicks"] == 0
    assert request(server.url, "GET", "/health")[1]["sessions"] == 2


# ------------------------------------------------------------------------------------------- connections
def closed_by_server(connection, within_s=20.0):
    """Whether the server closes the connection (nothing more is sent by the client) within ``within_s``."""
    connection.settimeout(within_s)
    try:
        return connection.recv(1024) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_slow_and_surplus_connections_are_closed(serve, abdomen):
    """20,000 connections trickling header bytes (no token needed) exhausted the file descriptors: headers
    and bodies have deadlines, and connections past the limit are closed at once."""
    from CTSAM3DLib.server.bounds import ConnectionLimits

    limits = ConnectionLimits(max_connections=8, header_timeout_s=1.0, body_timeout_s=1.0)
    server = serve(limits=limits)
    trickling = [raw_socket(server.port, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ") for _ in range(12)]
    body = raw_socket(server.port, f"POST {protocol.API}/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                   "application/json\r\nContent-Length: 100\r\n\r\n", b"{")
    assert all(closed_by_server(connection) for connection in [*trickling, body])
    for connection in [*trickling, body]:
        connection.close()
    with RemoteSession(server.url, abdomen) as session:
        session.add_click(inside(abdomen, 60, 50, 15))


def test_metrics_name_only_known_methods(serve):
    """Made-up methods, with no token, each became a metrics label: 213 MB of /metrics after 100k requests."""
    server = serve(tokens=[HONEST])
    for n in range(30):
        connection = raw_socket(server.port, f"XMETHOD{n} /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer_of(connection)[0] == 405
        connection.close()
    text = request(server.url, "GET", "/metrics", token=HONEST)[1].decode()
    assert "XMETHOD" not in text
    assert 'ctsam3d_requests_total{route="/health",method="other",status="405"} 30' in text


# ------------------------------------------------------------------------------------------- hygiene
def test_health_without_a_token_says_only_that_the_server_is_up(serve):
    """/health showed anyone the weights' name and SHA-256, the version and the activity."""
    server = serve(tokens=[HONEST], model_info={"weights": "params.pth", "sha256": "f" * 64})
    for token in (None, "wrong"):
        assert request(server.url, "GET", "/health", token=token) == (200, {"status": "ok"})
    status, health = request(server.url, "GET", "/health", token=HONEST)
    assert status == 200 and health["model"]["sha256"] == "f" * 64 and health["sessions"] == 0


def test_a_server_without_tokens_refuses_other_sites_pages(serve, abdomen):
    """With no token, a page in the operator's browser could drive the server: a text/plain POST (no CORS
    preflight) and a DNS-rebinding host name were taken."""
    server = serve()
    RemoteSession(server.url, abdomen).close()
    body = json.dumps(open_body(abdomen)).encode()
    cases = [({"Host": "evil.example:8000", "Content-Type": "application/json"}, 403, "loopback host only"),
             ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403, "no requests from web"),
             ({"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
             ({"Origin": "http://localhost:3000", "Content-Type": "application/json"}, 201, ""),
             ({"Host": "[::1]:8000", "Content-Type": "application/json"}, 201, "")]
    for headers, expected, message in cases:
        status, answer = request(server.url, "POST", f"{protocol.API}/sessions", body, headers)
        assert status == expected and message in answer.get("error", ""), (headers, answer)
    assert request(server.url, "GET", "/metrics", headers={"Host": "rebound.example"})[0] == 403


def test_a_client_outlives_a_server_restart_of_several_seconds(serve, abdomen):
    """RemoteSession gave up after 3.75 s, and a restart takes 5 to 8 s (loading the network)."""
    first = serve()
    remote = RemoteSession(first.url, abdomen, cross_patch=False)
    remote.add_click(inside(abdomen, 60, 50, 15))
    first.stop()
    restarted = threading.Timer(6.0, lambda: serve(port=first.port))
    restarted.start()
    remote.add_click(inside(abdomen, 64, 52, 15), False)
    restarted.join()
    here = InteractiveSession(CrossPatchThresholdNet(), abdomen, device="cpu", cross_patch=False)
    here.set_clicks([(inside(abdomen, 60, 50, 15), True), (inside(abdomen, 64, 52, 15), False)])
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())


def test_a_failed_request_never_leaves_a_session_wedged(serve, abdomen, monkeypatch):
    """Spacing 1e300 made a click fail after the network ran: the click stayed in the session's history and
    every later request, undo included, failed. A click that fails now leaves the session exactly as it was
    (its rendering is part of its rollback); a set_clicks that fails half way, after applying some clicks,
    leaves the session changed, so it is closed and the client opens a new one and replays its prompts."""
    server = serve()
    remote = RemoteSession(server.url, abdomen, cross_patch=False)
    first, second, third = inside(abdomen, 60, 50, 15), inside(abdomen, 30, 40, 10), inside(abdomen, 90, 60, 15)
    remote.add_click(first)
    here = InteractiveSession(CrossPatchThresholdNet(), abdomen, device="cpu", cross_patch=False)
    here.add_click(first)
    render = InteractiveSession._render_into_mask
    renders = {"done": 0, "failing": 1}

    def render_failing(session, regions):
        """The ``failing``-th rendering from now fails."""
        renders["done"] += 1
        if renders["done"] == renders["failing"]:
            raise RuntimeError("rendering failed")
        return render(session, regions)

    monkeypatch.setattr(InteractiveSession, "_render_into_mask", render_failing)
    with pytest.raises(ServerError) as failed:
        remote.add_click(second)
    assert failed.value.status == 500
    status, answer = request(server.url, "GET", f"{protocol.API}/sessions/{remote.session_id}/mask")
    assert status == 200 and answer["clicks"] == 1, answer  # exactly as before the failed click
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())

    session_id = remote.session_id
    renders.update(done=0, failing=2)
    with pytest.raises(ServerError):
        remote.set_clicks([(first, True), (second, True), (third, True)])  # the third click's rendering fails
    status, _ = request(server.url, "GET", f"{protocol.API}/sessions/{session_id}/mask")
    assert status == 404  # not a session holding clicks its client was told failed
    monkeypatch.setattr(InteractiveSession, "_render_into_mask", render)
    remote.add_click(second)
    here.add_click(second)
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
    remote.undo()
    here.undo()
    np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
