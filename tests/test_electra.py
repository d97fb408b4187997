"""ELECTRA: exports load as stock ElectraForPreTraining / ElectraForMaskedLM, labels are exact, the
generator is trained by its own loss only, the FLOP count matches a measured step, and it trains."""
import json
import os

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import ConfigError, ModelConfig, TrainConfig
from model.data import save_rows
from model.hf import ExportError, export_hf
from model.objectives import PRESETS, get_objective
from tests.conftest import SPECIALS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
electra = get_objective("electra")
PRESET = PRESETS["electra"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab: int = 300, seq: int = 64, seed: int = 0, **train):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", arch=electra.ARCH, vocab_size=vocab, max_seq_len=seq)
    return electra.build(cfg, TrainConfig(objective="electra", **{**PRESET, **train}), SPECIALS)


def _rows(b: int, t: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, vocab, (b, t), generator=g)
    rows[:, 0] = SPECIALS["cls"]
    rows[:, t // 3::t // 3] = SPECIALS["sep"]
    rows[1::3, t - t // 4:] = SPECIALS["pad"]  # some rows padded at the end
    return rows


def test_generator_is_a_narrow_encoder_on_the_shared_embeddings():
    model = _model()
    g, d = model.gen_cfg, model.cfg
    assert (g.d_model, g.n_heads, g.d_ff, g.n_layers, g.embed_size) == (32, 1, 128, d.n_layers, d.d_model)
    base = electra.generator_config(ModelConfig.from_name("base"), 0.25)
    assert (base.d_model, base.n_heads, base.d_ff) == (192, 3, 768)
    with pytest.raises(ConfigError, match="generator_ratio"):
        electra.generator_config(d, 0.0)
    with pytest.raises(ConfigError, match="static_masking"):
        _model(static_masking=True)


def test_exports_load_as_stock_electra_and_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model().eval()
    # Move every parameter off its initial value so a wrong mapping cannot hide behind ones / zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, "electra", tmp_path / "hf", None, SPECIALS)
    disc, disc_info = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    gen, gen_info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf" / "generator",
                                                                      output_loading_info=True)
    assert type(disc).__name__ == "ElectraForPreTraining" and type(gen).__name__ == "ElectraForMaskedLM"
    for info in (disc_info, gen_info):
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert gen.electra.embeddings_project.weight.shape == (32, 128)
    # The generator's output layer is the (shared) word embedding table.
    assert torch.equal(gen.generator_lm_head.weight, model.backbone.tok_emb.weight)
    disc.eval(), gen.eval()
    ids = torch.randint(5, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    real = mask.bool()
    with torch.no_grad():
        pairs = [(model.logits(ids, mask), disc(input_ids=ids, attention_mask=mask).logits),
                 (model.generator_logits(ids, mask), gen(input_ids=ids, attention_mask=mask).logits)]
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape
        diff = (ours[real] - theirs[real]).abs().max().item()
        assert diff < 1e-4, f"max abs logit difference {diff}"


def test_export_refuses_a_model_without_token_types(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, max_seq_len=64, n_segments=0)
    with pytest.raises(ExportError, match="n_segments"):
        export_hf(electra.build(cfg, None, SPECIALS), "electra", tmp_path / "hf", None, SPECIALS)


def test_labels_are_exactly_the_replaced_tokens_at_selected_positions():
    # A small vocabulary makes the untrained generator often sample the original token back,
    # which must then be labelled original.
    vocab = 24
    model = _model(vocab=vocab, seq=256)
    rows = _rows(64, 256, vocab)
    special = torch.isin(rows, torch.tensor(list(SPECIALS.values())))
    with torch.no_grad():
        c = model.corrupt(rows, torch.Generator().manual_seed(0))
    assert not c.selected[special].any(), "a special or padding token was selected"
    assert abs(c.selected.sum().item() / (~special).sum().item() - 0.15) < 0.01
    assert (c.gen_input[c.selected] == SPECIALS["mask"]).all()  # the preset: [MASK] only
    assert torch.equal(c.gen_input[~c.selected], rows[~c.selected])
    assert torch.equal(c.replaced, c.disc_input != rows)
    assert not (c.replaced & ~c.selected).any(), "a token changed outside the selected positions"
    assert torch.equal(c.disc_input[~c.selected], rows[~c.selected])
    kept = c.selected & ~c.replaced
    assert kept.sum() > 50 and c.replaced.sum() > 1000  # both cases occur, so the checks above bite
    assert torch.equal(c.attention, rows != SPECIALS["pad"])
    _, stats = model(rows, torch.Generator().manual_seed(0))
    assert stats["n_predicted"] == (rows != SPECIALS["pad"]).sum().item()
    assert stats["replaced_fraction"].item() == pytest.approx(c.replaced.sum().item() / c.attention.sum().item())


def test_generator_gets_no_gradient_from_the_discriminator_loss_and_shares_embeddings():
    model = _model()
    bb, gb = model.backbone, model.gen_backbone
    for ours, theirs in ((gb.tok_emb, bb.tok_emb), (gb.pos_emb, bb.pos_emb), (gb.seg_emb, bb.seg_emb),
                         (gb.emb_norm, bb.emb_norm), (model.gen_head.embedding, bb.tok_emb)):
        assert ours.weight.data_ptr() == theirs.weight.data_ptr()
    disc_ids = {id(p) for p in bb.parameters()}
    gen_only = {n: p for n, p in model.named_parameters() if n.startswith(("gen_backbone.", "gen_head."))
                and id(p) not in disc_ids}
    assert "gen_backbone.emb_proj.weight" in gen_only and "gen_head.dense.weight" in gen_only
    rows = _rows(8, 64, 300)

    _, disc_loss, _ = model.losses(rows, torch.Generator().manual_seed(0))
    disc_loss.backward()
    for n, p in gen_only.items():
        assert p.grad is None or not p.grad.any(), f"{n} got a gradient from the discriminator loss"
    assert bb.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and bb.tok_emb.weight.grad.abs().sum() > 0
    assert model.disc_head.dense.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    gen_loss, _, _ = model.losses(rows, torch.Generator().manual_seed(0))
    gen_loss.backward()  # the check above can fail: the generator's own loss does reach these
    assert all(p.grad is not None and p.grad.any() for p in gen_only.values())
    assert bb.blocks[0].attn.qkv.weight.grad is None


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = _model(vocab=64, seq=32)
    rows = _rows(4, 32, 64, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss, stats = model(rows, torch.Generator().manual_seed(0))  # same masks every step: a fixed batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or {k: float(stats[k]) for k in ("gen_loss", "disc_loss")} | {"loss": loss.item()}
    model.eval()
    with torch.no_grad():
        loss, stats = model(rows, torch.Generator().manual_seed(0))
    assert loss.item() < 0.1 * first["loss"], (first, loss.item())
    assert stats["disc_loss"] < 0.05 and stats["disc_accuracy"] > 0.95, stats
    assert stats["gen_loss"] < 0.25 * first["gen_loss"], (first, stats)


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_flops_per_token_matches_a_measured_training_step(ratio):
    vocab, seq, batch = 1000, 64, 4
    model = _model(vocab=vocab, seq=seq, generator_ratio=ratio)
    rows = torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = SPECIALS["cls"]
    # FlopCounterMode does not count the fused CPU attention kernel (it reports 0 for it); the
    # math backend runs the same attention as counted matmuls, so the scores are measured too.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model(rows, torch.Generator().manual_seed(0))
        loss.backward()
    measured = counter.get_total_flops() / (batch * seq)
    predicted = model.flops_per_token(seq)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)
    if ratio == 1.0:  # a generator as wide as the discriminator: leaving it out would be far off
        disc_only = model.backbone.flops_per_token(seq) + model.disc_head.flops_per_token()
        assert disc_only / measured < 0.7


def test_model_train_runs_electra(tmp_path):
    from model.checkpoint import load_pretrained
    from model.train import train

    rng = np.random.default_rng(0)
    docs = [np.tile(np.minimum(5 + rng.zipf(1.3, size=rng.integers(3, 8)), 255), 12)[:60] for _ in range(200)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    cfg = TrainConfig(objective="electra", model=ModelConfig.from_name("tiny", vocab_size=256, max_seq_len=64),
                      data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=16,
                      max_steps=20, warmup_steps=2, eval_interval=10, eval_batches=2, log_interval=10, lr=3e-3,
                      specials=SPECIALS, num_threads=1, **PRESET)
    rows = electra.make_examples(tokens, offsets, cfg, SPECIALS)
    assert rows.shape[1] == 32 and rows.dtype == np.uint16 and (rows[:, 0] == SPECIALS["cls"]).all()
    save_rows(tmp_path / "data" / "train.npy", rows[20:])
    save_rows(tmp_path / "data" / "validation.npy", rows[:20])
    summary = train(cfg)
    for key in ("val/loss", "val/disc_accuracy", "val/gen_accuracy", "val/replaced_fraction", "val/gen_loss"):
        assert np.isfinite(summary[key]), key
    assert 0.05 < summary["val/replaced_fraction"] < 0.2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in lines if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    model, loaded = load_pretrained(tmp_path / "run" / "checkpoint")  # strict load with the tied tables
    assert loaded.objective == "electra" and model.gen_backbone.tok_emb is model.backbone.tok_emb
