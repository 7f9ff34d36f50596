"""Evaluating corrections (issue 14): starting from degraded references or another run's masks, and the
box protocol, on the real CTs of ../shared/data."""

import numpy as np
import SimpleITK as sitk
from test_evaluation_run import baseline, read_csv, run_subcommand

from CTSAM3DLib.datasets import find_cases
from CTSAM3DLib.evaluation.protocol import degraded_start, jittered_box, run_clicks
from CTSAM3DLib.evaluation.results import ResultStore
from CTSAM3DLib.evaluation.runner import Method, evaluate
from CTSAM3DLib.session import InteractiveSession
from standins.networks import PromptFollowingNet


def kidney(data_dir):
    (case,) = [c for c in find_cases(data_dir) if c.name == "abdomen-ct-3mm"]
    return case, case.load_structure("kidney_left")


def test_degraded_starts_and_the_jittered_box(data_dir):
    _, reference = kidney(data_dir)
    target = sitk.GetArrayFromImage(reference) != 0
    eroded = sitk.GetArrayFromImage(degraded_start(reference, "eroded")) != 0
    dilated = sitk.GetArrayFromImage(degraded_start(reference, "dilated")) != 0
    leak = sitk.GetArrayFromImage(degraded_start(reference, "leak")) != 0
    assert eroded.sum() < target.sum() and not (eroded & ~target).any()
    assert dilated.sum() > target.sum() and not (target & ~dilated).any()
    assert not (target & ~leak).any() and 1.5 * target.sum() < leak.sum() <= 2 * target.sum()
    low, high = jittered_box(reference, 3.0, seed=7)
    index = np.argwhere(target)[:, ::-1].astype(float)
    world = np.array([reference.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    assert np.all(world.min(0) - low <= 3.0 + 1.5 + 1e-6) and np.all(world.min(0) - low >= -3.0)
    assert np.all(high - world.max(0) <= 3.0 + 1.5 + 1e-6) and np.all(high - world.max(0) >= -3.0)
    assert np.allclose(jittered_box(reference, 3.0, seed=7)[0], low), "the jitter is seeded"


def test_clicks_correct_a_start_mask_and_a_box_opens_the_protocol(data_dir):
    case, reference = kidney(data_dir)
    image = case.load_image()
    session = InteractiveSession(PromptFollowingNet(radius=4.0), image, device="cpu", cross_patch=False)
    dilated = degraded_start(reference, "dilated")
    records = run_clicks(session, reference, 3, start=dilated)
    assert records and not records[0].positive, "the first correction of a dilated mask removes"
    start_dice = 2 * ((sitk.GetArrayViewFromImage(dilated) != 0) & (sitk.GetArrayViewFromImage(reference) != 0)).sum()
    start_dice /= (sitk.GetArrayViewFromImage(dilated) != 0).sum() + (sitk.GetArrayViewFromImage(reference) != 0).sum()
    assert records[0].dice > start_dice
    box = jittered_box(reference, 2.0, seed=1)
    records = run_clicks(session, reference, 2, box=box)
    assert records[0].positive and session.box_lps is not None
    assert np.allclose(records[0].point_lps, (np.asarray(box[0]) + np.asarray(box[1])) / 2)


def test_the_command_measures_corrections_from_starts_and_boxes(data_dir, tmp_path, capsys):
    common = ["evaluate", "--data", str(data_dir), "--methods", "baseline", "--clicks", "3", "--cases",
              "abdomen-ct-3mm", "--structures", "kidney_left", "--no-progress", "--gallery", "0"]
    assert run_subcommand(common + ["--output", str(tmp_path / "scratch")]) == 0
    for extra, folder in [
        (["--start-from", "leak"], "leak"),
        (["--start-from", str(tmp_path / "scratch" / "masks" / "baseline")], "from-run"),
        (["--box-jitter-mm", "3"], "box"),
    ]:
        assert run_subcommand(common + extra + ["--output", str(tmp_path / folder)]) == 0, extra
        rows = read_csv(tmp_path / folder / "clicks.csv")
        assert rows and {r["structure"] for r in rows} == {"kidney_left"}
        assert "clicks to 0.90" in (tmp_path / folder / "report.md").read_text()
    box_rows = read_csv(tmp_path / "box" / "clicks.csv")
    assert box_rows[0]["positive"] == "1"
    capsys.readouterr()


def test_a_model_run_starts_from_the_degraded_reference(data_dir, tmp_path):
    cases = [c for c in find_cases(data_dir) if c.name == "abdomen-ct-3mm"]
    store = ResultStore(tmp_path, {"protocol": {"clicks": 2, "start_from": "eroded"}})
    model = Method("model", lambda image: InteractiveSession(PromptFollowingNet(radius=4.0), image, device="cpu"))
    counts = evaluate(cases, [model, baseline()], store, 2, None, ["kidney_left"], show_progress=False,
                      start="eroded")
    assert counts["done"] == 2 and counts["error"] == 0
    first = {r["method"]: r for r in read_csv(tmp_path / "clicks.csv") if r["click"] == "1"}
    assert first["model"]["positive"] == "1" and first["baseline"]["positive"] == "1", "an eroded start misses voxels"
