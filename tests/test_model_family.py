"""The model family: one block type, configured as data, for encoders, decoders and encoder-decoders."""
import itertools

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer, relative_position_bucket, sinusoidal_positions


def _ids(b=3, t=24, vocab=200, seed=0):
    return torch.randint(5, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm,norm_kind,position,bias", list(itertools.product(
    ("pre", "post"), ("layer", "rms"), ("learned", "sinusoidal", "relative"), (True, False))))
def test_every_block_option_trains(norm, norm_kind, position, bias):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", arch="encoder", vocab_size=200, max_seq_len=32, norm=norm, norm_kind=norm_kind,
                                position=position, bias=bias)
    model = Transformer(cfg)
    out = model(_ids(), torch.ones(3, 24, dtype=torch.bool))
    assert out.shape == (3, 24, 128) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "seg_emb" not in n)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear)) == (not bias)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "relative"])
def test_causal_output_at_t_ignores_tokens_after_t(position):
    cfg = ModelConfig.from_name("tiny", arch="decoder", vocab_size=200, max_seq_len=32, position=position)
    model = Transformer(cfg).eval()
    a = _ids(t=20)
    b = a.clone()
    b[:, 12:] = _ids(t=8, seed=1)
    with torch.no_grad():
        ya, yb = model(a), model(b)
    assert torch.allclose(ya[:, :12], yb[:, :12], atol=1e-6)
    assert not torch.allclose(ya[:, 12:], yb[:, 12:], atol=1e-3)


def test_encoder_sees_both_directions_and_ignores_padding():
    cfg = ModelConfig.from_name("tiny", arch="encoder", vocab_size=200, max_seq_len=32)
    model = Transformer(cfg).eval()
    a = _ids(t=20)
    b = a.clone()
    b[:, 15] = 7
    mask = torch.ones(3, 20, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(model(a, mask)[:, :5], model(b, mask)[:, :5], atol=1e-4)
        mask[:, 15:] = False  # position 15 is now padding: nothing real may depend on it
        assert torch.allclose(model(a, mask)[:, :15], model(b, mask)[:, :15], atol=1e-6)


def test_sinusoidal_table_is_the_fixed_vaswani_table():
    table = sinusoidal_positions(50, 16)
    assert torch.allclose(table[:, 0], torch.sin(torch.arange(50.0)))
    assert torch.allclose(table[:, 1], torch.cos(torch.arange(50.0)))
    assert torch.allclose(table[7, 14], torch.sin(torch.tensor(7 / 10000 ** (14 / 16))))
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=100, max_seq_len=50, position="sinusoidal"))
    assert "pos_table" not in model.state_dict() and model.pos_emb is None  # fixed, not learned or saved


def test_relative_buckets_are_exact_near_and_logarithmic_far():
    rel = torch.arange(-200, 201)
    b = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert b.min() >= 0 and b.max() < 32
    assert len(set(b[(rel >= 1) & (rel <= 7)].tolist())) == 7  # small distances get their own bucket
    assert (b[rel >= 128] == b[rel == 128]).all()  # beyond max_distance: one bucket
    causal = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert (causal[rel > 0] == 0).all()  # a decoder cannot tell future positions apart (they are masked)


def test_embedding_projection_for_a_narrow_stack():
    cfg = ModelConfig.from_name("tiny", vocab_size=100, max_seq_len=32, d_model=32, n_heads=1, d_ff=128, embed_size=128)
    model = Transformer(cfg)
    assert model.tok_emb.weight.shape == (100, 128) and model.emb_proj.weight.shape == (32, 128)
    assert model(_ids(vocab=100)).shape == (3, 24, 32)
