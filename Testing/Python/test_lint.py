"""Ruff, with Python 3.9 (Slicer 5.8's Python) as the target, over everything we ship; and the one
import rules ruff cannot check: a client never imports its server, nor needs its packages."""

import ast
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_ruff_is_clean_for_python_3_9():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--target-version", "py39", "--output-format", "concise", "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_client_imports_nothing_of_its_server():
    """The wire format is a contract of both sides (``CTSAM3DLib.protocol``); the client reaches into no
    module of the server's package."""
    tree = ast.parse((REPO_ROOT / "CTSAM3DLib" / "remote.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if "server" in name.split(".")], imported


def test_the_client_and_the_wire_format_load_without_the_servers_packages_or_torch():
    """Slicer and a workstation client have neither FastAPI nor pydantic nor torch: the protocol (session
    options included) and ``RemoteSession`` import with those refused."""
    refuse = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'pydantic', 'pydantic_core', 'starlette', 'torch'):\n"
        "            raise ImportError(f'{name} is refused here')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import CTSAM3DLib.protocol, CTSAM3DLib.remote\n"
        "print(CTSAM3DLib.protocol.SESSION_OPTION_NAMES)\n"
    )
    result = subprocess.run([sys.executable, "-c", refuse], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert "cross_patch" in result.stdout


def imported_modules(path):
    """The modules a Python file imports (absolute names; a relative import as its dots and name)."""
    tree = ast.parse(path.read_text())
    names = ["." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    return names + [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]


def test_data_flows_one_way_between_product_stand_ins_benchmarks_and_tests():
    """What ships (CTSAM3DLib, CTSAM3D) imports no stand-in, benchmark or test; the stand-ins no benchmark or
    test; the benchmarks no test module, and none of them edits sys.path (they run as ``python -m bench.x``)."""
    tests = {path.stem for path in (REPO_ROOT / "Testing" / "Python").glob("*.py")}
    for folder, refused in (("CTSAM3DLib", {"standins", "bench", "Testing", *tests}),
                            ("CTSAM3D", {"standins", "bench", "Testing", *tests}),
                            ("standins", {"bench", "Testing", *tests}),
                            ("bench", {"Testing", *tests})):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            found = [name for name in imported_modules(path) if name.split(".")[0] in refused]
            assert not found, f"{path.relative_to(REPO_ROOT)} imports {found}"
    for path in (REPO_ROOT / "bench").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.relative_to(REPO_ROOT)} edits sys.path"
