"""Training faults, really injected: SIGKILL and SIGTERM on `python -m model.train`, corrupted and
half-written checkpoints, a write quota hit while saving, non-finite losses."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from model import checkpoint as ckpt
from model.checkpoint import CheckpointError, CheckpointManager, save_checkpoint, verify
from model.config import ModelConfig, TrainConfig, to_dict
from model.objectives import get_objective
from model.train import train
from tasks.tracking import read_metric_rows
from tests.conftest import ROOT
from tests.test_train import _config, _rows

STEPS, EVERY = 40, 8


def _resumable_config(tmp_path, name: str, **changes) -> TrainConfig:
    # Dropout on, two micro-batches per step: the global RNG, the masking generator, the data
    # position and the accumulation all have to come back for the losses to match bit for bit.
    settings = dict(max_steps=STEPS, checkpoint_interval=EVERY, eval_interval=EVERY, log_interval=1,
                    grad_accum_steps=2, batch_size=8, out_dir=str(tmp_path / name))
    cfg = _config(tmp_path, "mlm", **{**settings, **changes})
    cfg.model.dropout = 0.1
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(to_dict(cfg)))
    return cfg


def _start(tmp_path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model.train", "--config", str(tmp_path / f"{name}.json")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run_dir) -> dict[int, float]:
    rows = read_metric_rows(run_dir / "metrics.jsonl")  # skips a line still being written
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def _wait_for_step(proc, run_dir, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(f"training did not reach step {step}")


@pytest.fixture
def reference(tmp_path):
    _rows(tmp_path, "mlm")
    _resumable_config(tmp_path, "reference")
    proc = _start(tmp_path, "reference")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return tmp_path / "reference"


def _kill_and_resume(tmp_path, name: str, kill_at: int, tamper=None):
    _resumable_config(tmp_path, name)
    proc = _start(tmp_path, name)
    _wait_for_step(proc, tmp_path / name, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / name / "checkpoint").exists()  # it really died before the end
    if tamper:
        tamper(tmp_path / name)
    proc = _start(tmp_path, name)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming from" in err
    return tmp_path / name


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference):
    kill_at = random.Random().randint(EVERY + 1, STEPS - 2)
    resumed = _kill_and_resume(tmp_path, "killed", kill_at)
    expected, got = _losses(reference), _losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected, f"killed at step {kill_at}"
    ref_w, got_w = _weights(reference), _weights(resumed)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    summary = json.loads((resumed / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] <= kill_at


def test_resume_without_the_data_position_differs(tmp_path, reference):
    """The negative control: the comparison above can fail. Rewind the saved data position (and
    re-seal the checkpoint so it still verifies) and the resumed losses are no longer the same."""

    def rewind_data_position(run_dir):
        for step_dir in CheckpointManager(run_dir / "checkpoints").valid():
            (step_dir / "dataloader.json").write_text(json.dumps({"epoch": 0, "position": 0}))
            ckpt.seal(step_dir)

    resumed = _kill_and_resume(tmp_path, "rewound", 2 * EVERY + 2, tamper=rewind_data_position)
    expected, got = _losses(reference), _losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == expected[s] for s in range(1, 2 * EVERY + 1))
    assert any(got[s] != expected[s] for s in range(2 * EVERY + 1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_exits_within_seconds(tmp_path):
    _rows(tmp_path, "mlm")
    _resumable_config(tmp_path, "term", checkpoint_interval=1000, eval_interval=1000)
    cfg_path = tmp_path / "term.json"
    data = json.loads(cfg_path.read_text())
    data["max_steps"] = 100_000
    cfg_path.write_text(json.dumps(data))
    proc = _start(tmp_path, "term")
    _wait_for_step(proc, tmp_path / "term", 5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.time() - sent < 10
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    latest = CheckpointManager(tmp_path / "term" / "checkpoints").latest()
    assert latest is not None
    step = json.loads((latest / "train_state.json").read_text())["step"]
    assert step >= 5 and max(_losses(tmp_path / "term")) == step


def _run_to_end(tmp_path, name="full", **changes) -> TrainConfig:
    _rows(tmp_path, "mlm")
    cfg = _resumable_config(tmp_path, name, **changes)
    train(cfg)
    return cfg


def test_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    cfg = _run_to_end(tmp_path, keep_checkpoints=3)
    manager = CheckpointManager(tmp_path / "full" / "checkpoints")
    newest, previous = manager.valid()[-1], manager.valid()[-2]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupted"):
        assert manager.latest() == previous
    # A half-written save (killed before its marker) is never picked either.
    (tmp_path / "full" / "checkpoints" / f".{manager.path_for(STEPS + 8).name}.tmp").mkdir()
    half = manager.path_for(STEPS + 16)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="incomplete"):
        assert manager.latest() == previous
    assert cfg.max_steps == STEPS


def test_retention_keeps_the_last_k_and_the_best_never_the_only_valid_one(tmp_path):
    _run_to_end(tmp_path, keep_checkpoints=2)
    manager = CheckpointManager(tmp_path / "full" / "checkpoints", keep_last=2)
    kept = manager.valid()
    states = {p.name: json.loads((p / "train_state.json").read_text()) for p in kept}
    last_two = {manager.path_for(STEPS - EVERY).name, manager.path_for(STEPS).name}
    assert last_two <= set(states)
    assert len(kept) <= 3
    metrics = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    best_step = min((r for r in metrics if "val/loss" in r), key=lambda r: r["val/loss"])["step"]
    assert manager.path_for(best_step).name in states

    # Corrupt every checkpoint but the oldest: pruning must keep that only valid one.
    for p in kept[1:]:
        (p / "train_state.json").write_text("{}")
    manager.prune()
    assert manager.valid() == [kept[0]]


def test_a_write_quota_hit_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    cfg = TrainConfig(model=ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=16))
    model = get_objective("mlm").build(cfg.model, cfg)
    target = tmp_path / "checkpoint"
    save_checkpoint(target, model, cfg, {"step": 1})
    before = (target / "model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # A file-size quota smaller than the weights: writing them fails with EFBIG, as on a full disk.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(CheckpointError, match="free disk space"):
            save_checkpoint(target, model, cfg, {"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    verify(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert json.loads((target / "train_state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary debris


class _NanAt(torch.nn.Module):
    """Wraps an objective: its loss is NaN on the given steps (counted in micro-batches)."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def forward(self, rows, generator=None):
        loss, stats = self.inner(rows, generator)
        if not self.training:
            return loss, stats
        self.calls += 1
        return (loss * float("nan") if self.calls in self.bad_calls else loss), stats

    def flops_per_token(self, seq_len):
        return self.inner.flops_per_token(seq_len)


