"""The README's Python example runs as written (its two file paths pointed at this test's files)."""

import re

import SimpleITK as sitk
import torch
from conftest import REPO_ROOT, SHARED_DIR

from CTSAM3DLib import build_model, save_checkpoint


def python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_python_api_example_runs(tmp_path, data_dir, monkeypatch):
    block = python_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))[0]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "weights.pth", build_model("tiny"))
    monkeypatch.chdir(tmp_path)
    code = block.replace("../shared", str(SHARED_DIR))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    written = sitk.ReadImage(str(tmp_path / "liver.nii.gz"))
    source = sitk.ReadImage(str(data_dir / "chest-abdomen-ct" / "ct.nii.gz"))
    assert written.GetSize() == source.GetSize() and written.GetDirection() == source.GetDirection()
    assert len(namespace["session"].clicks) == 1
