"""Two CPU processes (gloo, DistributedDataParallel) compute the gradient of one process with the
union batch: per-rank sampling and gradient averaging together change nothing but the speed."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from CTSAM3DLib.datasets import find_cases
from CTSAM3DLib.training.cache import build_cached_case
from CTSAM3DLib.training.config import config_from_dict
from CTSAM3DLib.training.trainer import Trainer
from standins.networks import TrainableStandIn

PER_PROCESS_BATCH = 2


def _config(root, cache_dir, output_dir, batch_size):
    return config_from_dict({
        "data": {"root": str(root), "cache_dir": str(cache_dir), "workers": 0, "validation_fraction": 0.0},
        "optimisation": {"batch_size": batch_size, "max_steps": 1},
        "augmentation": {"probability": 1.0},
        "clicks": {"iterations": 2},
        "validation": {"every": 0},
        "run": {"output_dir": str(output_dir), "progress": False, "device": "cpu"},
    })


def _gradients(trainer, step=0):
    batch = trainer.sampler.batch(step, trainer.context.rank, trainer.context.world_size,
                                  trainer.config.optimisation.batch_size)
    outputs = trainer.forward_backward(batch)
    grads = {name: p.grad.clone() for name, p in trainer.net.named_parameters() if p.grad is not None}
    return grads, float(outputs["loss"].detach())


def _worker(rank, world_size, port, root, cache_dir, output_dir, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = Trainer(_config(root, cache_dir, output_dir, PER_PROCESS_BATCH), net=TrainableStandIn())
    try:
        assert trainer.context.world_size == world_size and trainer.context.distributed
        grads, loss = _gradients(trainer)
        if rank == 0:
            torch.save({"grads": grads}, result_path)
    finally:
        trainer.close()


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_the_single_process_gradient(data_dir, tmp_path_factory, tmp_path):
    root = data_dir / "abdomen-ct-3mm"
    cache_dir = tmp_path_factory.getbasetemp() / "training-cache"
    build_cached_case(find_cases(root)[0], cache_dir)  # once, before the processes start
    result_path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), root, cache_dir, tmp_path / "ddp", result_path), nprocs=2, join=True)
    distributed = torch.load(result_path)["grads"]

    torch.manual_seed(0)
    single = Trainer(_config(root, cache_dir, tmp_path / "single", 2 * PER_PROCESS_BATCH), net=TrainableStandIn())
    expected, _ = _gradients(single)
    # The quality head is never trained: no gradient in either run.
    assert set(distributed) == set(expected)
    assert not any(name.startswith("quality_head") for name in expected)
    for name, gradient in expected.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(distributed[name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    # Each process saw its own half: one process alone gets a different gradient.
    torch.manual_seed(0)
    half = Trainer(_config(root, cache_dir, tmp_path / "half", PER_PROCESS_BATCH), net=TrainableStandIn())
    half_grads, _ = _gradients(half)
    assert any(not torch.allclose(half_grads[n], expected[n], rtol=1e-3, atol=1e-6) for n in expected)


@pytest.fixture(autouse=True)
def _no_torchrun_environment(monkeypatch):
    # The single-process trainers of this test must not see a distributed environment.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
