import numpy as np
import pytest
import torch

from model.config import ConfigError, TrainConfig
from model.objectives import get_objective
from model.objectives.mlm import IGNORE, MaskingConfig, mask_tokens
from tests.conftest import SPECIALS


def test_unknown_objective_is_clear():
    with pytest.raises(ConfigError, match="unknown objective 'bert3'; available objectives: mlm, mlm-static"):
        get_objective("bert3")


def test_bert_masking_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 512), generator=g)
    ids[:, 0] = SPECIALS["cls"]
    ids[:, 100::50] = SPECIALS["sep"]
    ids[:, -20:] = SPECIALS["pad"]
    special = torch.isin(ids, torch.tensor(list(SPECIALS.values())))
    corrupted, labels = mask_tokens(ids, list(SPECIALS.values()), SPECIALS["mask"], 1000, MaskingConfig(), g)
    selected = labels != IGNORE
    assert not selected[special].any(), "a special or padding token was selected"
    assert (corrupted[special] == ids[special]).all()
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.005
    n = selected.sum().item()
    to_mask = (corrupted == SPECIALS["mask"]) & selected
    unchanged = (corrupted == ids) & selected
    random = selected & ~to_mask & ~unchanged
    assert abs(to_mask.sum().item() / n - 0.8) < 0.01
    # A random draw can hit the original token (1 in ~1000), counted as unchanged here.
    assert abs(random.sum().item() / n - 0.1) < 0.01
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01
    assert (labels[selected] == ids[selected]).all()
    assert not torch.isin(corrupted[random], torch.tensor(list(SPECIALS.values()))).any()


def test_masking_rates_are_configurable():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (64, 512), generator=g)
    corrupted, labels = mask_tokens(ids, list(SPECIALS.values()), 4, 1000, MaskingConfig(0.4, 1.0, 0.0), g)
    selected = labels != IGNORE
    assert abs(selected.float().mean().item() - 0.4) < 0.01
    assert (corrupted[selected] == 4).all()


def test_dynamic_masking_differs_per_batch():
    model = get_objective("mlm")
    ids = torch.randint(5, 1000, (4, 128))
    g = torch.Generator().manual_seed(0)
    a = mask_tokens(ids, [0, 1, 2, 3, 4], 4, 1000, MaskingConfig(), g)[1]
    b = mask_tokens(ids, [0, 1, 2, 3, 4], 4, 1000, MaskingConfig(), g)[1]
    assert not torch.equal(a, b) and model.ARCH == "encoder"


def _stream():
    tokens = np.arange(10, 110, dtype=np.uint16)  # 100 tokens in 4 documents
    offsets = np.array([0, 30, 55, 90, 100])
    return tokens, offsets


def test_mlm_examples_start_with_cls_and_separate_documents():
    rows = get_objective("mlm").make_examples(*_stream(), TrainConfig(seq_len=16), SPECIALS)
    assert rows.shape[1] == 16 and (rows[:, 0] == SPECIALS["cls"]).all()
    flat = rows[:, 1:].reshape(-1)
    seps = np.flatnonzero(flat == SPECIALS["sep"])
    # 104 packed tokens in rows of 15 after [CLS]: 6 rows; the ragged tail (with the 3rd [SEP]) is dropped.
    assert len(flat) == 90 and list(seps) == [30, 56]
    assert rows.dtype == np.uint16


def test_clm_examples_overlap_by_one_so_every_token_is_a_target():
    rows = get_objective("clm").make_examples(*_stream(), TrainConfig(seq_len=16), SPECIALS)
    assert rows.shape[1] == 17
    assert (rows[1:, 0] == rows[:-1, -1]).all()
    targets = np.concatenate([r[1:] for r in rows])
    assert len(targets) == len(set(range(len(targets))))


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_loss_starts_near_uniform_and_learns(objective):
    from model.config import ModelConfig

    torch.manual_seed(0)
    obj = get_objective(objective)
    model = obj.build(ModelConfig.from_name("tiny", arch=obj.ARCH, vocab_size=500, max_seq_len=64), None, SPECIALS)
    rows = torch.randint(5, 500, (8, 33))
    g = torch.Generator().manual_seed(0)
    loss, _ = model(rows, g)
    assert abs(loss.item() - np.log(500)) < 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = model(rows, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 1.0
