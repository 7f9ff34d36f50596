"""Every script in bench/ runs one tiny round (``python -m bench.<script>``, as BENCHMARKS.md runs them), so
that none can rot unnoticed: it must exit 0 and print its results. Speed is not judged here (the scripts
measure it, on quiet machines)."""

import os
import subprocess
import sys

import pytest
from conftest import DATA_DIR, REPO_ROOT

BENCH = REPO_ROOT / "bench"

TINY_ROUNDS = {
    "bench_cpu_decoders.py": (["--repeats", "1", "--only", "int8 (torch, today)", "CTSAM3DLib"],
                              "| openvino int8 (CTSAM3DLib, today's openvino-int8) |"),
    "bench_inference.py": (["--repeats", "1", "--precisions", "int8", "--skip-accuracy", "--devices", "cpu",
                            "--cross-patch-cap", "2"], "| int8"),
    "bench_server.py": (["--network", "stand-in", "--users", "1", "--clicks", "2", "--sessions", "2"],
                        "| stand-in |"),
    "bench_server_attacks.py": (["--clicks", "1", "--decode-ms", "5", "--budget-mb", "512"],
                                "| 800 slowloris connections |"),
    "bench_server_previews.py": (["--rounds", "1", "--decode-s", "0.01"], "| multi-patch, previews | 10 |"),
    "bench_session_accuracy.py": (["--precisions", "openvino-int8", "--caps", "1"], "| body-ct-3mm | 1 |"),
    "bench_slicer_effect.py": (["--repeats", "1", "--skip-polled"], "effect in Slicer's event loop"),
    "bench_training.py": (["--batch", "1", "--steps", "1", "--mode", "plain", "--device", "cpu"], "s/step"),
    "gpu_check.py": (["--device", "cpu", "--quick"], "| refining click (add_click), median |"),
}
"""The smallest round of each script, and a piece of the results it prints; a new script must be added."""

SHARED = ("__init__.py", "common.py")
"""The package and what the scripts share: no script of their own."""


def test_every_bench_script_has_a_tiny_round():
    assert sorted(path.name for path in BENCH.glob("*.py") if path.name not in SHARED) == sorted(TINY_ROUNDS)


@pytest.mark.parametrize("script", sorted(TINY_ROUNDS))
def test_a_bench_script_runs_one_tiny_round(script, data_dir):
    arguments, printed = TINY_ROUNDS[script]
    environment = {**os.environ, "CTSAM3D_SHARED": str(DATA_DIR.parent), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", f"bench.{script[:-3]}", *arguments], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900, env=environment, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert printed in result.stdout, f"{script} printed no results:\n{result.stdout[-2000:]}"
