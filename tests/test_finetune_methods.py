"""Fine-tuning methods: what each trains and what it leaves alone, text pairs, and a learnable task."""
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from model.config import ConfigError, ModelConfig
from model.finetune import FinetuneConfig, encode, finetune, random_backbone
from tests.conftest import SPECIALS

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    return tok


def toy_splits(n_labels=3, pairs=False, seed=0):
    """Label = which third of the vocabulary a text draws its words from: learnable from any layer."""
    rng = random.Random(seed)
    group = len(WORDS) // n_labels

    def text(label):
        return " ".join(rng.choice(WORDS[label * group:(label + 1) * group]) for _ in range(12))

    def split(n):
        ys = [i % n_labels for i in range(n)]
        texts = [text(y) for y in ys]
        return (texts, ys, [text(rng.randrange(n_labels)) for _ in ys]) if pairs else (texts, ys)

    return {"train": split(96), "validation": split(48), "test": split(48)}


def backbone(tokenizer, arch="encoder"):
    return random_backbone(ModelConfig.from_name("tiny", arch=arch, vocab_size=tokenizer.get_vocab_size()), 0)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, after, prefix):
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_full_finetuning_learns_a_learnable_task(tokenizer, one_thread):
    out = finetune(backbone(tokenizer), tokenizer, SPECIALS, toy_splits(), 3,
                   FinetuneConfig(method="full", epochs=4, lr=2e-3, batch_size=16))
    assert out["curve"][-1]["val_accuracy"] >= 0.9
    acc = sum(p == y for p, y in zip(out["predictions"]["test"], out["labels"]["test"])) / 48
    assert acc >= 0.9 and out["info"]["trainable_params"] == out["info"]["total_params"]


def test_freeze_keeps_embeddings_and_lower_blocks_fixed(tokenizer, one_thread):
    bb = backbone(tokenizer)
    before = snapshot(bb)
    out = finetune(bb, tokenizer, SPECIALS, toy_splits(), 3, FinetuneConfig(method="freeze", freeze_layers=1, epochs=1, lr=1e-3))
    after = snapshot(bb)
    assert out["info"]["frozen_layers"] == 1
    assert not changed(before, after, "tok_emb") and not changed(before, after, "pos_emb")
    assert not changed(before, after, "blocks.0.")
    assert changed(before, after, "blocks.1.")  # the upper block trains
    assert out["info"]["trainable_params"] < out["info"]["total_params"]
    with pytest.raises(ConfigError, match="freeze_layers=5 but the model has 2 layers"):
        finetune(backbone(tokenizer), tokenizer, SPECIALS, toy_splits(), 3, FinetuneConfig(method="freeze", freeze_layers=5))


def test_probe_trains_only_a_linear_map_on_frozen_features(tokenizer, one_thread):
    bb = backbone(tokenizer)
    before = snapshot(bb)
    out = finetune(bb, tokenizer, SPECIALS, toy_splits(), 3, FinetuneConfig(method="probe", epochs=30, lr=1e-2))
    assert not changed(before, snapshot(bb), "")
    assert out["info"]["trainable_params"] == 128 * 3 + 3  # d_model x labels + bias
    assert len(out["curve"]) == 30 and out["curve"][-1]["val_accuracy"] >= 0.9  # random features separate this task


def test_probe_reuses_features_it_is_given(tokenizer, one_thread):
    cfg = FinetuneConfig(method="probe", epochs=5, lr=1e-2)
    first = finetune(backbone(tokenizer), tokenizer, SPECIALS, toy_splits(), 3, cfg)
    broken = backbone(tokenizer)
    torch.nn.init.zeros_(broken.tok_emb.weight)  # features from this backbone would all be equal
    again = finetune(broken, tokenizer, SPECIALS, toy_splits(), 3, cfg, features=first["features"])
    assert again["predictions"] == first["predictions"] and again["curve"] == first["curve"]


def test_lora_trains_adapters_and_leaves_the_base_weights(tokenizer, one_thread):
    bb = backbone(tokenizer, "decoder")
    before = snapshot(bb)
    out = finetune(bb, tokenizer, SPECIALS, toy_splits(), 3,
                   FinetuneConfig(method="lora", lora_r=4, lora_alpha=8, epochs=2, lr=3e-3))
    after = {k.replace(".base_layer", ""): v for k, v in snapshot(bb).items() if "lora_" not in k}
    assert not changed(before, after, "")
    lora = {k: v for k, v in snapshot(bb).items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())  # B starts at zero: these moved
    # r x (in + out) per adapted matrix: qkv (128 -> 384) and proj (128 -> 128) in each of 2 layers
    adapters = 2 * (4 * (128 + 384) + 4 * (128 + 128))
    assert out["info"]["trainable_params"] == adapters + 128 * 3 + 3


def test_text_pairs_are_encoded_with_segments_and_truncated_longest_first(tokenizer):
    cfg = ModelConfig.from_name("tiny", arch="encoder", vocab_size=tokenizer.get_vocab_size())
    ((ids, seg),) = encode(["alpha beta"], tokenizer, cfg, SPECIALS, 16, pairs=["gamma"])
    vocab = tokenizer.get_vocab()
    assert ids == [SPECIALS["cls"], vocab["alpha"], vocab["beta"], SPECIALS["sep"], vocab["gamma"], SPECIALS["sep"]]
    assert seg == [0, 0, 0, 0, 1, 1]
    ((ids, seg),) = encode([" ".join(["alpha"] * 20)], tokenizer, cfg, SPECIALS, 12, pairs=["gamma gamma"])
    assert len(ids) == 12 and ids.count(vocab["gamma"]) == 2  # the long side was cut, not the short one
    dec = ModelConfig.from_name("tiny", arch="decoder", vocab_size=tokenizer.get_vocab_size())
    ((ids, _),) = encode(["alpha"], tokenizer, dec, SPECIALS, 16, pairs=["beta"])
    assert ids == [vocab["alpha"], SPECIALS["sep"], vocab["beta"], SPECIALS["sep"]]  # no [CLS] for a decoder


def test_pair_task_trains_end_to_end(tokenizer, one_thread):
    out = finetune(backbone(tokenizer), tokenizer, SPECIALS, toy_splits(pairs=True), 3,
                   FinetuneConfig(method="full", epochs=3, lr=2e-3, batch_size=16))
    assert len(out["predictions"]["test"]) == 48 and out["curve"][-1]["val_accuracy"] > 0.5


def test_bad_method_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match="unknown fine-tuning method 'adapterz'; choose one of full, freeze, probe, lora"):
        FinetuneConfig(method="adapterz")
    with pytest.raises(ConfigError, match="lora_targets"):
        FinetuneConfig(method="lora", lora_targets="everything")
