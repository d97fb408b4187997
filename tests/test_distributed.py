"""Several processes, for real: `torchrun` with the gloo backend on the CPU (two processes, one thread each).

Two processes with the same global batch train exactly like one (the same rows, the same masks, the
gradients of the same global mean); a two-process run stopped by SIGTERM resumes with one process at
the same place in the data; a rank that crashes fails the Prefect task with that rank's error; FSDP2
trains and writes the one-process checkpoint format.
"""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from model.checkpoint import CheckpointManager, load_pretrained, verify
from model.config import ConfigError, TrainConfig, to_dict
from model.data import RowLoader
from model.train import train
from tasks.tracking import read_metric_rows
from tasks.training import TrainingFailed, launch_command, pretrain
from tests.conftest import ROOT
from tests.test_train import _config, _rows

RTOL = 1e-4  # float rounding only: a sum over two processes' tokens adds in another order


def _write(tmp_path, name: str, objective: str = "mlm", **changes) -> TrainConfig:
    """A tiny config under `<tmp>/<name>.json` training into `<tmp>/<name>/` (dropout off: see _seed_dropout)."""
    settings = dict(max_steps=12, log_interval=1, eval_interval=6, batch_size=16, grad_accum_steps=2,
                    out_dir=str(tmp_path / name))
    cfg = _config(tmp_path, objective, **{**settings, **changes})
    (tmp_path / f"{name}.json").write_text(json.dumps(to_dict(cfg)))
    return cfg


def _torchrun(tmp_path, name: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "model.train", "--config", str(tmp_path / f"{name}.json")]


def _run(cmd) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _curve(run_dir, key: str = "train/loss") -> dict[int, float]:
    if not (run_dir / "metrics.jsonl").exists():  # not started yet
        return {}
    return {r["step"]: r[key] for r in read_metric_rows(run_dir / "metrics.jsonl") if key in r}


