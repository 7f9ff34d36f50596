"""The evaluation run: resumable result store, report, and short runs on ../shared/data."""

import argparse
import csv

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from CTSAM3DLib import cli
from CTSAM3DLib.commands import evaluate as evaluate_command
from CTSAM3DLib.datasets import find_cases
from CTSAM3DLib.evaluation.baseline import RegionGrowingSession
from CTSAM3DLib.evaluation.report import build_curves, render_report
from CTSAM3DLib.evaluation.results import ResultsError, ResultStore
from CTSAM3DLib.evaluation.runner import Method, evaluate, select_structures
from CTSAM3DLib.session import InteractiveSession
from standins.networks import ThresholdNet

SETTINGS = {"protocol": {"clicks": 2, "tolerance_mm": 2.0, "patch_cap": None}}


def baseline():
    return Method("baseline", RegionGrowingSession)


def threshold_model():
    return Method("model", lambda image: InteractiveSession(ThresholdNet(), image, device="cpu"))


def run_subcommand(argv):
    parser = argparse.ArgumentParser()
    evaluate_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_evaluate_is_registered_in_the_cli():
    assert "CTSAM3DLib.commands.evaluate" in cli.SUBCOMMAND_MODULES


def test_short_run_on_shared_data_with_model_and_baseline(data_dir, tmp_path):
    cases = [c for c in find_cases(data_dir) if c.name in ("abdomen-ct-3mm", "aorta-ct-1.5mm")]
    store = ResultStore(tmp_path, SETTINGS)
    wanted = ["spleen", "aorta"]
    counts = evaluate(cases, [threshold_model(), baseline()], store, 2, None, wanted, show_progress=False)
    assert counts["done"] == 6 and counts["error"] == 0  # 3 structures x 2 methods
    rows = read_csv(tmp_path / "clicks.csv")
    assert {(r["method"], r["case"], r["structure"]) for r in rows} == {
        (m, c, s)
        for m in ("model", "baseline")
        for c, s in [("abdomen-ct-3mm", "spleen"), ("abdomen-ct-3mm", "aorta"), ("aorta-ct-1.5mm", "aorta")]
    }
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 and 0.0 <= float(row["surface_dice"]) <= 1.0
    # Both methods received the same first click (the structure's most interior voxel).
    firsts = {
        (r["case"], r["structure"], r["method"]): (r["index_z"], r["index_y"], r["index_x"])
        for r in rows
        if r["click"] == "1"
    }
    assert firsts[("abdomen-ct-3mm", "spleen", "model")] == firsts[("abdomen-ct-3mm", "spleen", "baseline")]
    # The saved final mask is on the CT's grid.
    mask = sitk.ReadImage(str(store.mask_path(("baseline", "aorta-ct-1.5mm", "aorta"))))
    assert mask.GetSize() == cases[1].load_image().GetSize()
    report = render_report(store, ["model", "baseline"], 2)
    assert "| model | 3 |" in report and "| baseline | 3 |" in report
    # A second run finds everything done and changes nothing.
    before = (tmp_path / "clicks.csv").read_text()
    store.close()
    again = evaluate(
        cases,
        [threshold_model(), baseline()],
        ResultStore(tmp_path, SETTINGS),
        2,
        None,
        wanted,
        show_progress=False,
    )
    assert again["already"] == 6 and again["done"] == 0, "3 structures, 2 methods"
    assert (tmp_path / "clicks.csv").read_text() == before


