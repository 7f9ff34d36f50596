"""Packaging of the Slicer extension: CMake lists, .s4ext, catalog entry, icons and licence agree.

CMake is not run here (no Slicer build tree); the CMake files are parsed for their ``set(...)`` lists
and macro calls, which is what decides what Slicer's build installs.
"""

import json
import re
import struct
from pathlib import Path
from typing import Dict, List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "CTSAM3D"


def cmake_commands(path: Path) -> List[List[str]]:
    """Every command of a CMake file as [name, arg1, arg2, ...] (comments stripped, quotes kept whole)."""
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    commands = []
    for match in re.finditer(r"(\w+)\s*\(([^()]*)\)", text):
        arguments = re.findall(r'"[^"]*"|[^\s"]+', match.group(2))
        commands.append([match.group(1)] + arguments)
    return commands


def cmake_variables(path: Path) -> Dict[str, List[str]]:
    variables: Dict[str, List[str]] = {}
    for command in cmake_commands(path):
        if command[0] == "set" and len(command) > 1:
            variables[command[1]] = [value.strip('"') for value in command[2:]]
    return variables


def expand(value: str, variables: Dict[str, List[str]]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables[m.group(1)]), value)


def read_s4ext(path: Path) -> Dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    return entries


def png_size(path: Path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def top_variables():
    return cmake_variables(REPO_ROOT / "CMakeLists.txt")


@pytest.fixture(scope="module")
def module_variables():
    return cmake_variables(MODULE_DIR / "CMakeLists.txt")


def test_module_lists_every_script_and_resource_and_nothing_missing(module_variables):
    scripts = [expand(s, module_variables) for s in module_variables["MODULE_PYTHON_SCRIPTS"]]
    resources = [expand(r, module_variables) for r in module_variables["MODULE_PYTHON_RESOURCES"]]
    for listed in scripts + resources:
        assert (MODULE_DIR / listed).is_file(), f"CTSAM3D/CMakeLists.txt lists a missing file: {listed}"
    shipped = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"
    }
    assert {s for s in shipped if s.endswith(".py")} == set(scripts)
    assert {s for s in shipped if not s.endswith(".py")} == set(resources)


def test_inference_core_is_installed_whole(top_variables):
    listed = top_variables["CTSAM3DLib_PYTHON_SCRIPTS"]
    for path in listed:
        assert (REPO_ROOT / path).is_file(), f"CMakeLists.txt lists a missing file: {path}"
    shipped = {
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "CTSAM3DLib").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert shipped == set(listed), "CMakeLists.txt's CTSAM3DLib_PYTHON_SCRIPTS must list every CTSAM3DLib .py"


def test_top_level_cmake_builds_the_extension(top_variables):
    commands = cmake_commands(REPO_ROOT / "CMakeLists.txt")
    names = [c[0] for c in commands]
    assert ["project", "CTSAM3D"] in [c[:2] for c in commands]
    assert ["add_subdirectory", "CTSAM3D"] in commands
    compile_call = next(c for c in commands if c[0] == "ctkMacroCompilePythonScript")
    assert "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in compile_call
    assert "NO_INSTALL_SUBDIR" in compile_call
    assert names.index("find_package") < names.index("add_subdirectory")
    assert top_variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert top_variables["EXTENSION_DEPENDS"] == ["PyTorch"]


def test_module_registers_its_self_test_and_generic_tests(module_variables):
    commands = cmake_commands(MODULE_DIR / "CMakeLists.txt")
    build = next(c for c in commands if c[0] == "slicerMacroBuildScriptedModule")
    assert "WITH_GENERIC_TESTS" in build
    unittest_call = next(c for c in commands if c[0] == "slicer_add_python_unittest")
    script = expand(unittest_call[unittest_call.index("SCRIPT") + 1], module_variables)
    source = (MODULE_DIR / script).read_text()
    assert "class CTSAM3DTest(ScriptedLoadableModuleTest)" in source


def test_s4ext_agrees_with_cmake(top_variables):
    s4ext = read_s4ext(REPO_ROOT / "CTSAM3D.s4ext")
    assert s4ext["depends"] == " ".join(top_variables["EXTENSION_DEPENDS"])
    assert s4ext["category"] == top_variables["EXTENSION_CATEGORY"][0]
    assert s4ext["homepage"] == top_variables["EXTENSION_HOMEPAGE"][0]
    assert s4ext["iconurl"] == top_variables["EXTENSION_ICONURL"][0]
    assert s4ext["description"] == top_variables["EXTENSION_DESCRIPTION"][0]
    assert s4ext["contributors"] == top_variables["EXTENSION_CONTRIBUTORS"][0]
    assert s4ext["screenshoturls"] == top_variables["EXTENSION_SCREENSHOTURLS"][0]
    assert s4ext["scmurl"].startswith(s4ext["homepage"])


def test_catalog_entry_agrees_with_cmake_and_s4ext(top_variables):
    path = REPO_ROOT / "Resources" / "ExtensionsIndex" / "CTSAM3D.json"
    assert b"\r\n" not in path.read_bytes(), "the catalog entry must use LF line endings"
    entry = json.loads(path.read_text())
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert set(entry) <= allowed, "the catalog schema forbids additional properties"
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert path.stem == cmake_commands(REPO_ROOT / "CMakeLists.txt")[1][1] == "CTSAM3D"
    assert entry["category"] == top_variables["EXTENSION_CATEGORY"][0]
    assert entry["build_dependencies"] == top_variables["EXTENSION_DEPENDS"]
    s4ext = read_s4ext(REPO_ROOT / "CTSAM3D.s4ext")
    assert entry["scm_url"] == s4ext["scmurl"]
    assert entry["scm_revision"] == s4ext["scmrevision"]
    assert re.match(r"https://github.com/[^/]+/Slicer", entry["scm_url"]), "repository name: Slicer..."
    assert 1 <= entry["tier"] <= 5


def test_icons_and_licence():
    assert png_size(REPO_ROOT / "Resources" / "Icons" / "CTSAM3D.png") == (128, 128)
    assert png_size(MODULE_DIR / "Resources" / "Icons" / "CTSAM3D.png") == (128, 128)
    png_size(MODULE_DIR / "SegmentEditorCTSAM3DLib" / "SegmentEditorEffect.png")
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence


def test_effect_lives_in_its_own_package_with_matching_class():
    effect_file = MODULE_DIR / "SegmentEditorCTSAM3DLib" / "SegmentEditorEffect.py"
    source = effect_file.read_text()
    assert "class SegmentEditorEffect(" in source
    relativeImport = re.search(r"^from \.|^import \.", source, re.MULTILINE)
    assert relativeImport is None, "the effect file must use absolute imports"
    init = (MODULE_DIR / "SegmentEditorCTSAM3DLib" / "__init__.py").read_text()
    assert "SegmentEditorEffect" in init
