"""`python -m model.train` alone (no Prefect, no MLflow): learns, checkpoints atomically, fails clearly."""
import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, load_pretrained, verify
from model.config import ModelConfig, TrainConfig, to_dict
from model.data import save_rows
from model.objectives import get_objective
from tests.conftest import ROOT, SPECIALS


def _rows(tmp_path, objective: str, seq_len: int = 32):
    # A learnable stream: short patterns of Zipf-distributed tokens, repeated. The skewed unigram
    # distribution gives both objectives something to learn within a few dozen steps.
    rng = np.random.default_rng(0)
    docs = [np.tile(np.minimum(4 + rng.zipf(1.3, size=rng.integers(3, 8)), 255), 12)[:60] for _ in range(300)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    rows = get_objective(objective).make_examples(tokens, offsets, TrainConfig(seq_len=seq_len), SPECIALS)
    n_val = len(rows) // 10
    save_rows(tmp_path / "data" / "train.npy", rows[n_val:])
    save_rows(tmp_path / "data" / "validation.npy", rows[:n_val])


def _config(tmp_path, objective: str, **changes) -> TrainConfig:
    arch = get_objective(objective).ARCH
    cfg = TrainConfig(objective=objective, model=ModelConfig.from_name("tiny", arch=arch, vocab_size=256, max_seq_len=64),
                      data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=16,
                      max_steps=60, warmup_steps=5, eval_interval=30, eval_batches=4, log_interval=10, lr=3e-3,
                      specials=SPECIALS, num_threads=1)
    for k, v in changes.items():
        setattr(cfg, k, v)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    return cfg


def _train(tmp_path):
    return subprocess.run([sys.executable, "-m", "model.train", "--config", str(tmp_path / "config.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_train_learns_and_writes_a_verified_checkpoint(tmp_path, objective):
    _rows(tmp_path, objective)
    _config(tmp_path, objective)
    out = _train(tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    vals = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(losses) == 6 and len(vals) == 2
    assert losses[-1] < np.log(256) - 2.0, losses  # far below the untrained (uniform) loss
    assert vals[-1] < np.log(256) - 1.5, vals
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens_seen"] == 60 * 16 * 32  # seq_len input tokens per row, whatever the row layout
    assert summary["pretrain_flops"] > 0 and summary["device"] == "cpu"
    ckpt = tmp_path / "run" / "checkpoint"
    verify(ckpt)
    model, cfg = load_pretrained(ckpt)
    assert cfg.objective == objective and cfg.model.arch == get_objective(objective).ARCH
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 60


def test_a_finished_run_run_again_keeps_its_results_and_speed(tmp_path):
    _rows(tmp_path, "clm")
    _config(tmp_path, "clm", max_steps=10, eval_interval=5)
    assert _train(tmp_path).returncode == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    again = _train(tmp_path)
    assert again.returncode == 0 and "resuming from" in again.stdout + again.stderr
    second = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert second["resumed_from_step"] == 10 and second["val/loss"] == first["val/loss"]
    assert second["throughput/tokens_per_s"] == first["throughput/tokens_per_s"] > 0


def test_corrupted_or_incomplete_checkpoint_is_refused(tmp_path):
    _rows(tmp_path, "clm")
    _config(tmp_path, "clm", max_steps=5, eval_interval=5)
    assert _train(tmp_path).returncode == 0
    ckpt = tmp_path / "run" / "checkpoint"
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted: model.safetensors"):
        load_pretrained(ckpt)
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(ckpt)


def test_missing_examples_fail_in_one_line(tmp_path):
    _config(tmp_path, "mlm")
    out = _train(tmp_path)
    assert out.returncode == 2
    assert "no examples for split 'train'" in out.stderr and "Traceback" not in out.stderr


def test_gpu_path_selects_bf16_autocast_only_on_cuda():
    from model.train import autocast_for, resolve_device

    cfg = TrainConfig()
    device = resolve_device(cfg.device)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = autocast_for(cfg, torch.device("cuda"))()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast_for(cfg, torch.device("cpu"))(), torch.autocast)
