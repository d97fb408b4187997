"""The architectures are the standard ones: exports load with transformers' Auto classes and agree."""
import os

import pytest
import torch

from model.config import ModelConfig
from model.hf import ExportError, export_hf
from model.objectives import get_objective

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def _model(objective: str, seed: int = 0):
    torch.manual_seed(seed)
    obj = get_objective(objective)
    cfg = ModelConfig.from_name("tiny", arch=obj.ARCH, vocab_size=300, max_seq_len=64)
    model = obj.build(cfg, None, SPECIALS).eval()
    # Move every parameter away from its initial value so a wrong mapping cannot hide behind
    # ones / zeros (LayerNorm, biases).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(
    "objective,auto_class",
    [("mlm", "AutoModelForMaskedLM"), ("clm", "AutoModelForCausalLM")],
)
def test_export_matches_transformers(tmp_path, objective, auto_class):
    model = _model(objective)
    export_hf(model, objective, tmp_path / "hf", None, SPECIALS)
    hf = getattr(transformers, auto_class).from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(5, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # padding: compare only the real positions
    with torch.no_grad():
        ours = model.logits(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"


def test_export_refuses_non_stock_architecture(tmp_path):
    obj = get_objective("mlm")
    cfg = ModelConfig.from_name("tiny", arch="encoder", norm="pre", vocab_size=300)
    with pytest.raises(ExportError, match="norm"):
        export_hf(obj.build(cfg, None, SPECIALS), "mlm", tmp_path / "hf", None, SPECIALS)