def _assert_same_curves(got_dir, expected_dir, steps=None) -> None:
    for key in ("train/loss", "val/loss"):
        got, expected = _curve(got_dir, key), _curve(expected_dir, key)
        wanted = sorted(s for s in expected if steps is None or s in steps)
        assert wanted and [s for s in sorted(got) if s in wanted] == wanted, (key, sorted(got))
        np.testing.assert_allclose([got[s] for s in wanted], [expected[s] for s in wanted], rtol=RTOL, err_msg=key)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_two_processes_with_the_same_global_batch_give_the_loss_curve_of_one(tmp_path, objective):
    _rows(tmp_path, objective)
    train(_write(tmp_path, "one", objective))
    _write(tmp_path, "two", objective, nproc_per_node=2)
    out = _run(_torchrun(tmp_path, "two"))
    assert "2 processes (ddp)" in out.stderr
    _assert_same_curves(tmp_path / "two", tmp_path / "one")
    # Rank 0 alone writes: each step logged once, one summary that knows the world size.
    steps = [r["step"] for r in read_metric_rows(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 12 * 2 * 16 * 32
    assert json.loads((tmp_path / "two" / "checkpoint" / "train_state.json").read_text())["position"] == \
        json.loads((tmp_path / "one" / "checkpoint" / "train_state.json").read_text())["position"]


def test_a_two_process_run_stopped_by_sigterm_resumes_with_one_process_at_the_same_data_position(tmp_path):
    steps = 60  # long enough that the SIGTERM lands mid-run
    _rows(tmp_path, "mlm")
    settings = dict(max_steps=steps, eval_interval=20, checkpoint_interval=1000)
    train(_write(tmp_path, "reference", **settings))
    _write(tmp_path, "run", nproc_per_node=2, **settings)
    proc = subprocess.Popen(_torchrun(tmp_path, "run"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while max(_curve(tmp_path / "run"), default=0) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both ranks
    _, err = proc.communicate(timeout=60)
    assert "stopped by SIGTERM" in err
    latest = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    stopped = json.loads((latest / "train_state.json").read_text())["step"]
    assert 3 <= stopped < steps and not (tmp_path / "run" / "checkpoint").exists()
    assert max(_curve(tmp_path / "run")) == stopped  # both ranks stopped after the same step, and it was saved
    # The saved position counts global samples: where one process would be after `stopped` steps.
    one = RowLoader(np.load(tmp_path / "data" / "train.npy", mmap_mode="r"), 16, 0)
    for _ in range(stopped * 2):  # two micro-batches per step
        one.next_batch()
    assert json.loads((latest / "dataloader.json").read_text()) == {"epoch": one.state.epoch,
                                                                     "position": one.state.position}

    _write(tmp_path, "run", nproc_per_node=1, **settings)  # the same run, resumed by one process
    out = _run([sys.executable, "-m", "model.train", "--config", str(tmp_path / "run.json")])
    assert f"resuming from {latest}" in out.stderr.replace("\n", "")
    _assert_same_curves(tmp_path / "run", tmp_path / "reference", steps=range(stopped + 1, steps + 1))
    ref_w = safetensors.torch.load_file(str(tmp_path / "reference" / "checkpoint" / "model.safetensors"))
    got_w = safetensors.torch.load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(ref_w[k], got_w[k], rtol=1e-3, atol=1e-5) for k in ref_w)


def test_a_crashing_rank_fails_the_task_with_that_ranks_error(tmp_path, workspace, monkeypatch):
    _rows(tmp_path, "mlm")
    cfg = _write(tmp_path, "crash", nproc_per_node=2)
    monkeypatch.setenv("PRETRAIN_FAIL_AT", "1:3")  # the test hook in model.train: rank 1 raises at step 3
    with pytest.raises(TrainingFailed) as failed:
        pretrain.fn(to_dict(cfg), None, None)
    message = str(failed.value)
    assert "rank 1: RuntimeError: injected failure on rank 1 at step 3" in message, message
    assert "Connection closed" not in message  # rank 0's consequence, not the cause
    assert not (tmp_path / "crash" / "checkpoint").exists()


def test_fsdp2_trains_like_one_process_and_writes_the_one_process_checkpoint(tmp_path, workspace):
    _rows(tmp_path, "mlm")
    train(_write(tmp_path, "one"))
    cfg = _write(tmp_path, "fsdp", nproc_per_node=2, parallelism="fsdp", activation_checkpointing=True)
    result = pretrain.fn(to_dict(cfg), None, None)  # torchrun under the Prefect task, then export
    assert result["summary"]["parallelism"] == "fsdp" and result["summary"]["world_size"] == 2
    _assert_same_curves(tmp_path / "fsdp", tmp_path / "one")
    # Gathered full tensors, in the very files a one-process run writes: any world size can resume it.
    for name in ("checkpoint", "checkpoints/step-0000012"):
        verify(tmp_path / "fsdp" / name)
    for file in ("model.safetensors", "optimizer.safetensors"):
        one = safetensors.torch.load_file(str(tmp_path / "one" / "checkpoints" / "step-0000012" / file))
        two = safetensors.torch.load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-0000012" / file))
        assert one.keys() == two.keys()
        assert all(torch.allclose(one[k], two[k], rtol=1e-3, atol=1e-6) for k in one)
    model, loaded = load_pretrained(tmp_path / "fsdp" / "checkpoint")
    assert loaded.parallelism == "fsdp" and (tmp_path / "fsdp" / "hf" / "model.safetensors").exists()


def test_launch_command_and_one_line_errors():
    single = TrainConfig(out_dir="/runs/a")
    assert launch_command(to_dict(single), "c.json", "logs")[1:] == ["-m", "model.train", "--config", "c.json"]
    multi = to_dict(TrainConfig(out_dir="/runs/a", nproc_per_node=4, nnodes=2, rdzv_endpoint="10.0.0.1:29400"))
    cmd = launch_command(multi, "c.json", "logs")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" not in cmd
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "10.0.0.1:29400" and cmd[cmd.index("--nnodes") + 1] == "2"
    assert "--standalone" in launch_command(to_dict(TrainConfig(nproc_per_node=2)), "c.json", "logs")
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        TrainConfig(batch_size=15, nproc_per_node=2)
    with pytest.raises(ConfigError, match="needs train.rdzv_endpoint"):
        TrainConfig(nnodes=2)
    with pytest.raises(ConfigError, match="use ddp or fsdp"):
        TrainConfig(parallelism="zero3")
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        RowLoader(np.zeros((64, 8), dtype=np.uint16), 16, 0, rank=0, world=3)
