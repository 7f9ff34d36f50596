"""The commands around the server: ``ctsam3d serve`` (a real process with the real network on seeded random
weights, parity with a local session), its refusals, and ``segment``/``evaluate`` with ``--server``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO_ROOT
from server_helpers import free_port, request

from CTSAM3DLib.cli import main
from CTSAM3DLib.commands.serve import is_loopback
from CTSAM3DLib.files import sha256_of
from CTSAM3DLib.remote import RemoteSession
from CTSAM3DLib.server.app import BackgroundServer, create_app
from CTSAM3DLib.session import InteractiveSession
from standins.networks import CrossPatchThresholdNet

TOKEN = "token-of-the-commands-tests"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# users\n{TOKEN}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def ct_path(data_dir):
    return data_dir / "abdomen-ct-3mm" / "ct.nii.gz"


def lps(image, x, y, z):
    return image.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)])


def test_serve_answers_with_the_real_network_as_a_local_session_does(random_weights, token_file, ct_path):
    """A real ``ctsam3d serve`` process on loopback with CT-SAM3D (cross-patch off, to stay quick): the same
    updates as the same weights here, and a clean stop on Ctrl-C."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "CTSAM3DLib.cli", "serve", "--weights", str(random_weights), "--port", str(port),
         "--device", "cpu", "--token-file", str(token_file)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        from CTSAM3DLib import load_checkpoint

        image = sitk.ReadImage(str(ct_path))
        here = InteractiveSession(load_checkpoint(random_weights, device="cpu"), image, device="cpu",
                                  cross_patch=False)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()
            try:
                status, health = request(url, "GET", "/health", token=TOKEN)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "ctsam3d serve did not start"
                time.sleep(0.2)
        assert health["model"]["sha256"] == sha256_of(random_weights) and health["precision"] == here.precision
        with RemoteSession(url, image, TOKEN, cross_patch=False) as remote:
            for method, arguments in [("add_click", (lps(image, 60, 50, 15),)),
                                      ("add_click", (lps(image, 66, 52, 15), False)), ("undo", ())]:
                remote_update, local_update = (getattr(s, method)(*arguments) for s in (remote, here))
                assert remote_update.start == local_update.start, method
                np.testing.assert_array_equal(remote_update.mask, local_update.mask, err_msg=method)
            np.testing.assert_array_equal(remote.mask_array(), here.mask_array())
            assert remote.precision == here.precision and remote.patch_count == here.patch_count == 1
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"serving on http://127.0.0.1:{port}" in out and "bearer token required" in out


def test_serve_refuses_to_listen_beyond_loopback_without_tokens(tmp_path, capsys):
    assert main(["serve", "--weights", str(tmp_path / "none.pth"), "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert "--host 0.0.0.0 lets other machines in: give --token-file" in error and len(error.splitlines()) == 1
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "gpu-host")] == [False] * 4
    empty = tmp_path / "empty.txt"
    empty.write_text("# no token yet\n\n")
    assert main(["serve", "--weights", str(tmp_path / "none.pth"), "--token-file", str(empty)]) == 2
    assert "holds no token" in capsys.readouterr().err


def test_serve_without_the_server_extra_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--weights", str(tmp_path / "none.pth")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ctsam3d serve: error: ctsam3d serve needs FastAPI and uvicorn, and fastapi cannot")
    assert error.endswith('pip install "ctsam3d[server]"') and "\n" not in error


@pytest.fixture
def server():
    with BackgroundServer(create_app(CrossPatchThresholdNet(), device="cpu", tokens=[TOKEN],
                                     model_info={"sha256": "f" * 64})) as running:
        yield running


