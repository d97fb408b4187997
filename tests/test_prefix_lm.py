"""Prefix LM (UniLM / T5): bidirectional prefix, causal rest, loss only after the prefix; export and FLOPs."""
import json
import os

import numpy as np
import pytest
import torch

from model.config import ModelConfig, TrainConfig
from model.data import save_rows
from model.hf import export_hf
from model.objectives import clm, get_objective, prefix_lm
from model.objectives.mlm import IGNORE
from tests.conftest import SPECIALS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 300


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, perturb=False):
    torch.manual_seed(seed)
    model = prefix_lm.build(ModelConfig.from_name("tiny", arch="decoder", vocab_size=VOCAB, max_seq_len=64), None,
                            SPECIALS).eval()
    if perturb:  # off the initial values, so a wrong mapping cannot hide behind ones / zeros
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(b=2, t=20, seed=1):
    return torch.randint(5, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_examples_are_the_clm_rows():
    tokens = np.arange(10, 110, dtype=np.uint16)
    offsets = np.array([0, 30, 55, 90, 100])
    cfg = TrainConfig(objective="prefix-lm", seq_len=16)
    rows = prefix_lm.make_examples(tokens, offsets, cfg, SPECIALS)
    assert np.array_equal(rows, clm.make_examples(tokens, offsets, cfg, SPECIALS)) and rows.shape[1] == 17
    assert get_objective("prefix-lm") is prefix_lm and prefix_lm.ARCH == "decoder"


def test_attention_is_bidirectional_inside_the_prefix_only():
    model = _model(perturb=True)
    ids, p = _ids(), 10
    with torch.no_grad():
        base = model.logits(ids, prefix_len=p)
        for k in (3, 7, 9):  # inside the prefix: earlier positions see the change
            changed = ids.clone()
            changed[:, k] = (changed[:, k] + 1 - 5) % (VOCAB - 5) + 5
            out = model.logits(changed, prefix_len=p)
            assert (out[:, :k] - base[:, :k]).abs().amax() > 1e-3, f"position < {k} did not see prefix token {k}"
        for k in (10, 14, 19):  # after the prefix: causal, earlier positions are untouched
            changed = ids.clone()
            changed[:, k] = (changed[:, k] + 1 - 5) % (VOCAB - 5) + 5
            out = model.logits(changed, prefix_len=p)
            assert torch.equal(out[:, :k], base[:, :k]), f"an earlier position saw token {k} after the prefix"
            assert (out[:, k:] - base[:, k:]).abs().amax() > 1e-3


def test_prefix_attention_pattern():
    allowed = prefix_lm.prefix_attention(torch.tensor([1, 3]), 5)
    assert allowed.shape == (2, 1, 5, 5)
    assert torch.equal(allowed[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())  # p = 1 is causal
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(allowed[1, 0], expected.bool())


def _reachable(allowed: torch.Tensor) -> torch.Tensor:
    """Which inputs can reach which positions through any number of attention layers."""
    reach = allowed.clone()
    for _ in range(allowed.shape[-1]):
        reach = (reach.float() @ reach.float() > 0) | reach
    return reach


def test_no_loss_target_is_visible_and_every_unseen_one_is_scored():
    t = 24
    p, allowed, scored = prefix_lm.draw_prefix(64, t, torch.Generator().manual_seed(0), torch.device("cpu"))
    reach = _reachable(allowed[:, 0])
    for b in range(64):
        for i in range(t):
            # Position i predicts row token i + 1, which is input position i + 1 (if any).
            visible = i + 1 < t and bool(reach[b, i, i + 1])
            assert bool(scored[b, i]) == (not visible), (int(p[b]), i)
        assert int(scored[b].sum()) == t - int(p[b]) + 1


def test_leakage_end_to_end():
    """Changing the target of any scored position never changes that position's logits."""
    model = _model(perturb=True)
    t = 16
    rows = torch.randint(5, VOCAB, (3, t + 1), generator=torch.Generator().manual_seed(2))
    p, _, scored = prefix_lm.draw_prefix(3, t, torch.Generator().manual_seed(5), torch.device("cpu"))
    with torch.no_grad():
        base = model.logits(rows[:, :-1], prefix_len=p)
        for i in range(t - 1):
            changed = rows.clone()
            changed[:, i + 1] = (changed[:, i + 1] + 1 - 5) % (VOCAB - 5) + 5
            out = model.logits(changed[:, :-1], prefix_len=p)
            moved = (out[:, i] - base[:, i]).abs().amax(-1) > 0
            assert not (moved & scored[:, i]).any(), f"position {i} saw its own target"
            assert (moved == ~scored[:, i]).all()  # inside the prefix it does see the next token


def test_forward_scores_only_after_the_prefix(monkeypatch):
    model = _model()
    rows = torch.randint(5, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    seen = {}
    original = prefix_lm.draw_prefix

    def spy(*args, **kwargs):
        seen["p"], seen["attn"], seen["scored"] = out = original(*args, **kwargs)
        return out

    monkeypatch.setattr(prefix_lm, "draw_prefix", spy)
    with torch.no_grad():
        loss, stats = model(rows, torch.Generator().manual_seed(0))
        logits = model.logits(rows[:, :-1], prefix_len=seen["p"])
    labels = rows[:, 1:].masked_fill(~seen["scored"], IGNORE)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert int(stats["n_predicted"]) == sum(16 - int(p) + 1 for p in seen["p"])


def test_prefix_lengths_are_in_range_and_vary():
    g = torch.Generator().manual_seed(0)
    p = torch.cat([prefix_lm.draw_prefix(256, 32, g, torch.device("cpu"))[0] for _ in range(8)])
    assert p.min() == 1 and p.max() == 31 and len(p.unique()) == 31
    counts = torch.bincount(p, minlength=32)[1:].float()
    assert counts.min() > 0.4 * counts.mean()  # roughly uniform
    a, b = (prefix_lm.draw_prefix(64, 32, g, torch.device("cpu"))[0] for _ in range(2))
    assert not torch.equal(a, b)


def test_tiny_model_overfits_a_tiny_batch():
    model = _model().train()
    rows = torch.randint(5, VOCAB, (8, 33), generator=torch.Generator().manual_seed(0))
    loss, _ = model(rows, torch.Generator().manual_seed(0))
    assert abs(loss.item() - np.log(VOCAB)) < 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss, stats = model(rows, g)  # a fresh prefix length every step
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # accuracy is an evaluation statistic
        _, stats = model(rows, g)
    assert loss.item() < 1.0 and stats["next_token_accuracy"] > 0.8


def test_flops_per_token_matches_the_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _model()
    rows = torch.randint(5, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0))
    # FlopCounterMode does not see the CPU flash-attention kernel; the math backend runs the same
    # attention as matmuls it counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model(rows, torch.Generator().manual_seed(0))
        loss.backward()
    measured = counter.get_total_flops() / (4 * 32)
    predicted = model.flops_per_token(32)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_export_loads_and_matches_with_a_one_token_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(perturb=True)
    export_hf(model, "prefix-lm", tmp_path / "hf", None, SPECIALS)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(3, 40)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        ours = model.logits(ids, mask, prefix_len=1)
        longer = model.logits(ids, mask, prefix_len=10)
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4
    # A longer prefix is what the causal export cannot express.
    assert (longer[real] - theirs[real]).abs().max().item() > 1e-3


def test_trains_through_the_trainer(tmp_path):
    from model.train import train

    rng = np.random.default_rng(0)
    docs = [np.tile(np.minimum(5 + rng.zipf(1.3, size=rng.integers(3, 8)), 255), 12)[:60] for _ in range(200)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    rows = prefix_lm.make_examples(tokens, offsets, TrainConfig(seq_len=32), SPECIALS)
    save_rows(tmp_path / "data" / "train.npy", rows[40:])
    save_rows(tmp_path / "data" / "validation.npy", rows[:40])
    cfg = TrainConfig(objective="prefix-lm",
                      model=ModelConfig.from_name("tiny", arch="decoder", vocab_size=256, max_seq_len=64),
                      data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=16,
                      max_steps=30, warmup_steps=5, eval_interval=30, eval_batches=2, log_interval=10, lr=3e-3,
                      specials=SPECIALS, num_threads=1)
    summary = train(cfg)
    assert summary["val/loss"] < np.log(256) - 1.5
    assert 0 < summary["val/next_token_accuracy"] <= 1
