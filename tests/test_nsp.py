"""Next sentence prediction (BERT) and sentence order prediction (ALBERT): examples, loss, FLOPs, export."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, TrainConfig, to_dict
from model.data import save_rows
from model.hf import export_hf
from model.objectives import get_objective
from model.objectives import nsp
from model.objectives.mlm import IGNORE
from tests.conftest import SPECIALS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 1200


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(lengths=(40, 25, 7, 60, 12, 33, 3, 90, 18, 51)):
    """Document k holds the tokens 100 (k + 1) + position: each token names its document and place."""
    tokens = np.concatenate([100 * (k + 1) + np.arange(n) for k, n in enumerate(lengths)]).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return tokens, offsets


def _examples(objective, seq_len=16, seed=0):
    return nsp.make_examples(*_stream(), TrainConfig(objective=objective, seq_len=seq_len, seed=seed), SPECIALS)


def _segments(row):
    """(A, B, label) of a row `[CLS] A [SEP] B [SEP] pad... label`."""
    body, label = row[:-1], int(row[-1])
    assert body[0] == SPECIALS["cls"]
    seps = np.flatnonzero(body == SPECIALS["sep"])
    assert len(seps) == 2, body
    assert (body[seps[1] + 1:] == SPECIALS["pad"]).all()
    return body[1:seps[0]].astype(int), body[seps[0] + 1:seps[1]].astype(int), label


def _contiguous(span):
    return len(span) > 0 and (np.diff(span) == 1).all() and len(set(span // 100)) == 1


def _model(objective="nsp", seed=0, **train):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", arch="encoder", vocab_size=VOCAB, max_seq_len=64)
    return nsp.build(cfg, TrainConfig(objective=objective, **train), SPECIALS)


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_rows_are_exactly_balanced_and_well_formed(objective):
    for seed in range(3):
        rows = _examples(objective, seed=seed)
        assert rows.shape[1] == 17 and rows.dtype == np.uint16 and len(rows) > 20
        assert rows[:, -1].sum() * 2 == len(rows)
        labels = rows[:, -1]
        assert labels.min() == 0 and labels.max() == 1
        for row in rows:
            a, b, _ = _segments(row)
            assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= 16 - 3
    # The order of positives and negatives is shuffled, not alternating.
    assert not (rows[:, -1] == np.arange(len(rows)) % 2).all()
    assert not (_examples(objective, seed=0)[:, -1] == _examples(objective, seed=1)[:, -1]).all()


def test_nsp_negatives_take_b_from_another_document():
    rows = _examples("nsp")
    for row in rows:
        a, b, label = _segments(row)
        assert _contiguous(a) and _contiguous(b)
        if label == 1:
            assert b[0] == a[-1] + 1, "a positive's B continues A"
        else:
            assert b[0] // 100 != a[0] // 100, "a negative's B comes from another document"


def test_sop_negatives_are_the_in_order_pair_swapped():
    rows = _examples("sop")
    n_neg = 0
    for row in rows:
        first, second, label = _segments(row)
        assert _contiguous(first) and _contiguous(second)
        assert first[0] // 100 == second[0] // 100, "both segments come from the same document"
        if label == 1:
            assert second[0] == first[-1] + 1
        else:
            n_neg += 1
            assert first[0] == second[-1] + 1, "a negative is [CLS] B [SEP] A [SEP]"
    assert n_neg == len(rows) // 2


def test_segments_cover_each_document_chunk_in_order():
    rows = _examples("sop", seq_len=16)
    covered = []
    for row in rows:
        first, second, label = _segments(row)
        covered.extend(np.concatenate([first, second] if label else [second, first]))
    # Every chunk appears once, in order (only the odd last chunk may be missing).
    tokens = _stream()[0].astype(int)
    assert covered == sorted(covered) and len(set(covered)) == len(covered)
    assert len(tokens) - len(covered) <= 13


def test_token_types_follow_the_first_sep():
    ids = torch.tensor([[2, 10, 11, 3, 12, 13, 3, 0, 0]])
    assert nsp.token_types(ids, SPECIALS["sep"]).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]


def test_specials_and_padding_are_never_selected_for_mlm():
    model = _model(mask_prob=0.5)
    rows = torch.from_numpy(_examples("nsp").astype(np.int64))
    ids = rows[:, :-1]
    special = torch.isin(ids, torch.tensor(list(SPECIALS.values())))
    assert (ids == SPECIALS["pad"]).any() and (ids == SPECIALS["sep"]).any()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        corrupted, labels = model.corrupt(ids, g)
        selected = labels != IGNORE
        assert selected.any() and not selected[special].any()
        assert (corrupted[special] == ids[special]).all()


def test_mlm_weight_zero_trains_the_sentence_task_alone(monkeypatch):
    model = _model(mlm_weight=0.0).eval()
    rows = torch.from_numpy(_examples("nsp").astype(np.int64))

    def no_head(*args, **kwargs):
        raise AssertionError("the MLM head ran with mlm_weight=0")

    monkeypatch.setattr(model.head, "forward", no_head)
    loss, stats = model(rows, torch.Generator().manual_seed(0))
    ids = rows[:, :-1]
    with torch.no_grad():
        hidden = model.backbone(ids, ids != 0, nsp.token_types(ids, SPECIALS["sep"]))
        expected = F.cross_entropy(model.sentence_logits(hidden), 1 - rows[:, -1])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert "masked_accuracy" not in stats and stats["n_predicted"] == len(rows)
    assert model.flops_per_token(16) < _model(mlm_weight=1.0).flops_per_token(16)


def test_mlm_weight_scales_the_mlm_loss():
    rows = torch.from_numpy(_examples("nsp").astype(np.int64))
    losses = {}
    for w in (0.0, 1.0, 3.0):
        model = _model(mlm_weight=w).eval()
        with torch.no_grad():
            losses[w], stats = model(rows, torch.Generator().manual_seed(0))
    mlm = losses[1.0] - losses[0.0]
    assert mlm > 1.0 and torch.allclose(losses[3.0] - losses[0.0], 3 * mlm, rtol=1e-4)
    assert stats["n_predicted"] > len(rows)


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_tiny_model_overfits_a_tiny_batch(objective):
    model = _model(objective)
    rows = torch.from_numpy(_examples(objective)[:8].astype(np.int64))
    assert rows[:, -1].sum() not in (0, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(80):
        loss, stats = model(rows, torch.Generator().manual_seed(0))  # the same masks every step
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.3 * first, (first, loss.item())
    assert stats["sentence_accuracy"] == 1.0 and stats["masked_accuracy"] == 1.0


@pytest.mark.parametrize("mlm_weight", [1.0, 0.0])
def test_flops_per_token_matches_the_flop_counter(mlm_weight):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(mlm_weight=mlm_weight)
    rows = torch.from_numpy(_examples("nsp", seq_len=32).astype(np.int64))
    seq_len = rows.shape[1] - 1
    # FlopCounterMode does not see the CPU flash-attention kernel; the math backend runs the same
    # attention as matmuls it counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model(rows, torch.Generator().manual_seed(0))
        loss.backward()
    measured = counter.get_total_flops() / (len(rows) * seq_len)
    predicted = model.flops_per_token(seq_len)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_export_matches_bert_for_pretraining(tmp_path, objective):
    transformers = pytest.importorskip("transformers")
    model = _model(objective).eval()
    # Move every parameter off its initial value so a wrong mapping cannot hide behind ones / zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, objective, tmp_path / "hf", None, SPECIALS)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    hf = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "BertForPreTraining"
    rows = torch.from_numpy(_examples(objective, seq_len=40)[:4].astype(np.int64))
    ids = rows[:, :-1]
    mask = (ids != SPECIALS["pad"]).long()
    types = nsp.token_types(ids, SPECIALS["sep"])
    assert (mask == 0).any() and (types[mask.bool()] == 1).any()
    with torch.no_grad():
        mlm, sent = model.logits(ids, mask, types)
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (mlm[real] - out.prediction_logits[real]).abs().max().item() < 1e-4
    assert (sent - out.seq_relationship_logits).abs().max().item() < 1e-4


def test_nsp_needs_two_documents():
    from model.config import ConfigError

    tokens = np.arange(10, 60, dtype=np.uint16)
    with pytest.raises(ConfigError, match="two documents"):
        nsp.make_examples(tokens, np.array([0, 50]), TrainConfig(objective="nsp", seq_len=16), SPECIALS)
    # Order prediction needs no second document.
    assert len(nsp.make_examples(tokens, np.array([0, 50]), TrainConfig(objective="sop", seq_len=16), SPECIALS))


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_trains_through_the_trainer(tmp_path, objective):
    from model.train import train

    rng = np.random.default_rng(0)
    docs = [np.tile(np.minimum(5 + rng.zipf(1.3, size=rng.integers(3, 8)), 255), 12)[:60] for _ in range(200)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    rows = get_objective(objective).make_examples(tokens, offsets, TrainConfig(objective=objective, seq_len=32),
                                                  SPECIALS)
    save_rows(tmp_path / "data" / "train.npy", rows[40:])
    save_rows(tmp_path / "data" / "validation.npy", rows[:40])
    cfg = TrainConfig(objective=objective, model=ModelConfig.from_name("tiny", arch="encoder", vocab_size=256,
                                                                       max_seq_len=64),
                      data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=16,
                      max_steps=30, warmup_steps=5, eval_interval=30, eval_batches=2, log_interval=10, lr=3e-3,
                      specials=SPECIALS, num_threads=1)
    summary = train(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses[-1] < losses[0] and np.isfinite(summary["val/loss"])
    assert 0 <= summary["val/sentence_accuracy"] <= 1 and "val/masked_accuracy" in summary
    assert json.loads(json.dumps(to_dict(cfg)))["objective"] == objective