def test_segment_runs_on_a_server(server, token_file, ct_path, tmp_path, capsys):
    image = sitk.ReadImage(str(ct_path))
    positive, negative = lps(image, 60, 50, 15), lps(image, 64, 52, 15)
    output = tmp_path / "mask.nii.gz"
    code = main(["segment", "--image", str(ct_path), "--server", server.url, "--token-file", str(token_file),
                 "--point", ",".join(map(str, positive)), "--negative", ",".join(map(str, negative)),
                 "--max-patches", "3", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"opened a session on {server.url}" in printed and "click 2 (-)" in printed
    here = InteractiveSession(CrossPatchThresholdNet(), image, device="cpu", max_patches=3)
    here.set_clicks([(positive, True), (negative, False)])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output))), here.mask_array())
    assert request(server.url, "GET", "/health", token=TOKEN)[1]["sessions"] == 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--weights", "w.pth"], "--weights and --server exclude each other"),
    (["--probability", "p.nii.gz"], "--probability cannot be used with --server"),
    (["--device", "cuda"], "--device cannot be used with --server"),
    (["--token-file", "WRONG"], "refused the request: its bearer token is missing or not one the server accepts"),
])
def test_segment_on_a_server_refuses_what_only_a_local_run_can_do(server, ct_path, tmp_path, capsys, extra, message):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-token\n")
    extra = [str(wrong) if value == "WRONG" else value for value in extra]
    code = main(["segment", "--image", str(ct_path), "--server", server.url, "--point", "0,0,0",
                 "--output", str(tmp_path / "o.nii.gz"), *extra])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "o.nii.gz").exists()


def test_evaluate_runs_on_a_server_and_closes_its_sessions(server, token_file, data_dir, tmp_path, capsys):
    output = tmp_path / "evaluation"
    code = main(["evaluate", "--server", server.url, "--token-file", str(token_file), "--data",
                 str(data_dir / "abdomen-ct-3mm"), "--structures", "gallbladder", "--clicks", "2", "--methods",
                 "model", "--max-patches", "2", "--no-progress", "--gallery", "0", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((output / "run.json").read_text())["model"]
    assert settings == {"server": server.url, "sha256": "f" * 64, "session": {"cross_patch": True, "max_patches": 2}}
    assert "evaluated 1" in capsys.readouterr().out
    _, metrics = request(server.url, "GET", "/metrics", token=TOKEN)
    assert "ctsam3d_sessions_closed_total 1" in metrics.decode() and "ctsam3d_sessions_open 0" in metrics.decode()
    assert os.path.isfile(output / "masks" / "model" / "abdomen-ct-3mm" / "gallbladder.nii.gz")


def test_serve_refuses_short_tokens_beyond_loopback(tmp_path, capsys):
    weak = tmp_path / "weak.txt"
    weak.write_text("a\n" + "x" * 40 + "\n")
    weak.chmod(0o600)
    assert main(["serve", "--weights", str(tmp_path / "none.pth"), "--host", "0.0.0.0", "--token-file", str(weak)]) == 2
    error = capsys.readouterr().err
    assert "holds 1 token(s) shorter than 22 characters (128 bits)" in error and "token_urlsafe(32)" in error


def test_serve_stops_within_its_shutdown_timeout_and_rate_limits_its_log(random_weights, token_file):
    """SIGTERM while a client trickled a body: the process never exited. And a flood of bad requests (or of
    failed accepts) logged a line each: 327 MB of log in 45 s."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "CTSAM3DLib.cli", "serve", "--weights", str(random_weights), "--port", str(port),
         "--device", "cpu", "--token-file", str(token_file), "--shutdown-timeout", "1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()
            try:
                request(f"http://127.0.0.1:{port}", "GET", "/health")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "ctsam3d serve did not start"
                time.sleep(0.2)
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port)) as garbage:
                garbage.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                garbage.recv(1024)
        trickling = socket.create_connection(("127.0.0.1", port))
        trickling.sendall(f"PUT /v1/images/{'a' * 64} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                          "X-Array-Dtype: uint8\r\nX-Array-Shape: 64,64,64\r\nContent-Length: 5000\r\n\r\nx".encode())
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)  # the body deadline is 300 s: the shutdown timeout ends it
        trickling.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "memory budget:" in out and "per token" in out
    invalid = [line for line in err.splitlines() if "Invalid HTTP request received" in line]
    assert 1 <= len(invalid) <= 10, err[-2000:]
