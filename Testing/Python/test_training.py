"""Training runs on the real CTs of ../shared/data: learning, resumption, checkpoints, the command.

The stand-in network (standins.TrainableStandIn) keeps these runs to seconds on a CPU; the real
network is trained for one step through the ``ctsam3d train`` command to prove its checkpoint
loads strictly into the inference session.
"""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CTSAM3DLib import load_checkpoint
from CTSAM3DLib.checkpoint import read_checkpoint
from CTSAM3DLib.cli import main as cli_main
from CTSAM3DLib.datasets import find_cases
from CTSAM3DLib.session import InteractiveSession
from CTSAM3DLib.simulated_annotator import index_to_lps, interior_point
from CTSAM3DLib.training.config import config_from_dict
from CTSAM3DLib.training.trainer import Trainer
from standins.networks import TrainableStandIn


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Shared by every test of the session: each scan is resampled once.
    return tmp_path_factory.getbasetemp() / "training-cache"


def _config(root, cache_dir, output_dir, **sections):
    values = {
        "data": {"root": str(root), "cache_dir": str(cache_dir), "workers": 0, "validation_fraction": 0.0},
        "optimisation": {"batch_size": 2, "max_steps": 4, "warmup_steps": 2, "learning_rate": 1e-2},
        "clicks": {"iterations": 2},
        "validation": {"every": 0},
        "run": {"output_dir": str(output_dir), "log_every": 1, "checkpoint_every": 2, "progress": False},
    }
    for section, items in sections.items():
        values.setdefault(section, {}).update(items)
    return config_from_dict(values)


def _fixed_batch_scores(trainer, steps):
    """Mean loss and Dice after the last click over fixed batches (no update)."""
    with torch.no_grad():
        outputs = [trainer.step_module(**trainer.sampler.batch(step, batch_size=2)) for step in steps]
    return float(np.mean([o["loss"] for o in outputs])), float(np.mean([o["dice"] for o in outputs]))


