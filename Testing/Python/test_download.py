"""The weights downloader against a ModelScope hub on loopback (a real HTTP server speaking its API):
a clean download, a checkpoint not at the root, a transfer cut and resumed, a wrong published checksum,
a listing that fails, a server that stalls, and the command writing a file that load_checkpoint loads."""

import hashlib
import os
import stat
import time

import pytest
from modelscope_server import ModelScopeServer

from CTSAM3DLib.cli import main
from CTSAM3DLib.download import (
    ChecksumMismatchError,
    DownloadCancelledError,
    DownloadError,
    default_weights_path,
    download_weights,
)

PAYLOAD = bytes(range(256)) * 12_000  # 3 MB: several 1 MB chunks
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def hub():
    servers = []

    def start(files):
        server = ModelScopeServer(files)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir())


def test_a_clean_download_is_verified_and_renamed_into_place(hub, tmp_path):
    server = hub({"params.pth": PAYLOAD, "README.md": b"# CT-SAM3D"})
    seen, messages = [], []
    result = download_weights(tmp_path / "params.pth", server.endpoint, progress=lambda d, t: seen.append((d, t)),
                              report=messages.append, timeout=5)
    assert (tmp_path / "params.pth").read_bytes() == PAYLOAD
    assert result.sha256 == SHA256 and result.verified and result.size == len(PAYLOAD)
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) >= 3
    assert "FilePath=params.pth" in result.source and "the only checkpoint listed" in messages[0]
    assert leftovers(tmp_path) == ["params.pth"]
    assert stat.S_IMODE((tmp_path / "params.pth").stat().st_mode) == 0o666 & ~_umask()


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_the_authors_checkpoint_is_found_below_the_root_among_others(hub, tmp_path):
    server = hub({"ckpt_1000/params.pth": PAYLOAD, "ckpt_500/params_old.pth": b"x" * 1000, "configuration.json": b"{}"})
    messages = []
    result = download_weights(tmp_path / "w.pth", server.endpoint, report=messages.append, timeout=5)
    assert result.verified and (tmp_path / "w.pth").read_bytes() == PAYLOAD
    assert "FilePath=ckpt_1000%2Fparams.pth" in result.source
    assert "ckpt_1000/params.pth, named and sized like the authors' checkpoint, of 2" in messages[0]


def test_a_cut_transfer_resumes_where_it_stopped(hub, tmp_path):
    server = hub({"params.pth": PAYLOAD})
    server.cut_after = len(PAYLOAD) // 2 + 123
    result = download_weights(tmp_path / "params.pth", server.endpoint, timeout=5)
    assert result.verified and (tmp_path / "params.pth").read_bytes() == PAYLOAD
    assert [byte_range for _, byte_range in server.file_requests()] == [None, f"bytes={len(PAYLOAD) // 2 + 123}-"]
    assert leftovers(tmp_path) == ["params.pth"]


def test_a_run_that_gives_up_is_resumed_by_the_next_run(hub, tmp_path):
    server = hub({"params.pth": PAYLOAD})
    server.cut_after = 1_500_000
    with pytest.raises(DownloadError, match="the next try resumes"):
        download_weights(tmp_path / "params.pth", server.endpoint, timeout=5, retries=0)
    assert leftovers(tmp_path) == [f"params.pth.{SHA256[:12]}.part"] and not (tmp_path / "params.pth").exists()
    download_weights(tmp_path / "params.pth", server.endpoint, timeout=5)
    assert server.file_requests()[-1][1] == "bytes=1500000-"
    assert (tmp_path / "params.pth").read_bytes() == PAYLOAD and leftovers(tmp_path) == ["params.pth"]


def test_a_wrong_published_checksum_is_refused_and_nothing_is_left(hub, tmp_path):
    server = hub({"params.pth": PAYLOAD})
    server.published_sha256["params.pth"] = "0" * 64
    (tmp_path / "params.pth").write_bytes(b"the user's previous weights")
    with pytest.raises(ChecksumMismatchError, match="the host publishes 0000"):
        download_weights(tmp_path / "params.pth", server.endpoint, timeout=5)
    assert leftovers(tmp_path) == ["params.pth"]
    assert (tmp_path / "params.pth").read_bytes() == b"the user's previous weights"


@pytest.mark.parametrize("failure", [404, 500, "malformed"])
def test_a_failed_listing_falls_back_to_the_known_addresses(hub, tmp_path, failure):
    server = hub({"ckpt_1000/params.pth": PAYLOAD})
    server.listing_status = failure
    messages = []
    result = download_weights(tmp_path / "params.pth", server.endpoint, report=messages.append, timeout=5, retries=0)
    assert not result.verified and result.sha256 == SHA256
    assert (tmp_path / "params.pth").read_bytes() == PAYLOAD
    assert "listing" in messages[0] and "without the host's checksum" in messages[0]
    assert SHA256 in messages[-1] and "modelscope.cn/models/xiuan123/CT-SAM3D" in messages[-1]
    assert leftovers(tmp_path) == ["params.pth"]


def test_when_nothing_works_the_message_says_what_to_do(hub, tmp_path):
    server = hub({"elsewhere/weights.bin": PAYLOAD})
    server.listing_status = 500
    with pytest.raises(DownloadError) as caught:
        download_weights(tmp_path / "params.pth", server.endpoint, timeout=5, retries=0)
    message = str(caught.value)
    assert "HTTP 500" in message and "HTTP 404" in message
    assert "by hand from https://www.modelscope.cn/models/xiuan123/CT-SAM3D" in message and "--weights" in message
    assert leftovers(tmp_path) == []


def test_a_stalled_server_times_out_within_bounds(hub, tmp_path):
    server = hub({"params.pth": PAYLOAD})
    server.stall_seconds = 3.0
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        download_weights(tmp_path / "params.pth", server.endpoint, timeout=0.3, retries=1)
    assert time.monotonic() - started < 3.0, "the timeout and the retries are bounded"
    assert not (tmp_path / "params.pth").exists()


def test_cancelling_keeps_nothing(hub, tmp_path):
    server = hub({"params.pth": PAYLOAD})
    calls = []
    with pytest.raises(DownloadCancelledError):
        download_weights(tmp_path / "params.pth", server.endpoint, progress=lambda d, t: calls.append(d),
                         is_cancelled=lambda: bool(calls), timeout=5)
    assert leftovers(tmp_path) == []


def test_the_default_place_is_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CTSAM3D_CACHE", str(tmp_path / "cache"))
    assert default_weights_path() == tmp_path / "cache" / "params.pth"
    monkeypatch.delenv("CTSAM3D_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_weights_path() == tmp_path / "xdg" / "ctsam3d" / "params.pth"


def test_the_command_downloads_reference_weights_that_load(hub, tmp_path, capsys):
    from CTSAM3DLib import load_checkpoint

    served = tmp_path / "served.pth"
    assert main(["reference-weights", "--output", str(served)]) == 0
    server = hub({"ckpt_1000/params.pth": served})
    output = tmp_path / "w.pth"
    assert main(["download-weights", "--endpoint", server.endpoint, "--output", str(output), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    sha256 = hashlib.sha256(served.read_bytes()).hexdigest()
    assert f"SHA-256 {sha256} (verified against the host's checksum)" in printed and str(output) in printed
    load_checkpoint(output, device="cpu")