def test_cli_baseline_run_writes_tables_and_plots(data_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code = run_subcommand(
        [
            "evaluate",
            "--data",
            str(data_dir),
            "--methods",
            "baseline",
            "--clicks",
            "3",
            "--cases",
            "abdomen-ct-3mm",
            "--structures",
            "kidney_left",
            "adrenal_gland_right",
            "--output",
            str(output),
            "--no-progress",
            "--gallery",
            "1",
        ]
    )
    assert code == 0
    for name in (
        "clicks.csv",
        "structures.csv",
        "report.md",
        "summary.csv",
        "dice_vs_clicks.png",
        "gallery.png",
    ):
        assert (output / name).stat().st_size > 0, name
    statuses = {r["structure"]: r["status"] for r in read_csv(output / "structures.csv")}
    assert statuses == {"kidney_left": "done", "adrenal_gland_right": "done"}
    summary = capsys.readouterr().out
    assert "| baseline |" in summary
    assert "(structure, method) pairs: evaluated 2, skipped 0 (size), errors 0, already done 0" in summary
    assert not (output / ".lock").exists(), "the lock file stays behind"
    # Rerun with other settings into the same folder: refused, nothing mixed.
    with pytest.raises(ResultsError, match="clicks"):
        run_subcommand(
            [
                "evaluate",
                "--data",
                str(data_dir),
                "--methods",
                "baseline",
                "--clicks",
                "4",
                "--cases",
                "abdomen-ct-3mm",
                "--structures",
                "kidney_left",
                "--output",
                str(output),
            ]
        )


def test_gallery_rows_share_one_crop_and_the_mask_is_not_red(tmp_path, monkeypatch):
    """Each method's panel in a row shows the same region at the same scale, and the mask's colour is not
    the negative clicks' red."""
    from CTSAM3DLib.evaluation import plots
    from CTSAM3DLib.evaluation.report import build_curves

    synthetic_case(tmp_path / "data" / "case1")
    cases = find_cases(tmp_path / "data")
    store = ResultStore(tmp_path / "out", SETTINGS)
    evaluate(cases, [threshold_model(), baseline()], store, 2, None, None, show_progress=False)
    boxes = []
    real_panel = plots._panel

    def record(axes, ct, reference, prediction, click_rows, spacing, direction, title, box, **kwargs):
        boxes.append((title.split("\n")[0], box, prediction.sum()))
        return real_panel(axes, ct, reference, prediction, click_rows, spacing, direction, title, box, **kwargs)

    monkeypatch.setattr(plots, "_panel", record)
    curves = build_curves(store.click_rows(), 2)
    plots.plot_gallery(store, cases, curves, ["model", "baseline"], tmp_path / "gallery.png", 1)
    rows = {}
    for row_title, box, _ in boxes:
        rows.setdefault(row_title, set()).add(box)
    assert rows and all(len(row_boxes) == 1 for row_boxes in rows.values()), rows
    red, green, blue = (int(plots.MASK_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    assert blue > red and blue > green, "the mask must not share the negative clicks' red"


def test_cli_refuses_bad_requests(data_dir, tmp_path):
    with pytest.raises(cli.CommandError, match="--weights"):
        run_subcommand(["evaluate", "--data", str(data_dir), "--output", str(tmp_path)])
    with pytest.raises(cli.CommandError, match="nothing to evaluate"):
        run_subcommand(
            [
                "evaluate",
                "--data",
                str(data_dir / "body-ct-3mm"),
                "--methods",
                "baseline",
                "--output",
                str(tmp_path),
            ]
        )
    with pytest.raises(ValueError, match="in none of the scans"):
        run_subcommand(
            [
                "evaluate",
                "--data",
                str(data_dir),
                "--methods",
                "baseline",
                "--structures",
                "unicorn",
                "--output",
                str(tmp_path),
            ]
        )


def synthetic_case(folder, structures=("left", "right")):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    ct = rng.normal(-800.0, 10.0, (24, 24, 40)).astype(np.float32)
    for index, name in enumerate(structures):
        mask = np.zeros(ct.shape, np.uint8)
        mask[6:18, 6:18, 4 + 20 * index : 16 + 20 * index] = 1
        ct[mask == 1] = rng.normal(60.0, 10.0, int(mask.sum()))
        image = sitk.GetImageFromArray(mask)
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(folder / "ct.nii.gz"))


def test_resume_drops_unfinished_clicks_and_runs_only_what_is_missing(tmp_path):
    synthetic_case(tmp_path / "data" / "case1")
    cases = find_cases(tmp_path / "data")
    output = tmp_path / "out"
    store = ResultStore(output, SETTINGS)
    evaluate(cases, [baseline()], store, 2, None, ["left"], show_progress=False)
    done_rows = read_csv(output / "clicks.csv")
    # A crash in the middle of "right": its click rows were written, its status row was not, and
    # the last line was cut short.
    with open(output / "clicks.csv", "a") as stream:
        stream.write("baseline,case1,right,1,1,1,2,3,0,0,0,0.5,0.5,1.0,0.1\nbaseline,case1,ri")
    store.close()  # the first run ends
    resumed = ResultStore(output, SETTINGS)
    assert read_csv(output / "clicks.csv") == done_rows
    counts = evaluate(cases, [baseline()], resumed, 2, None, None, show_progress=False)
    assert counts == {"done": 1, "skipped": 0, "error": 0, "already": 1}
    rows = read_csv(output / "clicks.csv")
    assert rows[: len(done_rows)] == done_rows and {r["structure"] for r in rows} == {"left", "right"}
    assert set(build_curves(rows, 2)) == {("baseline", "case1", "left"), ("baseline", "case1", "right")}
    # A method added later joins the folder; changed settings of a group are refused.
    with pytest.raises(ResultsError, match="in use"):
        ResultStore(output, SETTINGS)
    resumed.close()
    ResultStore(output, {**SETTINGS, "model": {"weights": "w.pth"}})
    with pytest.raises(ResultsError, match="model"):
        ResultStore(output, {**SETTINGS, "model": {"weights": "other.pth"}})


def test_select_structures():
    class FakeCase:
        def __init__(self, name, structure_names):
            self.name, self.structure_names = name, structure_names

    cases = [FakeCase("a", ["liver", "spleen"]), FakeCase("b", ["aorta"])]
    assert select_structures(cases, None) == {"a": ["liver", "spleen"], "b": ["aorta"]}
    assert select_structures(cases, ["aorta"]) == {"a": [], "b": ["aorta"]}
    with pytest.raises(ValueError, match="kidney"):
        select_structures(cases, ["kidney"])


def test_too_small_and_too_large_structures_are_reported_for_every_method(tmp_path):
    synthetic_case(tmp_path / "data" / "case1")
    dot = np.zeros((24, 24, 40), np.uint8)
    dot[12, 12, 10] = 1  # one 2 mm voxel: 8 mm^3, about 2.4 lattice voxels of 1.5 mm
    image = sitk.GetImageFromArray(dot)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "data" / "case1" / "dot.nii.gz"))
    cases = find_cases(tmp_path / "data")
    store = ResultStore(tmp_path / "out", SETTINGS)
    counts = evaluate(
        cases, [threshold_model(), baseline()], store, 1, 1, ["dot", "left"], show_progress=False
    )
    # "left" is 24 x 24 x 24 mm: one patch. The cap of 0 patches below makes everything too large.
    assert counts == {"done": 2, "skipped": 2, "error": 0, "already": 0}
    rows = {(r["method"], r["structure"]): r for r in read_csv(tmp_path / "out" / "structures.csv")}
    for method in ("model", "baseline"):
        assert rows[(method, "dot")]["status"] == "skipped" and "too small" in rows[(method, "dot")]["reason"]
    report = render_report(store, ["model", "baseline"], 1)
    assert "Structures left out" in report and "too small" in report
    store = ResultStore(tmp_path / "out2", SETTINGS)
    evaluate(cases, [baseline()], store, 1, 0, ["left"], show_progress=False)
    (row,) = read_csv(tmp_path / "out2" / "structures.csv")
    assert row["status"] == "skipped" and "too large" in row["reason"]