def test_loss_falls_on_the_shared_data(data_dir, cache_dir, tmp_path):
    config = _config(
        data_dir, cache_dir, tmp_path / "run",
        data={"validation_cases": ["chest-abdomen-ct"]},
        optimisation={"max_steps": 30, "warmup_steps": 3},
        validation={"every": 30, "clicks": 2, "max_structures_per_case": 4},
        run={"log_every": 5, "checkpoint_every": 30},
    )
    torch.manual_seed(0)
    trainer = Trainer(config, net=TrainableStandIn())
    assert [case.name for case in trainer.validation_cases] == ["chest-abdomen-ct"]
    assert {case.name for case in trainer.sampler.cases} == {"abdomen-ct-3mm", "aorta-ct-1.5mm"}
    held_out = list(range(10_000, 10_006))  # batches never trained on
    loss_before, dice_before = _fixed_batch_scores(trainer, held_out)
    trainer.fit()
    loss_after, dice_after = _fixed_batch_scores(trainer, held_out)
    assert loss_after < loss_before - 0.02, (loss_before, loss_after)
    assert dice_after > dice_before + 0.1, (dice_before, dice_after)
    with open(tmp_path / "run" / "train_log.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["step"]) for row in rows] == [5, 10, 15, 20, 25, 30]
    assert all(float(row["patches_per_s"]) > 0 and float(row["learning_rate"]) > 0 for row in rows)
    with open(tmp_path / "run" / "validation_log.csv", newline="") as stream:
        validation = list(csv.DictReader(stream))
    assert len(validation) == 1 and int(validation[0]["patches"]) == 4
    assert 0.0 <= float(validation[0]["dice_after_2"]) <= 1.0


def _train(config, seed=0):
    torch.manual_seed(seed)
    trainer = Trainer(config, net=TrainableStandIn(dropout=0.2))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def test_resuming_after_a_stop_continues_identically(data_dir, cache_dir, tmp_path):
    root = data_dir / "abdomen-ct-3mm"
    settings = {"augmentation": {"probability": 1.0}}
    straight = _train(_config(root, cache_dir, tmp_path / "straight", **settings))
    _train(_config(root, cache_dir, tmp_path / "split", optimisation={"max_steps": 2}, **settings))
    # A new process would start from a different weight initialisation and generator state:
    # both must come from the checkpoint.
    # The resumed half loads data in a worker process and simulates clicks in a pool of two: the
    # results must not depend on either.
    resumed = _train(
        _config(root, cache_dir, tmp_path / "split", data={"workers": 1}, clicks={"workers": 2}, **settings),
        seed=123,
    )
    assert resumed.step == straight.step == 4
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    moments = [trainer.optimizer.state_dict()["state"].values() for trainer in (straight, resumed)]
    for a, b in zip(*moments):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # The logs agree too, up to the timing columns.
    logs = [(tmp_path / run / "train_log.csv").read_text().splitlines() for run in ("straight", "split")]
    assert [line.split(",")[:8] for line in logs[0]] == [line.split(",")[:8] for line in logs[1]]


def test_checkpoint_is_plain_and_in_the_authors_layout(data_dir, cache_dir, tmp_path):
    trainer = _train(_config(data_dir / "abdomen-ct-3mm", cache_dir, tmp_path / "run", optimisation={"max_steps": 2}))
    content = read_checkpoint(tmp_path / "run" / "last.pth")  # the restricted loader: plain values only
    assert set(trainer.net.state_dict()) == set(content["model_state_dict"])
    assert content["step"] == 2 and content["world_size"] == 1
    assert "state" in content["optimizer_state_dict"]
    assert content["config"]["optimisation"]["batch_size"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002.pth"]
    assert not list((tmp_path / "run").glob("*.partial"))


def test_train_command_trains_the_real_network_and_the_session_loads_it(data_dir, cache_dir, tmp_path):
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps({
        "data": {"root": str(data_dir / "aorta-ct-1.5mm"), "cache_dir": str(cache_dir), "workers": 0,
                 "validation_fraction": 0.0},
        "optimisation": {"batch_size": 1, "max_steps": 1, "warmup_steps": 1},
        "loss": {"cross_patch": False},
        "clicks": {"iterations": 1},
        "validation": {"every": 0},
        "run": {"output_dir": "out", "device": "cpu", "keep_checkpoints": 0},
    }))
    assert cli_main(["train", "--config", str(config_path), "--no-progress"]) == 0
    checkpoint = tmp_path / "out" / "last.pth"
    net = load_checkpoint(checkpoint, device="cpu")  # strict: every entry of the network, nothing else
    content = read_checkpoint(checkpoint)
    assert content["step"] == 1 and content["optimizer_state_dict"]["state"]
    for name, value in net.state_dict().items():
        assert torch.equal(value, content["model_state_dict"][name]), name
    case = find_cases(data_dir / "aorta-ct-1.5mm")[0]
    image = case.load_image()
    reference = sitk.GetArrayFromImage(case.load_structure("aorta")).astype(bool)
    point = index_to_lps(image, interior_point(reference, image.GetSpacing()[::-1]))
    session = InteractiveSession(net, image, device="cpu")
    session.add_click(point, True)
    mask = session.mask
    assert mask.GetSize() == image.GetSize() and mask.GetDirection() == image.GetDirection()


def test_an_interrupted_run_saves_its_last_completed_step(data_dir, cache_dir, tmp_path):
    config = _config(data_dir / "abdomen-ct-3mm", cache_dir, tmp_path / "run", run={"checkpoint_every": 100})
    torch.manual_seed(0)
    trainer = Trainer(config, net=TrainableStandIn())
    original = trainer.train_step

    def interrupted_on_third_step(batch):
        if trainer.step == 2:
            raise KeyboardInterrupt
        return original(batch)

    trainer.train_step = interrupted_on_third_step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert read_checkpoint(tmp_path / "run" / "last.pth")["step"] == 2
    resumed = Trainer(config, net=TrainableStandIn())
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4
