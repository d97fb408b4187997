"""T5 span corruption: the examples, the encoder-decoder, its FLOP count and its Hugging Face export."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ConfigError, ModelConfig, TrainConfig
from model.data import save_rows
from model.hf import ExportError, export_hf
from model.objectives import get_objective
from model.objectives.t5 import span_widths, split_row
from tests.conftest import SPECIALS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

T5 = get_objective("t5")
SENTINELS = {**SPECIALS, "sentinel": 5, "sentinel_last": 36}
FIRST_WORD = 37  # ordinary tokens start after the sentinels


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seq_len: int = 32, vocab: int = 300, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", arch=T5.ARCH, vocab_size=vocab, max_seq_len=64, **overrides)
    return T5.build(cfg, TrainConfig(seq_len=seq_len), SENTINELS)


def _stream(rng: np.random.Generator, n_docs: int, vocab: int = 1000):
    lengths = rng.integers(1, 200, size=n_docs)
    tokens = rng.integers(FIRST_WORD, vocab, size=int(lengths.sum())).astype(np.uint16)
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


def _uncorrupt(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Each sentinel in the inputs replaced by what follows the same sentinel in the targets."""
    s0, s1 = SENTINELS["sentinel"], SENTINELS["sentinel_last"]
    spans, current = {}, None
    for t in targets[:-1]:  # the last target token is EOS
        if s0 <= t <= s1:
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs[:-1]:  # so is the last input token
        out.extend(spans.pop(int(t)) if s0 <= t <= s1 else [int(t)])
    assert not spans, "a target span has no sentinel in the inputs"
    return out


# -- examples ---------------------------------------------------------------------------------------

