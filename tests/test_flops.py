"""FLOPs are counted fairly: every objective's estimate agrees with PyTorch's own FLOP counter,
and training can stop at a FLOP budget so that objectives are compared at equal compute."""
import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import ModelConfig, TrainConfig
from model.objectives import OBJECTIVES, get_objective, preset
from tests.conftest import SPECIALS

SPECIALS_T5 = {**SPECIALS, "sentinel": 5, "sentinel_last": 36}
SEQ = 64


def example_rows(objective: str, cfg: TrainConfig, vocab: int = 1000, n: int = 8) -> torch.Tensor:
    """`n` rows made by the objective's own example maker from a random multi-document stream."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(40, vocab, size=rng.integers(40, 200)) for _ in range(60)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    starts = np.zeros(vocab, dtype=bool)
    starts[::2] = True
    rows = get_objective(objective).make_examples(tokens, offsets, cfg, SPECIALS_T5, starts)
    return torch.from_numpy(rows[:n].astype(np.int64))


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_flop_estimate_matches_torch_flop_counter(objective):
    """Within 10% of FlopCounterMode over one forward + backward (SDPA forced to its math path,
    which the counter sees as matmuls; the fused CPU kernel is invisible to it)."""
    obj = get_objective(objective)
    cfg = TrainConfig(objective=objective, seq_len=SEQ, **preset(objective))
    model = obj.build(ModelConfig.from_name("tiny", arch=obj.ARCH, vocab_size=1000, max_seq_len=2 * SEQ), cfg, SPECIALS_T5)
    rows = example_rows(objective, cfg)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = model(rows, torch.Generator().manual_seed(0))
        loss.backward()
    measured = counter.get_total_flops() / (len(rows) * SEQ)
    estimate = model.flops_per_token(SEQ)
    assert abs(estimate / measured - 1) < 0.10, f"{objective}: estimate {estimate:,.0f} vs counted {measured:,.0f} per token"


def test_training_stops_at_the_flop_budget(tmp_path):
    from model.train import train
    from tests.test_train import _config, _rows

    _rows(tmp_path, "clm")
    probe = _config(tmp_path, "clm", max_steps=1, eval_interval=1)
    per_step = get_objective("clm").build(probe.model, probe).flops_per_token(32) * 16 * 32
    cfg = _config(tmp_path, "clm", max_steps=10_000, max_flops=12.5 * per_step, eval_interval=4, log_interval=4)
    summary = train(cfg)
    assert summary["steps"] == 12
    assert summary["pretrain_flops"] == pytest.approx(12 * per_step)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flops = [r["train/flops"] for r in rows if "val/loss" in r]
    assert flops == pytest.approx([4 * per_step, 8 * per_step, 12 * per_step])
