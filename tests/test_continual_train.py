"""Continual pretraining in the trainer: `train.init_from` starts from an earlier run and counts on."""
import json
import shutil

import pytest
import safetensors.torch
import torch

from model.config import ConfigError
from model.train import train
from tasks.tracking import read_metric_rows
from tests.test_train import _config, _rows


def _first_run(tmp_path):
    _rows(tmp_path, "clm")
    cfg = _config(tmp_path, "clm", max_steps=20, eval_interval=10, log_interval=5, out_dir=str(tmp_path / "v1"))
    return cfg, train(cfg)


@pytest.mark.parametrize("init_optimizer", ["restore", "fresh"])
def test_continuing_counts_steps_tokens_and_flops_on_from_the_earlier_run(tmp_path, init_optimizer):
    first_cfg, first = _first_run(tmp_path)
    start = tmp_path / "v1" / "checkpoints" / "step-0000020"
    cfg = _config(tmp_path, "clm", max_steps=10, eval_interval=5, log_interval=1, out_dir=str(tmp_path / "v2"),
                  init_from=str(start), init_optimizer=init_optimizer)
    second = train(cfg)

    assert second["steps"] == 30 and second["run_steps"] == 10 and second["init_step"] == 20
    assert second["tokens_seen"] == pytest.approx(first["tokens_seen"] * 1.5)
    assert second["pretrain_flops"] == pytest.approx(first["pretrain_flops"] * 1.5)
    steps = [r["step"] for r in read_metric_rows(tmp_path / "v2" / "metrics.jsonl")]
    assert min(steps) == 21 and max(steps) == 30  # one curve with the earlier run's
    state = json.loads((tmp_path / "v2" / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 30 and state["init"]["optimizer"] == ("restored" if init_optimizer == "restore" else "fresh")
    assert (tmp_path / "v2" / "checkpoints" / "step-0000030").is_dir()
    # The schedule warms up again from this run's first step (the earlier run ended at its minimum rate).
    lrs = [r["train/lr"] for r in read_metric_rows(tmp_path / "v2" / "metrics.jsonl") if "train/lr" in r]
    assert lrs[0] == pytest.approx(cfg.lr * 2 / cfg.warmup_steps) and max(lrs) == pytest.approx(cfg.lr)


def test_continuing_starts_from_the_earlier_weights_not_from_scratch(tmp_path):
    _first_run(tmp_path)
    start = tmp_path / "v1" / "checkpoints" / "step-0000020"
    from_earlier = train(_config(tmp_path, "clm", max_steps=1, eval_interval=1, log_interval=1, lr=1e-9,
                                 out_dir=str(tmp_path / "v2"), init_from=str(start)))
    scratch = train(_config(tmp_path, "clm", max_steps=1, eval_interval=1, log_interval=1, lr=1e-9,
                            out_dir=str(tmp_path / "v3")))
    before = json.loads((start / "train_state.json").read_text())["last_eval"]["val/loss"]
    # With a negligible learning rate one step changes nothing: the loss is the earlier model's, far below scratch's.
    assert from_earlier["val/loss"] == pytest.approx(before, abs=1e-3)
    assert from_earlier["val/loss"] < scratch["val/loss"] - 0.5
    w1 = safetensors.torch.load_file(str(start / "model.safetensors"))
    w2 = safetensors.torch.load_file(str(tmp_path / "v2" / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_a_continued_run_killed_midway_resumes_at_its_global_step(tmp_path):
    _first_run(tmp_path)
    start = tmp_path / "v1" / "checkpoints" / "step-0000020"
    settings = dict(max_steps=10, eval_interval=5, log_interval=5, out_dir=str(tmp_path / "v2"), init_from=str(start))
    whole = train(_config(tmp_path, "clm", **{**settings, "out_dir": str(tmp_path / "whole")}))
    train(_config(tmp_path, "clm", **settings))
    # As if stopped after step 25: drop what was written later, so that only step 25's checkpoint remains.
    shutil.rmtree(tmp_path / "v2" / "checkpoints" / "step-0000030")
    shutil.rmtree(tmp_path / "v2" / "checkpoint")
    resumed = train(_config(tmp_path, "clm", **settings))
    assert resumed["resumed_from_step"] == 5 and resumed["steps"] == 30
    assert resumed["val/loss"] == pytest.approx(whole["val/loss"], rel=1e-5)


def test_init_from_another_model_or_a_missing_folder_is_one_clear_error(tmp_path):
    _first_run(tmp_path)
    start = tmp_path / "v1" / "checkpoints" / "step-0000020"
    cfg = _config(tmp_path, "clm", out_dir=str(tmp_path / "v2"), init_from=str(start))
    cfg.model.d_model *= 2
    with pytest.raises(ConfigError, match="same objective, model and tokenizer"):
        train(cfg)
    with pytest.raises(ConfigError, match="not a folder"):
        train(_config(tmp_path, "clm", out_dir=str(tmp_path / "v3"), init_from=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="init_optimizer"):
        _config(tmp_path, "clm", init_optimizer="keep").__post_init__()