@pytest.fixture
def nan_on_step_5(monkeypatch):
    objective = get_objective("mlm")
    build = objective.build
    # Step 5 is micro-batches 9 and 10 (two per step).
    monkeypatch.setattr(objective, "build", lambda *a, **k: _NanAt(build(*a, **k), {9}))


def test_nonfinite_loss_stops_the_run_and_writes_no_nan_checkpoint(tmp_path, nan_on_step_5):
    _rows(tmp_path, "mlm")
    cfg = _resumable_config(tmp_path, "nan", checkpoint_interval=1, log_interval=4)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
        train(cfg)
    manager = CheckpointManager(tmp_path / "nan" / "checkpoints")
    steps = [json.loads((p / "train_state.json").read_text())["step"] for p in manager.valid()]
    assert steps and max(steps) == 4
    for p in manager.valid():
        weights = safetensors.torch.load_file(str(p / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_loss_is_skipped_when_configured(tmp_path, nan_on_step_5):
    _rows(tmp_path, "mlm")
    cfg = _resumable_config(tmp_path, "skip", nonfinite="skip")
    summary = train(cfg)
    assert summary["skipped_steps"] == 1
    weights = _weights(tmp_path / "skip")
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/skipped_nonfinite" in r] == [5]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = _run_to_end(tmp_path)
    cfg.lr = cfg.lr * 2
    with pytest.raises(Exception, match="was made with lr="):
        train(cfg)
    cfg.lr, cfg.resume = cfg.lr / 2, False
    with pytest.raises(Exception, match="set resume: true"):
        train(cfg)
    assert os.path.exists(tmp_path / "full" / "checkpoint")


def test_repeated_kills_during_saves_always_leave_a_valid_checkpoint(tmp_path, reference):
    """Checkpoint every step, so most kills land inside a save; each time the newest checkpoint that
    verifies is a real one, and after all the kills the run still ends bit-identical."""
    _resumable_config(tmp_path, "hammered", checkpoint_interval=1)
    run_dir, rng = tmp_path / "hammered", random.Random()
    for kill_at in sorted(rng.sample(range(3, STEPS - 2), 4)):
        proc = _start(tmp_path, "hammered")
        _wait_for_step(proc, run_dir, kill_at)
        time.sleep(rng.uniform(0.0, 0.03))  # a step logs, then saves: land somewhere in that
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (run_dir / "checkpoint").exists()  # killed before the end
        latest = CheckpointManager(run_dir / "checkpoints").latest()
        verify(latest)
        assert json.loads((latest / "train_state.json").read_text())["step"] >= kill_at - 1
    proc = _start(tmp_path, "hammered")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert _losses(run_dir) == _losses(reference)
    ref_w, got_w = _weights(reference), _weights(run_dir)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