def test_widths_match_t5():
    # T5's compute_input_and_target_lengths(512, 0.15, 3) = (568 raw tokens, 114 targets).
    w = span_widths(512, 0.15, 3.0)
    assert (w.raw, w.inputs, w.targets, w.noise, w.spans) == (568, 512, 114, 85, 28)
    for seq_len in range(8, 300):
        assert span_widths(seq_len, 0.15, 3.0).inputs == seq_len


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.integers(8, 150), n_docs=st.integers(1, 20))
def test_inputs_and_targets_reconstruct_the_raw_span(seed, seq_len, n_docs):
    tokens, offsets = _stream(np.random.default_rng(seed), n_docs)
    cfg = TrainConfig(seq_len=seq_len, seed=seed)
    w = span_widths(seq_len, cfg.noise_density, cfg.mean_span)
    rows = T5.make_examples(tokens, offsets, cfg, SENTINELS)
    stream = np.insert(tokens, offsets[1:], SENTINELS["sep"])
    assert rows.shape == (len(stream) // w.raw, seq_len + w.targets) and rows.dtype == np.uint16
    for i, row in enumerate(rows):
        inputs, targets = row[:seq_len], row[seq_len:]
        assert inputs[-1] == targets[-1] == SENTINELS["sep"]
        assert _uncorrupt(inputs, targets) == list(stream[i * w.raw : (i + 1) * w.raw])
        sentinels = targets[(targets >= 5) & (targets <= 36)]
        assert list(sentinels) == list(range(5, 5 + w.spans)), "sentinels are not 0, 1, 2, ... in order"
        assert list(inputs[(inputs >= 5) & (inputs <= 36)]) == list(sentinels)


def test_noise_fraction_and_span_lengths():
    tokens, offsets = _stream(np.random.default_rng(0), 2000)
    cfg = TrainConfig(seq_len=128)
    w = span_widths(128, 0.15, 3.0)
    rows = T5.make_examples(tokens, offsets, cfg, SENTINELS)
    targets = rows[:, 128:-1]
    is_sentinel = (targets >= 5) & (targets <= 36)
    noise = (~is_sentinel).sum(axis=1)  # ordinary tokens and document [SEP]s
    assert (noise == w.noise).all() and abs(w.noise / w.raw - 0.15) <= 0.5 / w.raw
    # Span lengths: the runs of noise tokens after each sentinel in the targets.
    span_id = np.cumsum(is_sentinel, axis=1) - 1 + np.arange(len(rows))[:, None] * w.spans
    lengths = np.bincount(span_id[~is_sentinel], minlength=len(rows) * w.spans)
    assert lengths.min() >= 1 and is_sentinel.sum() == len(rows) * w.spans
    assert abs(lengths.mean() - 3.0) < 0.05
    assert lengths.std() > 1.0, "span lengths should vary (random segmentation)"
    # Every row has its own mask; the same seed gives the same rows, another seed other rows.
    where = (rows[:, :128] >= 5) & (rows[:, :128] <= 36)
    assert len({r.tobytes() for r in where}) > len(rows) * 0.99
    assert np.array_equal(rows, T5.make_examples(tokens, offsets, cfg, SENTINELS))
    assert not np.array_equal(rows, T5.make_examples(tokens, offsets, TrainConfig(seq_len=128, seed=1), SENTINELS))


def test_too_few_sentinels_is_a_config_error():
    tokens, offsets = _stream(np.random.default_rng(0), 10)
    few = {**SPECIALS, "sentinel": 5, "sentinel_last": 10}  # 6 sentinels; seq_len 128 needs 7 spans
    with pytest.raises(ConfigError, match="tokenizer.sentinels to at least 7"):
        T5.make_examples(tokens, offsets, TrainConfig(seq_len=128), few)
    with pytest.raises(ConfigError, match="tokenizer.sentinels"):
        T5.make_examples(tokens, offsets, TrainConfig(seq_len=128), SPECIALS)  # no sentinels at all
    assert len(T5.make_examples(tokens, offsets, TrainConfig(seq_len=64), few)) > 0  # 3 spans fit


# -- model ------------------------------------------------------------------------------------------

def test_t5_initialisation():
    model = _model()
    d, d_kv, d_ff = 128, 64, 512
    blk = model.decoder.blocks[0]
    assert abs(model.encoder.tok_emb.weight.std().item() - 1.0) < 0.02
    assert model.decoder.tok_emb is model.encoder.tok_emb and model.backbone is model.encoder
    assert abs(blk.attn.qkv.weight[:d].std().item() - (d * d_kv) ** -0.5) < 0.1 * (d * d_kv) ** -0.5
    assert abs(blk.cross.kv.weight.std().item() - d ** -0.5) < 0.05 * d ** -0.5
    assert abs(blk.mlp.proj.weight.std().item() - d_ff ** -0.5) < 0.05 * d_ff ** -0.5
    assert abs(model.decoder.rel_bias.weight.std().item() - d ** -0.5) < 0.3 * d ** -0.5


def test_decoder_is_causal():
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST_WORD, 300, (2, 32), generator=g)
    dec = torch.randint(FIRST_WORD, 300, (2, 12), generator=g)
    changed = dec.clone()
    changed[:, 6:] = torch.randint(FIRST_WORD, 300, (2, 6), generator=g)
    with torch.no_grad():
        a, b = model.logits(ids, None, dec), model.logits(ids, None, changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_tiny_model_overfits_a_fixed_batch():
    tokens, offsets = _stream(np.random.default_rng(0), 4, vocab=300)
    rows = torch.from_numpy(T5.make_examples(tokens, offsets, TrainConfig(seq_len=32), SENTINELS)[:4].astype(np.int64))
    model = _model()
    loss, stats = model(rows)
    assert stats["n_predicted"] == rows.shape[0] * span_widths(32, 0.15, 3.0).targets
    assert loss.item() > 3.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(150):
        loss, stats = model(rows)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # accuracy is an evaluation statistic
        _, stats = model(rows)
    assert loss.item() < 0.05 and stats["token_accuracy"].item() == 1.0


def test_flops_per_token_matches_the_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    seq_len = 64
    model = _model(seq_len, vocab=1000, n_layers=2, n_decoder_layers=3)
    w = span_widths(seq_len, 0.15, 3.0)
    rows = torch.randint(FIRST_WORD, 1000, (2, w.inputs + w.targets))
    # FlopCounterMode does not see CPU's fused SDPA kernel; the math backend runs the same
    # attention as plain matmuls, which it counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model(rows)
        loss.backward()
    measured = counter.get_total_flops() / (rows.shape[0] * seq_len)
    assert abs(model.flops_per_token(seq_len) / measured - 1) < 0.10, (model.flops_per_token(seq_len), measured)


def test_rows_of_another_width_are_refused():
    with pytest.raises(ValueError, match="re-run the examples stage"):
        _model()(torch.randint(FIRST_WORD, 300, (2, 33)))
    inputs, targets = split_row(np.zeros((3, 40)), TrainConfig(seq_len=32))
    assert inputs.shape == (3, 32) and targets.shape == (3, 8)


# -- export -----------------------------------------------------------------------------------------

def test_export_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(n_decoder_layers=3).eval()
    with torch.no_grad():  # away from the initial values, so that a wrong mapping cannot hide behind ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, "t5", tmp_path / "hf", None, SENTINELS)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["decoder_start_token_id"] == config["pad_token_id"] == 0 and config["num_decoder_layers"] == 3
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_WORD, 300, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # encoder padding: the decoder must not read it
    ids[1, 30:] = SENTINELS["pad"]
    dec = torch.randint(5, 300, (3, 12), generator=g)
    dec[:, 0] = 0
    with torch.no_grad():
        ours = model.logits(ids, mask, dec)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        loss, _ = model(torch.cat([ids[[0, 2], :32], dec[[0, 2], 1:9]], dim=1))
        hf_loss = hf(input_ids=ids[[0, 2], :32], labels=dec[[0, 2], 1:9]).loss  # labels shifted right inside
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"
    assert abs(loss.item() - hf_loss.item()) < 1e-4


def test_export_refuses_non_stock_architecture(tmp_path):
    with pytest.raises(ExportError, match="activation"):
        export_hf(_model(activation="gelu"), "t5", tmp_path / "hf", None, SENTINELS)


# -- trainer ----------------------------------------------------------------------------------------

def _train(tmp_path, max_steps: int):
    from model.train import train

    rng = np.random.default_rng(0)
    docs = [np.tile(np.minimum(FIRST_WORD + rng.zipf(1.3, size=rng.integers(3, 8)), 255), 12)[:60] for _ in range(300)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    rows = T5.make_examples(tokens, offsets, TrainConfig(seq_len=32), SENTINELS)
    save_rows(tmp_path / "data" / "train.npy", rows[len(rows) // 10 :])
    save_rows(tmp_path / "data" / "validation.npy", rows[: len(rows) // 10])
    cfg = TrainConfig(objective="t5", model=ModelConfig.from_name("tiny", arch="encoder-decoder", vocab_size=256,
                                                                  max_seq_len=64),
                      data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=16,
                      max_steps=max_steps, warmup_steps=5, eval_interval=20, eval_batches=4, log_interval=10,
                      lr=3e-3, specials=SENTINELS, num_threads=1)
    return train(cfg), rows


def test_trainer_trains_span_corruption_end_to_end(tmp_path):
    from model.checkpoint import load_pretrained

    summary, rows = _train(tmp_path, 40)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 4 and losses[-1] < np.log(256) - 2.5, losses  # far below the untrained (uniform) loss
    assert summary["val/loss"] < np.log(256) - 1.5 and 0 < summary["val/token_accuracy"] <= 1
    model, saved = load_pretrained(tmp_path / "run" / "checkpoint")
    assert saved.objective == "t5"
    assert model.backbone(torch.from_numpy(rows[:2, :32].astype(np.int64))).shape == (2, 32, 128)


def test_trainer_counts_encoder_input_tokens_and_flops(tmp_path):
    # A row is seq_len input tokens + the targets; throughput and FLOPs count the input tokens.
    summary, _ = _train(tmp_path, 2)
    model = _model(vocab=256)
    assert summary["tokens_seen"] == 2 * 16 * 32
    assert summary["pretrain_flops"] == pytest.approx(2 * 16 * 32 * model.flops_per_token(32))
