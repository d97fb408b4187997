"""Masked LM variants: static masking (BERT), whole-word masking, and agreement with transformers' collator."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig, TrainConfig
from model.objectives import get_objective, preset
from model.objectives.mlm import IGNORE, MaskingConfig, mask_tokens, select_words
from tests.conftest import SPECIALS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SPECIAL_IDS = list(SPECIALS.values())


def _stream(n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, 300, size=rng.integers(20, 90)) for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint16), np.concatenate([[0], np.cumsum([len(d) for d in docs])])


def test_presets_select_the_variant_and_explicit_settings_win():
    assert preset("mlm-static") == {"static_masking": True}
    assert preset("mlm-wwm", {"whole_word": False}) == {"whole_word": False}
    assert get_objective("mlm-wwm") is get_objective("mlm")


def test_static_masking_stores_k_differently_masked_copies():
    tokens, offsets = _stream()
    cfg = TrainConfig(seq_len=32, static_masking=True, static_copies=4)
    dynamic = get_objective("mlm").make_examples(tokens, offsets, TrainConfig(seq_len=32), SPECIALS)
    rows = get_objective("mlm").make_examples(tokens, offsets, cfg, SPECIALS, np.ones(300, dtype=bool))
    assert rows.shape == (4 * len(dynamic), 64) and rows.dtype == np.uint16
    ids, labels = rows[:, :32].astype(np.int64), rows[:, 32:].astype(np.int64)
    original = np.repeat(dynamic, 4, axis=0).astype(np.int64)
    selected = labels != SPECIALS["pad"]
    assert (labels[selected] == original[selected]).all()
    assert (ids[~selected] == original[~selected]).all(), "a token outside the mask was changed"
    assert abs(selected.mean() / (original > 4).mean() - 0.15) < 0.02
    copies = selected.reshape(len(dynamic), 4, 32)
    assert not (copies[:, 0] == copies[:, 1]).all(axis=1).all(), "the copies share one mask"
    again = get_objective("mlm").make_examples(tokens, offsets, cfg, SPECIALS, np.ones(300, dtype=bool))
    assert np.array_equal(rows, again), "static masks must be reproducible from the seed"


def test_static_masks_are_the_ones_trained_on():
    tokens, offsets = _stream()
    cfg = TrainConfig(seq_len=32, static_masking=True, static_copies=2)
    rows = torch.from_numpy(get_objective("mlm").make_examples(tokens, offsets, cfg, SPECIALS, np.ones(300, dtype=bool))
                            .astype(np.int64))
    model = get_objective("mlm").build(ModelConfig.from_name("tiny", vocab_size=300, max_seq_len=64), cfg, SPECIALS)
    ids, labels, _ = model.corrupt(rows, torch.Generator().manual_seed(0))
    ids2, labels2, _ = model.corrupt(rows, torch.Generator().manual_seed(1))
    assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
    assert ((labels != IGNORE) == (rows[:, 32:] != SPECIALS["pad"])).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 0.5))
def test_whole_word_masking_selects_whole_words(seed, prob):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(400, generator=g) < 0.4  # vocabulary: 40% word starts
    ids = torch.randint(5, 400, (16, 128), generator=g)
    ids[:, 0] = SPECIALS["cls"]
    ids[:, -5:] = SPECIALS["pad"]
    corrupted, labels = mask_tokens(ids, SPECIAL_IDS, SPECIALS["mask"], 400, MaskingConfig(prob), g, starts)
    selected = labels != IGNORE
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    assert not selected[special].any()
    is_start = starts[ids] | special
    is_start[:, 1:] |= special[:, :-1]
    # A continuation token is selected exactly when the token before it (same word) is.
    cont = ~is_start[:, 1:]
    assert torch.equal(selected[:, 1:][cont], selected[:, :-1][cont])


def test_whole_word_rate_is_about_the_mask_rate_of_words():
    g = torch.Generator().manual_seed(0)
    starts = torch.zeros(400, dtype=torch.bool)
    starts[::3] = True
    ids = torch.randint(5, 400, (64, 256), generator=g)
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    chosen = select_words(ids, starts, special, 0.15, lambda shape: torch.rand(shape, generator=g))
    words = (starts[ids] & ~special)
    word_rate = (chosen & words).sum() / words.sum()
    assert abs(word_rate.item() - 0.15) < 0.01


def test_word_starts_from_a_trained_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from model.data import word_starts

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the masking of whole words keeps subword pieces together in pretraining"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tok.json"))
    table = word_starts(tmp_path / "tok.json")
    enc = tok.encode(" masking pretraining")
    flags = [bool(table[i]) for i in enc.ids]
    assert flags[0] and enc.tokens[0].startswith("\u0120")
    assert all(flags[i] == enc.tokens[i].startswith("\u0120") for i in range(len(flags)))


def test_masking_statistics_match_transformers_collator():
    """Same input, same rates: ours and DataCollatorForLanguageModeling select and replace alike."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{f"w{i}": i for i in range(5, 1000)}}
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                                  pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                  sep_token="[SEP]", mask_token="[MASK]")
    collator = transformers.DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (512, 256), generator=g)
    ids[:, 0], ids[:, 128], ids[:, -16:] = SPECIALS["cls"], SPECIALS["sep"], SPECIALS["pad"]
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))

    def rates(corrupted, labels):
        sel = labels != IGNORE
        n = sel.sum().item()
        return {"selected": n / (~special).sum().item(), "special_selected": sel[special].sum().item(),
                "mask": ((corrupted == 4) & sel).sum().item() / n,
                "unchanged": ((corrupted == ids) & sel).sum().item() / n}

    torch.manual_seed(0)
    theirs = rates(*collator.torch_mask_tokens(ids.clone(), special_tokens_mask=special))
    ours = rates(*mask_tokens(ids, SPECIAL_IDS, 4, 1000, MaskingConfig(), g))
    assert ours["special_selected"] == theirs["special_selected"] == 0
    n = 0.15 * (~special).sum().item()
    for key, p in (("selected", 0.15), ("mask", 0.8), ("unchanged", 0.1)):
        tolerance = 4 * (2 * p * (1 - p) / (n if key != "selected" else (~special).sum().item())) ** 0.5  # 4 sigma
        assert abs(ours[key] - theirs[key]) < tolerance, (key, ours, theirs)
        assert abs(ours[key] - p) < tolerance, (key, ours)


def test_whole_word_table_is_read_only_when_masking_needs_it(tmp_path):
    """A whole-word checkpoint loads for fine-tuning or export where its examples are gone; training says what is missing."""
    cfg = TrainConfig(seq_len=32, whole_word=True, data_dir=str(tmp_path))
    model = get_objective("mlm").build(ModelConfig.from_name("tiny", vocab_size=300, max_seq_len=64), cfg, SPECIALS)
    rows = torch.randint(5, 300, (2, 32))
    with pytest.raises(FileNotFoundError, match="whole-word masking needs .*word_starts.npy"):
        model(rows, torch.Generator().manual_seed(0))
    from model.data import WORD_STARTS_FILE

    np.save(tmp_path / WORD_STARTS_FILE, np.arange(300) % 3 == 0)
    _, labels, _ = model.corrupt(rows, torch.Generator().manual_seed(0))
    assert (labels != IGNORE).any()
