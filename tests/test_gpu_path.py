"""The trainer's GPU-path bookkeeping, checked on the CPU: the MFU peak table and its override, the
loss read once per log_interval (summed on the device in between), and the loader's per-epoch order."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ConfigError, TrainConfig, run_identity
from model.data import LoaderState, RowLoader
from model.train import LossWindow, mfu, peak_flops
from tests.test_train import _config, _rows


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_is_looked_up_from_the_gpu_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == (tflops * 1e12 if tflops else None)
    assert peak_flops(torch.device("cuda"), override_tflops=500) == 500e12  # the config wins over the table


def test_no_peak_and_no_mfu_on_the_cpu_unless_given():
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1e12, None) is None
    assert peak_flops(torch.device("cpu"), 2.0) == 2e12
    assert mfu(400e12, 989e12) == pytest.approx(0.4044, abs=1e-4)
    assert mfu(400e12, 100e12, devices=8) == 0.5


def test_peak_tflops_is_a_launch_setting_and_compile_is_checked():
    assert run_identity(TrainConfig(peak_tflops=989)) == run_identity(TrainConfig())  # the same run folder
    with pytest.raises(ConfigError, match="peak_tflops"):
        TrainConfig(peak_tflops=-1)
    assert TrainConfig(compile="True").compile == "true"  # YAML's `compile: true` arrives as "True"
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile="yes please")
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16")


def test_loss_window_averages_micro_batches_and_steps_on_the_device():
    window = LossWindow()
    assert window.mean() is None
    window.add(torch.tensor(3.0), micro_batches=2)  # a step of two micro-batches: losses 1 + 2
    window.add(torch.tensor(6.0), micro_batches=2)
    mean = window.mean()
    assert isinstance(mean, torch.Tensor) and mean.item() == pytest.approx(9 / 4)
    window.reset()
    assert window.mean() is None


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_is_read_once_per_log_interval_as_the_window_mean(tmp_path, monkeypatch, one_thread):
    from model.train import train

    _rows(tmp_path, "clm")
    settings = dict(max_steps=6, eval_interval=6, eval_batches=1, warmup_steps=1, peak_tflops=1.0)
    every = train(_config(tmp_path, "clm", log_interval=1, out_dir=str(tmp_path / "every"), **settings))
    reads = []
    item = torch.Tensor.item

    def counted(self):
        reads.append(sys._getframe(1).f_code.co_name)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    windowed = train(_config(tmp_path, "clm", log_interval=3, out_dir=str(tmp_path / "windowed"), **settings))
    monkeypatch.undo()
    assert reads.count("_train") == 2  # steps 3 and 6: the hot loop reads nothing else from the device

    per_step = {r["step"]: r["train/loss"] for r in _metrics(tmp_path / "every") if "train/loss" in r}
    logged = [r for r in _metrics(tmp_path / "windowed") if "train/loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:  # the same run, logged every step or every third: the window's mean
        assert r["train/loss"] == pytest.approx(np.mean([per_step[s] for s in range(r["step"] - 2, r["step"] + 1)]),
                                                rel=1e-5)
        assert r["throughput/mfu"] > 0 and r["throughput/tokens_per_s"] > 0
        assert "memory/peak_allocated_gib" not in r  # CUDA's allocator statistics only
    assert windowed["mfu"] > 0 and every["mfu"] > 0 and "peak_memory_gib" not in windowed
    assert windowed["val/loss"] == every["val/loss"]  # how often the loss is read changes nothing trained


def test_loader_draws_each_epoch_order_once_and_resumes_the_same(monkeypatch):
    rows = np.arange(40 * 3, dtype=np.uint16).reshape(40, 3)
    drawn = []
    rng = np.random.default_rng

    def counting_rng(seed):
        drawn.append(seed)
        return rng(seed)

    monkeypatch.setattr(np.random, "default_rng", counting_rng)
    loader = RowLoader(rows, 8, seed=1)
    first = [loader.next_batch() for _ in range(12)]  # 5 batches an epoch: 3 epochs started
    assert drawn == [(1, 0), (1, 1), (1, 2)]
    resumed = RowLoader(rows, 8, seed=1, state=LoaderState(epoch=1, position=16))
    assert all(torch.equal(a, b) for a, b in zip(first[7:], [resumed.next_batch() for _ in range(5)]))
    assert sorted(torch.cat(first[:5])[:, 0].tolist()) == list(range(0, 120, 3))  # each row once an epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_loader_pins_batches_for_asynchronous_copies():
    loader = RowLoader(np.zeros((16, 4), dtype=np.uint16), 4, 0, pin_memory=True)
    assert loader.next_batch().is_pinned()
